"""Schemas of the Delta tables that several stages write or read, beside `lakehouse`, and `schema`,
which every module writes its table and UDF schemas with.

A table's schema lives here, not in the first stage that wrote it, as Spark SQL DDL. Adding a
column: add it, nullable, at the end of its schema; `lakehouse.ensure_table` creates new tables with
it and adds it to existing ones on the stage's next run (`ALTER TABLE ... ADD COLUMNS`), old rows
reading NULL.
"""

from __future__ import annotations

from pyspark.sql import types as T

_TYPES: dict[str, T.DataType] = {
    "STRING": T.StringType(), "INT": T.IntegerType(), "BIGINT": T.LongType(), "FLOAT": T.FloatType(),
    "DOUBLE": T.DoubleType(), "TIMESTAMP": T.TimestampType(), "DATE": T.DateType(),
    "BINARY": T.BinaryType(), "TINYINT": T.ByteType(),
}


def schema(ddl: str) -> T.StructType:
    """A StructType from Spark SQL DDL, `name TYPE [NOT NULL], ...`: the types of `_TYPES`, and
    `ARRAY<type>` and `STRUCT<name: type, ...>` of them.

    Spark's own DDL parser needs a running JVM; schemas here are module constants.
    """
    fields = []
    for column in _split(ddl):
        name, kind = column.split(None, 1)
        required = kind.upper().endswith(" NOT NULL")
        kind = kind[: -len(" NOT NULL")] if required else kind
        fields.append(T.StructField(name, _type(kind), not required))
    return T.StructType(fields)


def _type(text: str) -> T.DataType:
    text, upper = text.strip(), text.strip().upper()
    if upper.startswith("ARRAY<"):
        return T.ArrayType(_type(text[6:-1]))
    if upper.startswith("STRUCT<"):
        return T.StructType([T.StructField(name.strip(), _type(kind))
                             for name, kind in (field.split(":", 1) for field in _split(text[7:-1]))])
    return _TYPES[upper]


def _split(text: str) -> list[str]:
    """`text` cut at the commas outside <...>."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "<") - (char == ">")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


#: `images` (bronze): one row per distinct image content, written by ingest.
IMAGES_SCHEMA = schema(
    "image_id STRING NOT NULL, path STRING NOT NULL, label STRING, format STRING NOT NULL, "
    "width INT NOT NULL, height INT NOT NULL, channels INT NOT NULL, bit_depth INT NOT NULL, "
    "orientation INT NOT NULL, size_bytes BIGINT NOT NULL, modified_at TIMESTAMP, "
    "content BINARY NOT NULL, ingested_at TIMESTAMP NOT NULL"
)
#: `quarantine`: files and images a stage refused, with the reason; any stage appends. `version`
#: is what the stage ran: the preprocess_version for preprocess, `<model name>/<model version>`
#: for score and embed, NULL for ingest; an image refused under one version is retried under another.
QUARANTINE_SCHEMA = schema(
    "path STRING NOT NULL, reason STRING NOT NULL, detail STRING, stage STRING NOT NULL, "
    "image_id STRING, size_bytes BIGINT, modified_at TIMESTAMP, ingested_at TIMESTAMP NOT NULL, "
    "version STRING"
)
QUARANTINE_KEYS = ["path", "stage", "image_id", "modified_at", "version"]
#: `prepared` (silver): fixed-size uint8 tensors keyed by (image_id, preprocess_version).
PREPARED_SCHEMA = schema(
    "image_id STRING NOT NULL, label STRING, label_index INT, split STRING NOT NULL, "
    "tensor BINARY NOT NULL, height INT NOT NULL, width INT NOT NULL, channels INT NOT NULL, "
    "preprocess_version STRING NOT NULL, prepared_at TIMESTAMP NOT NULL"
)
LABELS_TABLE, VERSIONS_TABLE, STATS_TABLE = "prepared_labels", "prepared_versions", "prepared_stats"
#: `prepared_labels`: the label vocabulary; an index never changes once given.
LABELS_SCHEMA = schema("label STRING NOT NULL, label_index INT NOT NULL, added_at TIMESTAMP NOT NULL")
#: `prepared_versions`: each preprocess_version's TransformSpec as JSON.
VERSIONS_SCHEMA = schema(
    "preprocess_version STRING NOT NULL, spec STRING NOT NULL, created_at TIMESTAMP NOT NULL"
)
#: Per run (rows sharing a `prepared_at`): exact integer sums of the train split's channels.
RUN_STATS_SCHEMA = schema(
    "preprocess_version STRING NOT NULL, prepared_at TIMESTAMP NOT NULL, "
    "train_images BIGINT NOT NULL, channel_total ARRAY<BIGINT> NOT NULL, "
    "channel_total_sq ARRAY<BIGINT> NOT NULL"
)

#: Written by `duplicates`, read by `splits` (near-duplicates share their split).
CLUSTERS_TABLE = "near_duplicate_clusters"
CLUSTERS_SCHEMA = schema(
    "image_id STRING NOT NULL, cluster_id STRING NOT NULL, cluster_size INT NOT NULL, "
    "clustered_at TIMESTAMP NOT NULL"
)

#: `top_k`: the k most probable labels, most probable first.
TOP_K_DDL = "ARRAY<STRUCT<label: STRING, probability: DOUBLE>>"
PREDICTIONS_SCHEMA = schema(
    f"image_id STRING NOT NULL, predicted_label STRING, confidence DOUBLE, top_k {TOP_K_DDL}, "
    "model_name STRING NOT NULL, model_version STRING NOT NULL, run_id STRING, "
    "scored_at TIMESTAMP NOT NULL, score_date DATE NOT NULL, label STRING"
)
PREDICTION_KEYS = ["image_id", "model_name", "model_version"]
