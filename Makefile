# One-command set-up: every target that needs them builds the venv and fetches the Spark jars.
PYTHON ?= python3
VENV := .venv
COMMA := ,
BIN := $(VENV)/bin
MVN := mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy -Dtransitive=false
# Resolved one by one, not transitively: transitive copies clash with pyspark's own jars (DESIGN.md).
# Delta 4.4.0 publishes jars for Spark 4.0-4.2 (none for 4.3); hadoop-aws matches the hadoop-client
# 3.5.0 inside pyspark 4.2; the AWS SDK bundle and the S3 analytics accelerator (which S3A 3.5 loads
# at its first read) are the versions hadoop 3.5.0 is built with (hadoop-project 3.5.0 pom).
DELTA_JARS := io.delta:delta-spark_4.2_2.13:4.4.0 io.delta:delta-storage:4.4.0
S3_JARS := org.apache.hadoop:hadoop-aws:3.5.0 software.amazon.awssdk:bundle:2.35.4 \
  software.amazon.s3.analyticsaccelerator:analyticsaccelerator-s3:1.3.1
SAMPLE := data/sample
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN)/python)
export MLFLOW_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install jars jars-s3 browser test test-all test-cluster test-compat demo bench lint wheel pack clean podman-tools image-base image test-image

install: $(VENV)/.installed
jars: jars/delta/.done
jars-s3: jars/s3/.done

$(VENV)/.installed: requirements.txt requirements-local.txt requirements-dev.txt constraints.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The stamps depend on the Makefile, and a fetch empties its folder first: a jar of an earlier
# version left beside the new one would put two copies of its classes on Spark's classpath.
jars/delta/.done: Makefile
	rm -rf jars/delta && mkdir -p jars/delta
	for a in $(DELTA_JARS); do $(MVN) -Dartifact=$$a -DoutputDirectory=jars/delta || exit 1; done
	touch $@

# Headless Debian chromium and its driver for the upload page's browser test (tests/serving/test_serve.py).
# Without apt-get or root (macOS, Fedora, a laptop) nothing is installed and that test skips.
browser:
	@if test -x /usr/bin/chromium -a -x /usr/bin/chromedriver; then :; \
	elif command -v apt-get > /dev/null && test "$$(id -u)" = 0; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "browser: no apt-get or not root: chromium not installed, the upload page's browser test will skip"; fi

jars/s3/.done: Makefile
	rm -rf jars/s3 && mkdir -p jars/s3
	for a in $(S3_JARS); do $(MVN) -Dartifact=$$a -DoutputDirectory=jars/s3 || exit 1; done
	touch $@

test: install jars jars-s3 browser
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not slow" --timeout=900 --durations=25
	TZ=America/New_York $(BIN)/pytest -m "tz and not slow" --timeout=900

test-all: install jars jars-s3 browser
	$(BIN)/pytest --timeout=1800

# The suite on separate executor JVMs (tests/cluster.py), then the executor-loss tests.
CLUSTER_MASTER ?= local-cluster[2,1,1024]
test-cluster: install jars jars-s3 browser
	IMAGEIQ_TEST_MASTER='$(CLUSTER_MASTER)' $(BIN)/pytest -m "not slow" --timeout=1800
	IMAGEIQ_TEST_MASTER='$(CLUSTER_MASTER)' $(BIN)/pytest -m slow tests/test_cluster.py --timeout=1800

# The older Spark lines the ranges claim, each in a venv and a jars folder of its own:
# constraints-compat-<line>.txt replaces the pins it names, the rest of the stack keeps
# constraints.txt's. The session takes that line's Delta jars from $IMAGEIQ_JARS_DIR. The 3.5 line
# carries the [petastorm] extra and runs the training tests with the Petastorm reader
# (IMAGEIQ_TEST_TRAIN_READER); what needs Spark 4 (Spark Connect's local server) skips there.
COMPAT_LINES := 4.0 3.5
COMPAT_DELTA_JARS_4.0 := io.delta:delta-spark_4.0_2.13:4.4.0 io.delta:delta-storage:4.4.0
COMPAT_DELTA_JARS_3.5 := io.delta:delta-spark_2.12:3.3.3 io.delta:delta-storage:3.3.3
COMPAT_PACKAGES_3.5 := petastorm
COMPAT_READER_4.0 := arrow
COMPAT_READER_3.5 := petastorm
COMPAT_TESTS := tests/stages/test_ingest.py tests/stages/test_preprocess.py tests/stages/test_score.py tests/test_connect.py \
  tests/stages/test_train.py tests/stages/test_duplicates.py::test_cosine_pairs_equal_every_pair_above_the_threshold

.venv-compat-%/.installed: requirements.txt constraints.txt constraints-compat-%.txt setup.py
	test -x .venv-compat-$*/bin/python || $(PYTHON) -m venv .venv-compat-$*
	.venv-compat-$*/bin/pip install -q --upgrade pip
	grep -v -i -E "^($$(sed -n 's/==.*//p' constraints-compat-$*.txt | sed 's/[-_.]/[-_.]/g' | paste -sd'|' -))==" constraints.txt \
	  > .venv-compat-$*/constraints.txt
	.venv-compat-$*/bin/pip install -q -c .venv-compat-$*/constraints.txt -c constraints-compat-$*.txt \
	  -r requirements.txt delta-spark mlxtend pytest pytest-timeout "moto[server]" boto3 psutil \
	  $(COMPAT_PACKAGES_$*)
	.venv-compat-$*/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

