"""The champion gate: a newly trained version takes the `champion` alias only by beating the
current champion on equal terms.

Both models score the very same images, the val and test splits of the `prepared` snapshot the
new version was trained on, from their raw bytes through their own preprocessing (the champion
may be of an older preprocess version), with the same distributed path as `score`. A figure the
champion got on its own validation set, possibly another one, is never compared. The new version
is promoted when its val accuracy is at least `train.promote_min_accuracy` and beats the
champion's by more than `train.promote_margin`; test accuracy is reported beside it, never used
to decide. Each decision lands in `champion_decisions` (one row per split) and on the new run.

Scoring takes a while, and another train's gate or an operator's `promote` may move the alias
meanwhile: `decide` reads the champion again as its last step, and if it changed it compares with
the new one (the candidate's figures are kept), so the alias never moves on a comparison with a
champion that is gone. The registry has no compare-and-set for aliases: what remains is the
moment between that read and the move.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.clock import utc_now
from imageiq_spark.core.config import Config
from imageiq_spark.core.tables import schema
from imageiq_spark.lake import lakehouse

DECISIONS_SCHEMA = schema(
    "model_name STRING NOT NULL, candidate_version STRING NOT NULL, champion_version STRING, "
    "split STRING NOT NULL, images BIGINT NOT NULL, candidate_accuracy DOUBLE NOT NULL, "
    "champion_accuracy DOUBLE, margin DOUBLE NOT NULL, min_accuracy DOUBLE NOT NULL, "
    "decision STRING NOT NULL, reason STRING NOT NULL, decided_at TIMESTAMP NOT NULL"
)
GATE_SPLITS = ("val", "test")
#: Champions a gate compares with before it gives up, when the alias keeps moving while it scores.
GATE_COMPARISONS = 3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    alias: str
    reason: str
    candidate: dict[str, tuple[float, int]]  # split -> (accuracy, images)
    champion: dict[str, tuple[float, int]] | None
    champion_version: str | None

    @property
    def promoted(self) -> bool:
        from imageiq_spark.lake.tracking import CHAMPION

        return self.alias == CHAMPION


def split_accuracies(rows: DataFrame, config: Config, name: str, version: str, run_id: str
                     ) -> dict[str, tuple[float, int]]:
    """(image_id, content, split, label) rows -> {split: (accuracy, images)} of one registered version,
    scored from the raw bytes like `score` does. An image it cannot predict counts as wrong."""
    from imageiq_spark.ml.inference import RegistryLoader, score_contents

    pinned = f"models:/{name}/{version}"
    scored = score_contents(rows, RegistryLoader(config, pinned, key=f"{pinned}#{run_id}"), top_k=1)
    result = (rows.select("image_id", "split", "label").join(scored.select("image_id", "predicted_label"),
                                                            "image_id", "left")
              .groupBy("split")
              .agg(F.avg(F.coalesce(F.col("predicted_label") == F.col("label"), F.lit(False)).cast("double"))
                   .alias("accuracy"), F.count("*").alias("images"))
              .collect())
    return {r["split"]: (float(r["accuracy"]), int(r["images"])) for r in result}


def judge(candidate: float, champion: float | None, margin: float, min_accuracy: float) -> tuple[bool, str]:
    """(promote?, why) from the two val accuracies on the same images."""
    if candidate < min_accuracy:
        return False, f"val accuracy {candidate:.4f} is under train.promote_min_accuracy {min_accuracy}"
    if champion is None:
        return True, "no champion yet"
    if candidate > champion + margin:
        return True, f"val accuracy {candidate:.4f} beats the champion's {champion:.4f} by more than {margin}"
    return False, (f"val accuracy {candidate:.4f} does not beat the champion's {champion:.4f} on the same "
                   f"images by more than {margin}")


def gate_images(spark: SparkSession, config: Config, prepared_version: int, preprocess_version: str
                ) -> DataFrame:
    """(image_id, content, split, label) of the labelled val and test images of a prepared snapshot."""
    splits = (spark.read.format("delta").option("versionAsOf", prepared_version)
              .load(lakehouse.table_location(config, "prepared"))
              .where((F.col("preprocess_version") == preprocess_version) & F.col("label_index").isNotNull()
                     & F.col("split").isin(*GATE_SPLITS))
              .select("image_id", "split", "label"))
    images = lakehouse.read_table(spark, config, "images").select("image_id", "content")
    return images.join(splits, "image_id")


def decide(spark: SparkSession, config: Config, name: str, version: str, run_id: str,
           prepared_version: int, preprocess_version: str) -> Decision:
    """Score the new version and the current champion on the same images and choose the alias.

    The champion is read again after it was scored; if it changed, the new one is scored too
    (up to GATE_COMPARISONS champions), so the caller moves the alias on a fresh comparison."""
    from imageiq_spark.lake.tracking import CHALLENGER, CHAMPION, registry_client

    client = registry_client(config)
    current = _current_champion(client, name, version)
    images = gate_images(spark, config, prepared_version, preprocess_version).cache()
    try:
        candidate = split_accuracies(images, config, name, version, run_id)
        for _ in range(GATE_COMPARISONS):
            champion = (None if current is None else
                        split_accuracies(images, config, name, str(current.version), current.run_id))
            latest = _current_champion(client, name, version)
            if _version(latest) == _version(current):
                break
            log.info("gate: the champion of %s moved from version %s to %s while it was scored; "
                     "comparing with the new one", name, _version(current), _version(latest))
            current = latest
        else:
            raise RuntimeError(f"gate: the champion of {name} moved {GATE_COMPARISONS} times while "
                               f"version {version} was compared with it; the version is "
                               f"registered without an alias: train again once the alias settles")
    finally:
        images.unpersist()
    val = candidate.get("val", (0.0, 0))[0]
    champion_val = None if champion is None else champion.get("val", (0.0, 0))[0]
    promote, reason = judge(val, champion_val, config.train.promote_margin, config.train.promote_min_accuracy)
    return Decision(CHAMPION if promote else CHALLENGER, reason, candidate, champion,
                    None if current is None else str(current.version))


def _current_champion(client: Any, name: str, candidate: str) -> Any:
    """The registry's champion version of `name`, or None (none, or the candidate itself)."""
    from mlflow.exceptions import MlflowException

    from imageiq_spark.lake.tracking import CHAMPION

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return None if str(current.version) == str(candidate) else current


