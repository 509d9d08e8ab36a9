"""Catalogs and registries: with `catalog.name` the tables are external tables of that catalog,
named `<catalog>.<database>.<table>` in SQL, views, reads and merges; with `mlflow.registry_uri`
the model lives in a registry store of its own, under a three-level name as Unity Catalog's are.

Unity Catalog itself cannot run here: `spark_catalog` stands for the catalog, a SQLite store
apart from the tracking store for the registry, and a Hive metastore (Derby) for the persistent
metastore another Spark client reads."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import mlflow
import pytest
import yaml
from conftest import make_config
from mlflow.tracking import MlflowClient

from imageiq_spark import cli
from imageiq_spark.cli.sample_data import write_sample_data
from imageiq_spark.core.config import ConfigError, to_dict
from imageiq_spark.lake import lakehouse, tracking
from imageiq_spark.lake.session import find_jars_dir
from imageiq_spark.ml import aliases
from imageiq_spark.ml.classifier import ImageClassifier, log_classifier
from imageiq_spark.ml.models import ModelSpec, build_model
from imageiq_spark.stages import ingest, preprocess, score, train
from imageiq_spark.vision.spec import TransformSpec

# Ingest to score with a training run, and a Derby metastore test: `make test-all`.
pytestmark = pytest.mark.slow

MODEL = "main.imageiq.digits"
TINY = {"epochs": 2, "batch_size": 16, "patience": 10, "shuffle_buffer": 64}


def register_random_version(config) -> str:
    """A second registered version (a small CNN with random weights) to promote."""
    import tf_keras as keras

    keras.utils.set_random_seed(7)
    tracking.configure_mlflow(config)
    model = build_model(ModelSpec("small_cnn", 32, 32, 3, 10, (128.0,) * 3, (64.0,) * 3))
    classifier = ImageClassifier(model, [str(d) for d in range(10)], TransformSpec(size=(32, 32)))
    with mlflow.start_run(), tempfile.TemporaryDirectory() as staging:
        info = log_classifier(classifier, staging, registered_model_name=MODEL)
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """80 digits ingested, prepared, trained (version 1), a second version promoted by the
    operator, then scored: tables in catalog `spark_catalog`, model `main.imageiq.digits` in a
    registry store apart from the tracking store."""
    root = tmp_path_factory.mktemp("catalog")
    write_sample_data(root / "src", per_class=8)
    config = make_config(root, ingest={"source": str(root / "src")}, train=TINY,
                         catalog={"name": "spark_catalog"},
                         mlflow={"registered_model": MODEL, "registry_uri": f"sqlite:///{root}/registry.db"})
    ingest.run(spark, config)
    preprocess.run(spark, config)
    trained = train.run(spark, config)
    promoted = register_random_version(config)
    aliases.promote(spark, config, promoted, "operator's choice")
    scored = score.run(spark, config)
    return config, trained, promoted, scored


def test_train_registers_the_three_level_name_in_the_registry_store_only(lake):
    config, trained, promoted, _ = lake

    registry = MlflowClient(registry_uri=config.mlflow.registry_uri)
    tracking_store = MlflowClient(registry_uri=tracking.tracking_uri(config))
    assert (trained.version, promoted) == ("1", "2")
    assert sorted(str(v.version) for v in registry.search_model_versions(f"name = '{MODEL}'")) == ["1", "2"]
    assert tracking_store.search_registered_models() == []


def test_promote_moves_the_alias_of_the_three_level_name(spark, lake):
    config, *_ = lake

    registry = MlflowClient(registry_uri=config.mlflow.registry_uri)
    table = spark.sql(f"SELECT model_version FROM spark_catalog.{config.catalog.database}.model_aliases "
                      f"WHERE model_name = '{MODEL}' AND alias = 'champion'").collect()
    assert str(registry.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert [r.model_version for r in table] == ["2"]


def test_score_loads_the_champion_of_the_three_level_name_on_the_executors(spark, lake):
    config, *_, scored = lake

    rows = spark.sql(f"SELECT model_name, model_version, count(*) AS n "
                     f"FROM spark_catalog.{config.catalog.database}.predictions "
                     f"GROUP BY model_name, model_version").collect()
    assert scored.inserted == 80
    assert [tuple(r) for r in rows] == [(MODEL, "2", 80)]


def test_views_name_their_tables_with_three_levels(spark, lake):
    config, *_ = lake

    plan = spark.sql(f"DESCRIBE TABLE EXTENDED spark_catalog.{config.catalog.database}.latest_predictions")
    text = next(r.data_type for r in plan.collect() if r.col_name == "View Text")
    latest = spark.table(f"spark_catalog.{config.catalog.database}.latest_predictions")
    assert f"`spark_catalog`.`{config.catalog.database}`.predictions" in text
    assert latest.count() == 80


def test_sql_command_queries_three_level_names(lake, tmp_path, capsys):
    config, *_ = lake
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(to_dict(config)))

    code = cli.main(["--conf", str(conf), "sql", "--format", "csv",
                     f"SELECT count(*) AS images FROM spark_catalog.{config.catalog.database}.images"])

    assert code == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["images", "80"]


def test_a_name_registered_for_another_lake_is_a_config_error(spark, tmp_path):
    first = make_config(tmp_path / "a", catalog={"name": "spark_catalog"})
    second = make_config(tmp_path / "b",
                         catalog={"name": "spark_catalog", "database": first.catalog.database})
    lakehouse.ensure_table(spark, first, "images", ingest.IMAGES_SCHEMA)

    with pytest.raises(ConfigError, match=r"registered at .*/a/lake/.*Set catalog.database"):
        lakehouse.ensure_table(spark, second, "images", ingest.IMAGES_SCHEMA)


READER = """
import sys
from pyspark.sql import SparkSession

