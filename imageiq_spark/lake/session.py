"""The one place that builds the SparkSession from the config.

Locally (no spark-submit, no platform) it starts `local[*]` with the Delta jars from the project's
`jars/` folder, Delta's SQL extension and catalog, a warehouse under `storage.root`, and defaults
that suit a small machine. Under spark-submit, on EMR or Databricks, the platform's settings win:
the factory adds only the keys that are not already set, and fetches nothing. With
`spark_conf.spark.remote` or $SPARK_REMOTE it builds a Spark Connect session instead.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
from pyspark import SparkConf
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core import quiet
from imageiq_spark.core.config import Config
from imageiq_spark.core.redact import redact

log = logging.getLogger(__name__)

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
JARS_ENV = "IMAGEIQ_JARS_DIR"


def find_jars_dir() -> Path | None:
    """The folder `make jars` fills: $IMAGEIQ_JARS_DIR, else `jars/` beside the package or the cwd."""
    candidates = [os.environ.get(JARS_ENV), Path(__file__).resolve().parents[2] / "jars", Path("jars")]
    for candidate in candidates:
        if candidate and Path(candidate, "delta").is_dir():
            return Path(candidate).resolve()
    return None


def local_jars(s3_required: bool) -> list[str]:
    """Delta jars, plus the S3A jars when `make jars-s3` fetched them (required for s3a:// URIs)."""
    jars_dir = find_jars_dir()
    if jars_dir is None:
        raise RuntimeError(
            "Delta Lake jars not found: run `make jars` (or set IMAGEIQ_JARS_DIR to a folder "
            "holding delta/ and s3/ subfolders of jars)"
        )
    s3_jars = sorted(str(p) for p in (jars_dir / "s3").glob("*.jar"))
    if s3_required and not s3_jars:
        raise RuntimeError("S3 jars not found: run `make jars-s3` for s3a:// sources and storage")
    return sorted(str(p) for p in (jars_dir / "delta").glob("*.jar")) + s3_jars


def platform_managed() -> bool:
    """True under spark-submit, on Databricks or wherever a session already exists."""
    return bool(
        os.environ.get("PYSPARK_GATEWAY_PORT")
        or os.environ.get("DATABRICKS_RUNTIME_VERSION")
        or SparkSession.getActiveSession() is not None
    )


def uses_s3(config: Config) -> bool:
    uris = [config.storage.root, config.ingest.source or "", config.ingest.labels]
    return any(u.startswith(("s3a://", "s3://")) for u in uris)


#: The driver JVM's options: ours (`quiet.jvm_settings`) and a user's `spark_conf` both set it.
JVM_OPTIONS = "spark.driver.extraJavaOptions"


def local_defaults(config: Config) -> dict[str, str]:
    root = storage_uri(config.storage.root)
    python = sys.executable
    return {
        "spark.master": "local[*]",
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.warehouse.dir": f"{root}/warehouse",
        # The catalog is rebuilt from the table folders under storage.root on each start
        # (lakehouse.register_tables), so concurrent jobs need no single-writer Derby metastore.
        "spark.sql.catalogImplementation": "in-memory",
        "spark.sql.shuffle.partitions": "4",
        # Images are small files: at the default 4 MB open cost per file, 5,000 digits make 314
        # tasks of 16 files each; 1 MB packs ~128 small files per task.
        "spark.sql.files.openCostInBytes": "1048576",
        # A micro-batch's file list is otherwise listed by one Spark task per file.
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": "4",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "1024",
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
        "spark.ui.showConsoleProgress": "true",
        "spark.driver.memory": "4g",
        "spark.pyspark.python": python,
        "spark.pyspark.driver.python": python,
        "spark.executorEnv.PYSPARK_PYTHON": python,
        "spark.executorEnv.MLFLOW_DISABLE_TELEMETRY": "true",
    }


def s3a_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """S3A settings from the standard AWS environment variables, for a local session.

    `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) names an S3-compatible server (MinIO, Ceph, moto),
    which is addressed path-style, over TLS only for https. The keys themselves are never copied
    into Spark's conf, which Spark logs and shows in its UI: S3A's default credential chain reads
    `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, profiles and instance roles
    itself. boto3 (MLflow's S3 artifact store) reads the same variables.
    """
    # s3:// as on EMR, where EMRFS serves it; locally S3A does.
    settings = {"spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem"}
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["spark.hadoop.fs.s3a.endpoint"] = endpoint
        settings["spark.hadoop.fs.s3a.path.style.access"] = "true"
        settings["spark.hadoop.fs.s3a.connection.ssl.enabled"] = str(endpoint.startswith("https:")).lower()
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        settings["spark.hadoop.fs.s3a.endpoint.region"] = region
    return settings


def storage_uri(root: str) -> str:
    """A URI for `storage.root`: local paths become absolute `file:` URIs."""
    if "://" in root or root.startswith("dbfs:"):
        return root.rstrip("/")
    return Path(root).expanduser().resolve().as_uri()


def local_cluster_home(folder: Path) -> Path:
    """A Spark home for `local-cluster[...]` masters: symlinks to pip's pyspark and a `work/` of its
    own. Each worker of a local cluster keeps its executors' folders in `$SPARK_HOME/work`, which
    for pip's pyspark is inside the installed package."""
    import pyspark

    package = Path(pyspark.__file__).parent
    (folder / "work").mkdir(parents=True, exist_ok=True)
    for part in ("bin", "jars", "python", "sbin"):
        link = folder / part
        if not link.exists():
            link.symlink_to(package / part)
    return folder


def remote_url(config: Config) -> str | None:
    """Spark Connect's address, `spark_conf.spark.remote` or else $SPARK_REMOTE: `sc://host:port`
    joins a Connect server, `local[N]` starts one in this process. None for a classic session."""
    return config.spark_conf.get("spark.remote") or os.environ.get("SPARK_REMOTE") or None


def is_connect(spark: SparkSession) -> bool:
    """True for a Spark Connect session (no SparkContext, RDDs or accumulators)."""
    # pyspark imports its Connect client (which needs grpc) only when it builds a Connect session.
    connect = sys.modules.get("pyspark.sql.connect.session")
    return connect is not None and isinstance(spark, connect.SparkSession)


def connect_session(config: Config, remote: str, app_name: str) -> SparkSession:
    """A Spark Connect session. A `local[N]` remote starts its server in this process, with the
    same jars and defaults as a local classic session; a server elsewhere keeps its own setup and
    gets only `spark_conf`'s runtime (SQL) settings."""
    settings = session_settings(config, local=remote.startswith("local"))
    # The remote is the master; pyspark sets it on the server it starts.
    settings.pop("spark.master", None)
    settings.pop("spark.remote", None)
    builder = SparkSession.builder.remote(remote).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    log.info("Spark Connect session: %s", redact(remote))  # sc://...;token=
    with warnings.catch_warnings():
        if remote.startswith("local"):
            # The server started with every setting; pyspark then sets them again on the session,
            # and the static ones (jars, extensions, warehouse) only warn CANNOT_MODIFY_CONFIG.
            warnings.filterwarnings("ignore", message=".*CANNOT_MODIFY_CONFIG")
        return builder.getOrCreate()


def session_settings(config: Config, local: bool) -> dict[str, str]:
    """`spark_conf` over, for a session this process starts itself (`local`), the local defaults,
    the project's jars and S3A settings from the AWS variables."""
    settings: dict[str, str] = {}
    if local:
        settings.update(local_defaults(config))
        # Python workers log as the driver does: quiet, or everything under --verbose; so does its JVM.
        settings.update(quiet.worker_env())
        settings.update(quiet.jvm_settings())
        settings["spark.jars"] = ",".join(local_jars(uses_s3(config)))
        settings.update(s3a_defaults(os.environ))
    # Day windows (`date_trunc`), dates and shown timestamps in UTC whatever the machine's time
    # zone; a value from spark_conf, spark-submit or the platform wins.
    settings.setdefault("spark.sql.session.timeZone", "UTC")
    user = dict(config.spark_conf)
    # A user's own JVM options follow ours (the JVM takes the last of a repeated option) rather
    # than replace them, so adding, say, a heap-dump flag does not bring Spark's log noise back.
    if JVM_OPTIONS in settings and JVM_OPTIONS in user:
        user[JVM_OPTIONS] = f"{settings[JVM_OPTIONS]} {user[JVM_OPTIONS]}"
    settings.update(user)
    return settings


def get_spark(config: Config, app_name: str = "imageiq") -> SparkSession:
    """Build (or join) the SparkSession for this process."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    remote = remote_url(config)
    if remote:
        return connect_session(config, remote, app_name)
    managed = platform_managed()
    settings = session_settings(config, local=not managed)
    if settings.get("spark.master", "").startswith("local-cluster") and "SPARK_HOME" not in os.environ:
        home = Path(tempfile.gettempdir()) / f"imageiq-spark-home-{os.getuid()}"
        os.environ["SPARK_HOME"] = str(local_cluster_home(home))

    existing = SparkConf()  # under spark-submit this already holds what spark-submit was given
    builder = SparkSession.builder.appName(app_name)
    for key, value in settings.items():
        if managed and existing.contains(key):
            continue
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


@contextmanager
def session_conf(spark: SparkSession, settings: Mapping[str, str]) -> Iterator[None]:
    """Set SQL settings for the duration of a block, then put back what was there."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def cores(spark: SparkSession) -> int:
    """The cores the session's executors have (tasks that run at once)."""
    if is_connect(spark):
        # Connect shows no SparkContext: a range without a partition count gets the default
        # parallelism.
        return spark.range(0, 1 << 16).select(F.spark_partition_id().alias("p")).distinct().count()
    return spark.sparkContext.defaultParallelism


def deal(df: DataFrame, per_core: int = 2) -> DataFrame:
    """The rows dealt round-robin into `per_core` partitions per core: for rows whose place in
    the table says nothing of the work they hold (a subset of a table sits in a few of its files)."""
    return df.repartition(per_core * cores(df.sparkSession))


def spread(df: DataFrame) -> DataFrame:
    """Work for every core. A whole table of ours splits evenly by bytes into at least one scan
    task per core (its row groups are 8 MB, lakehouse.ROW_GROUP_SETTINGS), and is not shuffled: a
    round-robin shuffle of the image bytes cost 0.4 ms JVM CPU per 500x375 JPEG, and a sixth of a
    small CNN's scoring time. Fewer partitions than cores (a table too small to split) are dealt."""
    spark = df.sparkSession
    if is_connect(spark):
        # Connect does not show a DataFrame's partitions: every input is dealt.
        return deal(df, per_core=1)
    return deal(df, per_core=1) if df.rdd.getNumPartitions() < cores(spark) else df


def to_arrow(df: DataFrame) -> pa.Table:
    """The DataFrame collected to the driver as one Arrow table. `DataFrame.toArrow` arrived in
    pyspark 4.0; on 3.5 (`make test-compat`) the same Arrow batches come from the method behind
    its `toPandas`."""
    if hasattr(df, "toArrow"):
        return df.toArrow()
    from pyspark.sql.pandas.types import to_arrow_schema

    return pa.Table.from_batches(df._collect_as_arrow(), schema=to_arrow_schema(df.schema))