def _version(model_version: Any) -> str | None:
    return None if model_version is None else str(model_version.version)


def record(spark: SparkSession, config: Config, name: str, version: str, decision: Decision) -> None:
    """One `champion_decisions` row per split, and the figures on the new version's MLflow run."""
    import mlflow

    decided_at = utc_now()
    rows = [(name, version, decision.champion_version, split, images, accuracy,
             None if decision.champion is None else decision.champion.get(split, (None, 0))[0],
             config.train.promote_margin, config.train.promote_min_accuracy,
             "promoted" if decision.promoted else "rejected", decision.reason, decided_at)
            for split, (accuracy, images) in sorted(decision.candidate.items())]
    lakehouse.ensure_table(spark, config, "champion_decisions", DECISIONS_SCHEMA)
    if rows:
        lakehouse.merge_new_rows(config, "champion_decisions", spark.createDataFrame(rows, DECISIONS_SCHEMA),
                                 ["model_name", "candidate_version", "split"])
    metrics = {f"gate_{split}_accuracy": accuracy for split, (accuracy, _) in decision.candidate.items()}
    if decision.champion is not None:
        metrics.update({f"gate_champion_{split}_accuracy": accuracy
                        for split, (accuracy, _) in decision.champion.items()})
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"gate_decision": "promoted" if decision.promoted else "rejected",
                     "gate_reason": decision.reason,
                     "gate_champion_version": decision.champion_version or ""})