jars, metastore, query = sys.argv[1:]
spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .config("spark.jars", jars)
         .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
         .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
         .config("spark.sql.catalogImplementation", "hive")
         .config("spark.hadoop.javax.jdo.option.ConnectionURL",
                 f"jdbc:derby:;databaseName={metastore}/metastore_db;create=true")
         .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={metastore}")
         .getOrCreate())
for row in spark.sql(query).collect():
    print("ROW", *row)
"""


@pytest.mark.slow  # two more JVMs with a Derby metastore each: over a minute apiece
def test_another_spark_client_of_the_metastore_sees_the_ingested_table(tmp_path):
    write_sample_data(tmp_path / "src", per_class=1)
    metastore = tmp_path / "metastore"
    config = make_config(tmp_path, ingest={"source": str(tmp_path / "src")},
                         catalog={"name": "spark_catalog"}, spark_conf={
                             "spark.sql.catalogImplementation": "hive",
                             "spark.hadoop.javax.jdo.option.ConnectionURL":
                                 f"jdbc:derby:;databaseName={metastore}/metastore_db;create=true",
                             "spark.driver.extraJavaOptions": f"-Dderby.system.home={metastore}",
                         })
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(to_dict(config)))
    subprocess.run([sys.executable, "-m", "imageiq_spark", "--conf", str(conf), "ingest"], cwd=tmp_path,
                   check=True, timeout=600)

    jars = ",".join(str(p) for p in sorted((find_jars_dir() / "delta").glob("*.jar")))
    query = (f"SELECT label, count(*) FROM spark_catalog.{config.catalog.database}.images "
             "GROUP BY label ORDER BY label")
    reader = subprocess.run([sys.executable, "-c", READER, jars, str(metastore), query], cwd=tmp_path,
                            check=True, timeout=600, capture_output=True, text=True)

    rows = [line.split()[1:] for line in reader.stdout.splitlines() if line.startswith("ROW ")]
    assert rows == [[str(d), "1"] for d in range(10)]
