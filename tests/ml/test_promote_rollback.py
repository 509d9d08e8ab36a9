"""`imageiq promote VERSION --reason` and `imageiq rollback --reason`: the registry alias and
`model_aliases` move together, the reason lands in `alias_history` and on the version, rollback goes
back one champion at a time, and a missing version or history is a usage error (exit 2)."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from conftest import make_config
from mlflow.tracking import MlflowClient

from imageiq_spark import cli
from imageiq_spark.core.config import ConfigError, to_dict
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.tracking import CHAMPION, configure_mlflow, record_alias
from imageiq_spark.ml import aliases

NAME = "ops"


class Constant(mlflow.pyfunc.PythonModel):
    """A real registered model version; what it predicts does not matter to the alias."""

    def predict(self, context, model_input, params=None):
        return model_input


def register_gate_champions(spark, config, count: int) -> None:
    """`count` registered versions, each taking `champion` the way train's gate gives it."""
    configure_mlflow(config)
    client = MlflowClient()
    for _ in range(count):
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), registered_model_name=NAME)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(NAME, CHAMPION, version)
        record_alias(spark, config, NAME, CHAMPION, version, action="gate", reason="gate: test")


def champion(spark, config) -> tuple[str, str]:
    """(registry's champion, model_aliases' champion)."""
    registry = str(MlflowClient().get_model_version_by_alias(NAME, CHAMPION).version)
    table = (lakehouse.read_table(spark, config, "model_aliases")
             .where(f"model_name = '{NAME}' AND alias = 'champion'").first().model_version)
    return registry, table


@pytest.fixture
def lake(spark, tmp_path):
    """Versions 1, 2, 3 of the model, each champion in turn by the gate; 3 is champion."""
    config = make_config(tmp_path, mlflow={"registered_model": NAME})
    register_gate_champions(spark, config, 3)
    return config


def write_conf(config, tmp_path) -> str:
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml.safe_dump(to_dict(config)))
    return str(conf)


@pytest.mark.slow  # the rollback test below promotes too
def test_promote_moves_registry_and_table_and_records_the_reason(spark, lake):
    moved = aliases.promote(spark, lake, "1", "v3 mislabels night photos")

    history = (lakehouse.read_table(spark, lake, "alias_history").orderBy("changed_at").collect())[-1]
    assert moved.lines() == ["champion:     ops version 3 -> 1 (promote)",
                            "reason:       v3 mislabels night photos"]
    assert champion(spark, lake) == ("1", "1")
    assert (history.model_version, history.previous_version, history.action, history.reason) == \
        ("1", "3", "promote", "v3 mislabels night photos")
    tags = MlflowClient().get_model_version(NAME, "1").tags
    assert (tags[aliases.ACTION_TAG], tags[aliases.REASON_TAG]) == ("promote", "v3 mislabels night photos")


def test_rollback_goes_back_one_champion_at_a_time_then_exits_2(spark, lake, tmp_path):
    aliases.promote(spark, lake, "1", "try the old one")  # champions so far: 1, 2, 3, 1
    conf = write_conf(lake, tmp_path)

    def rollback() -> int:
        return cli.main(["--conf", conf, "rollback", "--reason", "bad night"])

    codes, champions = [], []
    for _ in range(3):
        codes.append(rollback())
        champions.append(champion(spark, lake))

    assert codes == [0, 0, 0]
    assert champions == [("3", "3"), ("2", "2"), ("1", "1")]
    assert rollback() == 2
    assert champion(spark, lake) == ("1", "1")
    assert MlflowClient().get_model_version(NAME, "2").tags[aliases.REASON_TAG] == "bad night"


@pytest.mark.slow
def test_promoting_a_version_that_does_not_exist_is_a_usage_error(spark, lake, tmp_path, capsys):
    code = cli.main(["--conf", write_conf(lake, tmp_path), "promote", "42", "--reason", "why not"])

    assert code == 2
    assert "promote: version '42' of model 'ops' is not in the registry" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="registered versions: 1, 2, 3"):
        aliases.promote(spark, lake, "42", "why not")
