"""Similar images: the k nearest images of `images` to a file or an image_id, and a contact sheet.

With embeddings (`imageiq embed`), nearness is the cosine similarity of the latest model's
vectors, computed in Spark SQL over the table (a query file not in the table is embedded on the
driver by that model). Without them, it is the perceptual hash: similarity = 1 - Hamming
distance / 64. The query image itself, when it is in the table, comes first (similarity 1).
Notebooks call `find_similar`; `imageiq similar` prints the same rows and writes the sheet.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from imageiq_spark.core.config import Config, ConfigError
from imageiq_spark.lake import lakehouse, storage
from imageiq_spark.lake.storage import write_bytes
from imageiq_spark.stages import duplicates
from imageiq_spark.vision import phash

log = logging.getLogger(__name__)

_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
SHEET_SIZE = (128, 128)


@dataclass(frozen=True)
class Neighbour:
    image_id: str
    path: str
    label: str | None
    similarity: float


@dataclass
class SimilarResult:
    query: str
    query_id: str | None  # the query's image_id when it is in `images`
    method: str  # "embedding (<model>)" or "phash"
    neighbours: list[Neighbour] = field(default_factory=list)
    sheet: str | None = None

    def lines(self) -> list[str]:
        width = max([len(n.path) for n in self.neighbours] + [4])
        lines = [f"query:  {self.query}" + (f" (image_id {self.query_id})" if self.query_id else ""),
                 f"method: {self.method}", f"{'path':<{width}}  {'label':<10}  similarity"]
        lines += [f"{n.path:<{width}}  {n.label or '':<10}  {n.similarity:.4f}" for n in self.neighbours]
        if self.sheet:
            lines.append(f"contact sheet: {self.sheet}")
        return lines


def read_query(query: str) -> bytes:
    """The bytes of a local path or a URI (file:, s3a://, s3://)."""
    if Path(query).is_file():
        return Path(query).read_bytes()

    try:
        contents = storage.read_bytes(query)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"similar: IMAGE '{query}' is neither an image_id in images nor a readable "
                          f"file ({exc})") from exc
    if contents is None:
        raise ConfigError(f"similar: IMAGE '{query}' is neither an image_id in images nor a file")
    return contents


def cosine_column(vector: Column, query: np.ndarray) -> Column:
    """Cosine similarity of an array<float> column with a fixed vector, in Spark SQL."""
    q = np.asarray(query, np.float64)
    q = q / (np.linalg.norm(q) or 1.0)
    dot = F.aggregate(F.zip_with(vector, F.lit(q.tolist()), lambda x, y: x * y), F.lit(0.0),
                      lambda acc, x: acc + x)
    norm = F.sqrt(F.aggregate(vector, F.lit(0.0), lambda acc, x: acc + x * x))
    return F.least(F.lit(1.0), dot / F.when(norm == 0, 1.0).otherwise(norm))


def find_similar(spark: SparkSession, config: Config, query: str, k: int = 10) -> SimilarResult:
    """The k images nearest to `query` (an image_id of `images`, a path or a URI), nearest first."""
    if k < 1:
        raise ConfigError(f"similar: --k expects an integer >= 1, got {k}")
    if not lakehouse.table_exists(spark, config, "images"):
        raise RuntimeError("table 'images' does not exist: run `imageiq ingest` first")
    images = lakehouse.read_table(spark, config, "images")
    data: bytes | None = None
    query_id = query if _IMAGE_ID.match(query) else None
    if query_id is None or images.where(F.col("image_id") == query_id).limit(1).count() == 0:
        data = read_query(query)
        query_id = hashlib.sha256(data).hexdigest()
    if images.where(F.col("image_id") == query_id).limit(1).count() == 0:
        query_id = None

    model, vectors = duplicates.latest_embeddings(spark, config)
    if vectors is not None:
        method = f"embedding ({model[0]} version {model[1]})" if model else "embedding"
        stored = vectors.where(F.col("image_id") == query_id).collect() if query_id else []
        if stored:
            target = np.asarray(stored[0]["vector"], np.float64)
        else:  # a file, or an image not embedded yet
            target = _embed(config, model, data if data is not None else _content(images, query_id))
        scored = vectors.select("image_id", cosine_column(F.col("vector"), target).alias("similarity"))
    else:
        method = "phash"
        if not lakehouse.table_exists(spark, config, duplicates.HASHES_TABLE):
            duplicates.ensure_tables(spark, config)
            duplicates.update_hashes(spark, config)
        hashes = lakehouse.read_table(spark, config, duplicates.HASHES_TABLE)
        stored = hashes.where(F.col("image_id") == query_id).collect() if query_id else []
        if stored and stored[0]["phash"] is not None:
            value = stored[0]["phash"]
        else:
            value = phash.hash_image(data if data is not None else _content(images, query_id)).phash
        distance = F.bit_count(F.col("phash").bitwiseXOR(F.lit(value)))
        scored = hashes.where(F.col("phash").isNotNull()).select(
            "image_id", (1.0 - distance / 64.0).alias("similarity"))
    rows = _nearest(scored, images, query_id, k)
    neighbours = [Neighbour(r["image_id"], r["path"], r["label"], float(r["similarity"])) for r in rows]
    return SimilarResult(query, query_id, method, neighbours)


