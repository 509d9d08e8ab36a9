"""The gate reads the champion again before the alias moves: a champion that changed while the
candidate was being compared is compared with too (no Spark: the scoring is stubbed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import make_config

from imageiq_spark.lake import tracking
from imageiq_spark.ml import champion


class Registry:
    """The registry calls `decide` makes: the champion alias of one model."""

    def __init__(self, champion_version: str | None) -> None:
        self.champion = champion_version

    def get_model_version_by_alias(self, name: str, alias: str) -> SimpleNamespace:
        from mlflow.exceptions import MlflowException

        if self.champion is None:
            raise MlflowException(f"no alias {alias}")
        return SimpleNamespace(version=self.champion, run_id=f"run{self.champion}")


class Images:
    def cache(self) -> Images:
        return self

    def unpersist(self) -> None:
        pass


def gate(monkeypatch, tmp_path, registry: Registry, val: dict[str, float], moves: dict[str, str | None]):
    """`decide` for candidate version 3, where scoring version v moves the alias to moves[v]."""
    monkeypatch.setattr(tracking, "registry_client", lambda config: registry)
    monkeypatch.setattr(champion, "gate_images", lambda *args: Images())
    scored = []

    def split_accuracies(images, config, name, version, run_id):
        scored.append(version)
        if version in moves:  # another train's gate (or `imageiq promote`) moves the alias meanwhile
            registry.champion = moves.pop(version)
        return {"val": (val[version], 10), "test": (val[version], 10)}

    monkeypatch.setattr(champion, "split_accuracies", split_accuracies)
    decision = champion.decide(None, make_config(tmp_path), "m", "3", "run3", 7, "pv")
    return decision, scored


def test_a_champion_that_moved_during_the_gate_is_compared_with_before_the_alias_moves(monkeypatch, tmp_path):
    decision, scored = gate(monkeypatch, tmp_path, Registry("1"), {"1": 0.5, "2": 0.9, "3": 0.8}, {"1": "2"})

    assert scored == ["3", "1", "2"]
    assert (decision.alias, decision.champion_version) == ("challenger", "2")
    assert decision.champion["val"] == (0.9, 10)
    assert "does not beat the champion's 0.9000" in decision.reason


def test_a_champion_that_appeared_during_the_gate_is_compared_with(monkeypatch, tmp_path):
    decision, scored = gate(monkeypatch, tmp_path, Registry(None), {"2": 0.9, "3": 0.8}, {"3": "2"})

    assert scored == ["3", "2"]
    assert (decision.alias, decision.champion_version) == ("challenger", "2")


def test_an_unmoved_champion_is_scored_once(monkeypatch, tmp_path):
    decision, scored = gate(monkeypatch, tmp_path, Registry("1"), {"1": 0.5, "3": 0.8}, {})

    assert scored == ["3", "1"]
    assert (decision.alias, decision.champion_version) == ("champion", "1")


def test_a_gate_gives_up_when_the_champion_keeps_moving(monkeypatch, tmp_path):
    moves = {"1": "2", "2": "4", "4": "5"}
    with pytest.raises(RuntimeError, match="moved 3 times"):
        gate(monkeypatch, tmp_path, Registry("1"), {"1": 0.5, "2": 0.6, "3": 0.8, "4": 0.7, "5": 0.1}, moves)