jars/compat-%/delta/.done:
	mkdir -p jars/compat-$*/delta
	for a in $(COMPAT_DELTA_JARS_$*); do $(MVN) -Dartifact=$$a -DoutputDirectory=jars/compat-$*/delta || exit 1; done
	touch $@

test-compat: $(addprefix test-compat-,$(COMPAT_LINES))

test-compat-%: .venv-compat-%/.installed jars/compat-%/delta/.done
	.venv-compat-$*/bin/pip freeze | grep -i -E '^(pyspark|py4j|delta[-_]spark|pyarrow|numpy|pandas|tensorflow|mlflow|petastorm)=='
	IMAGEIQ_JARS_DIR=$(abspath jars/compat-$*) IMAGEIQ_TEST_TRAIN_READER=$(COMPAT_READER_$*) \
	  PYSPARK_PYTHON=$(abspath .venv-compat-$*/bin/python) PYSPARK_DRIVER_PYTHON=$(abspath .venv-compat-$*/bin/python) \
	  .venv-compat-$*/bin/pytest -m "not slow" --timeout=900 --durations=10 $(COMPAT_TESTS)

demo: install jars
	$(BIN)/imageiq sample-data $(SAMPLE)
	$(BIN)/imageiq --set ingest.source=$(SAMPLE) run-all
	$(BIN)/imageiq sql "SELECT label, count(*) AS n FROM imageiq.images GROUP BY label ORDER BY label" --format csv
	$(BIN)/imageiq sql "SELECT count(*) AS near_duplicate_pairs FROM imageiq.near_duplicates"
	$(BIN)/imageiq sql "SELECT model_version, round(value, 4) AS test_accuracy FROM imageiq.evaluations \
	  WHERE split = 'test' AND metric = 'accuracy' AND class IS NULL ORDER BY model_version"
	$(BIN)/imageiq sql "SELECT predicted_label, count(*) AS images, round(avg(confidence), 3) AS mean_confidence \
	  FROM imageiq.latest_predictions GROUP BY predicted_label ORDER BY predicted_label"
	$(BIN)/imageiq monitor
	$(BIN)/imageiq status

bench: install jars
	$(BIN)/python -m benchmarks.run

lint: install
	$(BIN)/ruff check .

# The project wheel, and the packed environment that spark-submit ships to a cluster with
# `--archives dist/imageiq-env.tar.gz#environment` (TensorFlow and OpenCV hold native code, which
# --py-files cannot carry). For EMR (python at /usr/bin/python3.11): make pack PACK_PYTHON_PREFIX=/usr
# CUDA=1 adds TensorFlow's CUDA libraries (the [cuda] extra, tensorflow[and-cuda]) to the packed
# environment and the image, for GPU executors and serving pods.
PACK_PYTHON_PREFIX ?=
CUDA ?=
PACK_VENV := build/pack-venv
wheel: install
	rm -rf build/lib build/bdist.* dist/imageiq_spark-*.whl
	$(BIN)/python -m build --wheel --no-isolation --outdir dist .

pack: wheel
	rm -rf $(PACK_VENV) dist/imageiq-env.tar.gz
	$$($(BIN)/python -c 'import sys; print(sys._base_executable)') -m venv $(PACK_VENV)
	$(PACK_VENV)/bin/pip install -q -c constraints.txt "$$(ls dist/imageiq_spark-*.whl)[local$(if $(CUDA),$(COMMA)cuda)]"
	$(BIN)/venv-pack -q --prefix $(PACK_VENV) --output dist/imageiq-env.tar.gz \
		$(if $(PACK_PYTHON_PREFIX),--python-prefix $(PACK_PYTHON_PREFIX))
	chmod 644 dist/imageiq-env.tar.gz

# The container image (Containerfile), built with podman from a base made locally by debootstrap:
# no registry is needed. deploy/container/ holds the podman settings that work on these machines.
IMAGE ?= localhost/imageiq:0.1.0
BASE_IMAGE ?= localhost/imageiq-base:bookworm
BASE_PACKAGES := python3,python3-venv,openjdk-17-jre-headless,tini,ca-certificates,procps
PODMAN := CONTAINERS_CONF=$(abspath deploy/container/containers.conf) \
	CONTAINERS_STORAGE_CONF=$(abspath deploy/container/storage.conf) podman
podman-tools:
	command -v podman && command -v runc && command -v debootstrap || \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah runc debootstrap)

image-base: podman-tools
	$(PODMAN) image exists $(BASE_IMAGE) || ( rm -rf build/rootfs && mkdir -p build && \
	  debootstrap --variant=minbase --include=$(BASE_PACKAGES) bookworm $(abspath build/rootfs) \
	    http://deb.debian.org/debian && \
	  tar -C build/rootfs -c . | $(PODMAN) import - $(BASE_IMAGE) && rm -rf build/rootfs )

# A TLS-intercepting proxy's CA bundle (PIP_CERT on the host) is lent to pip during the build only.
image: jars jars-s3 image-base
	$(PODMAN) build --network host --build-arg BASE=$(BASE_IMAGE) --build-arg CUDA=$(CUDA) \
	  $(if $(PIP_CERT),-v $(PIP_CERT):/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt) \
	  -f Containerfile -t $(IMAGE) .

test-image: install image
	IMAGEIQ_IMAGE=$(IMAGE) $(BIN)/pytest -m slow tests/test_image.py --timeout=1800

clean:
	rm -rf lake data build dist *.egg-info .pytest_cache