def _nearest(scored: DataFrame, images: DataFrame, query_id: str | None, k: int) -> list:
    # Ties (twins with identical vectors or hashes) put the query itself first.
    is_query = F.col("image_id") == F.lit(query_id) if query_id else F.lit(False)
    top = scored.orderBy(F.desc("similarity"), F.desc(is_query), "image_id").limit(k)
    return (top.join(images.select("image_id", "path", "label"), "image_id")
            .orderBy(F.desc("similarity"), F.desc(is_query), "image_id").collect())


def _content(images: DataFrame, image_id: str | None) -> bytes:
    return bytes(images.where(F.col("image_id") == image_id).select("content").first()["content"])


def _embed(config: Config, model: tuple[str, str] | None, data: bytes) -> np.ndarray:
    """The query file's vector from the model that made the embeddings (loaded on the driver)."""
    from imageiq_spark.lake.tracking import configure_mlflow
    from imageiq_spark.ml.classifier import load_classifier
    from imageiq_spark.stages.embed import Embedder
    from imageiq_spark.vision.transform import prepare_image

    name, version = model or ("", "")
    configure_mlflow(config)
    embedder = Embedder(load_classifier(f"models:/{name}/{version}"))
    return embedder.embed_tensors(prepare_image(data, embedder.spec)[None])[0].astype(np.float64)


def contact_sheet(result: SimilarResult, contents: dict[str, bytes], query_bytes: bytes) -> bytes:
    """A PNG: the query, then each neighbour with its label and similarity."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from imageiq_spark.vision.spec import TransformSpec
    from imageiq_spark.vision.transform import prepare_image

    spec = TransformSpec(size=SHEET_SIZE, resize="letterbox", pad_value=255)
    tiles = [(query_bytes, "query")] + [
        (contents[n.image_id], f"{n.label or 'unlabelled'}  {n.similarity:.3f}") for n in result.neighbours]
    columns = min(6, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.8, rows * 2.0), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for ax, (data, title) in zip(axes.flat, tiles):
            ax.imshow(prepare_image(data, spec))
            ax.set_title(title, fontsize=8)
        fig.suptitle(f"nearest to {Path(result.query).name[:40]} ({result.method})", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def write_contact_sheet(spark: SparkSession, config: Config, result: SimilarResult,
                        query_bytes: bytes | None = None) -> str:
    """Write the result's contact sheet under <storage.root>/reports/similar/; returns its URI."""
    images = lakehouse.read_table(spark, config, "images")
    wanted = [n.image_id for n in result.neighbours]
    contents = {r["image_id"]: bytes(r["content"]) for r in
                images.where(F.col("image_id").isin(wanted)).select("image_id", "content").collect()}
    if query_bytes is None:
        query_bytes = contents.get(result.query_id or "") or read_query(result.query)
    name = (result.query_id or hashlib.sha256(query_bytes).hexdigest())[:16]
    uri = lakehouse.lake_path(config, "reports", "similar", f"{name}.png")
    write_bytes(uri, contact_sheet(result, contents, query_bytes))
    result.sheet = uri
    return uri


def print_similar(spark: SparkSession, config: Config, query: str, k: int) -> SimilarResult:
    """`imageiq similar`: the neighbours on standard output, and the contact sheet written."""
    result = find_similar(spark, config, query, k)
    write_contact_sheet(spark, config, result)
    for line in result.lines():
        print(line)
    return result
