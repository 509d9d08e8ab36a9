"""The sections of the configuration: one pydantic model per top-level key (`Config` in
`core.config` holds them).

Each field is a config key: its type (`core.config_types`) and default here, its meaning in the
`#:` comment above it, from which `cli.docs` writes the manual's config reference. Strict types
(no "3" for 3, no true for 1), frozen, unknown keys refused.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from imageiq_spark.core.config_types import (
    IDENTIFIER,
    ArchitectureName,
    AtLeastOne,
    Expected,
    Identifier,
    ImageSize,
    NonNegative,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    ResizePolicyName,
    Threshold,
    Unit,
    expects,
)


class Section(BaseModel):
    """A config section: strict types, frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class StorageConfig(Section):
    #: Where the embedded lakehouse lives: tables, checkpoints, MLflow store and artifacts.
    root: str = "./lake"


class CatalogConfig(Section):
    #: Database (schema) holding the tables: letters, digits and `_`, not starting with a digit.
    database: Identifier = "imageiq"
    #: Catalog of a persistent metastore that registers the tables as external Delta tables at their
    #: locations, named `<name>.<database>.<table>` everywhere: `spark_catalog` (Hive metastore, Glue),
    #: a Unity Catalog name (`main`). Empty (the default) registers them in the session's catalog only.
    #: Letters, digits and `_`, as `database`.
    name: Annotated[str, expects(f"empty or an SQL identifier matching ^{IDENTIFIER}$",
                                 lambda v: v == "" or re.fullmatch(IDENTIFIER, v) is not None)] = ""


class IngestConfig(Section):
    #: URI of the images (file://, s3a://, dbfs:/ ... or a local path). Required for ingest.
    source: str | None = None
    #: `folder` (parent folder name), a path to a CSV/Parquet manifest (`path,label`), or `none`.
    labels: str = "folder"
    #: Larger images are quarantined from their header, before any decode.
    max_pixels: PositiveInt = 100_000_000
    #: Larger files are quarantined without being read.
    max_bytes: PositiveInt = 268_435_456
    #: File name extensions taken as images, compared case-insensitively. Each file is probed from its
    #: header (JPEG, PNG, BMP, GIF, TIFF, WebP, and Netpbm PBM/PGM/PPM, plain or raw).
    extensions: list[str] = [
            "jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "pgm", "ppm", "pbm",
        ]
    #: Files per micro-batch: bounds memory and gives progress on large sources.
    files_per_batch: PositiveInt = 20_000


class SplitConfig(Section):
    #: Fraction of images used to fit the model.
    train: float = 0.8
    #: Fraction used for early stopping and choosing the champion.
    val: float = 0.1
    #: Fraction held out for `evaluate`.
    test: float = 0.1

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1.0) >= 1e-6 or min(self.train, self.val, self.test) < 0:
            raise Expected("train, val and test fractions >= 0 that sum to 1", self.model_dump())
        return self


class PreprocessConfig(Section):
    #: `[height, width]` of prepared tensors; empty means the model's default size.
    size: ImageSize = []
    #: `rgb` or `gray` output channels.
    color: Literal["rgb", "gray"] = "rgb"
    #: How an image is fitted to `size`.
    resize: ResizePolicyName = "stretch"
    #: Enhancement operators, applied in this order.
    enhance: list[Literal["clahe", "denoise", "unsharp", "white_balance", "gamma"]] = []
    #: `clahe`: contrast limit of the histogram equalisation on luminance.
    clahe_clip_limit: PositiveFloat = 2.0
    #: `clahe`: tiles per side over which histograms are equalised.
    clahe_tile_grid: PositiveInt = 8
    #: `denoise`: filter strength of non-local-means denoising (higher removes more noise and detail).
    denoise_strength: PositiveFloat = 5.0
    #: `unsharp`: how much of the detail (image minus its blur) is added back.
    unsharp_amount: float = 1.0
    #: `unsharp`: standard deviation in pixels of the blur the detail is measured against.
    unsharp_sigma: PositiveFloat = 1.0
    #: `gamma`: out = 255 * (in / 255) ** (1 / gamma); above 1 brightens mid-tones.
    gamma: PositiveFloat = 1.0
    #: Grey level (0..255) of the padding `letterbox` adds around the resized image.
    pad_value: Annotated[int, expects("an integer 0..255", lambda v: 0 <= v <= 255)] = 0
    #: Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves twice the target size.
    reduced_decode: bool = True
    #: Fractions of images per split, chosen by a hash of `image_id` (stable across reruns).
    split: SplitConfig = SplitConfig()
    #: Rows per Arrow batch in the preprocessing UDF.
    batch_rows: PositiveInt = 256
    #: Parquet codec of the `prepared` tensors. Resized photos hardly compress (snappy saved 6%,
    #: zstd 35% at twice the write cost; docs/benchmarks.md), so by default they are stored as is.
    compression: Literal["none", "snappy", "zstd", "lz4"] = "none"


class AugmentConfig(Section):
    """Random changes applied to training images only (never to val, test or scoring)."""

    #: Mirror left-right at random (off by default: it turns digits and text into other glyphs).
    flip: bool = False
    #: Largest rotation, as a fraction of a full turn (0.05 = 18 degrees).
    rotation: Unit = 0.0
    #: Largest zoom in or out, as a fraction of the size.
    zoom: Unit = 0.0
    #: Largest brightness shift, as a fraction of the 0..255 range.
    brightness: Unit = 0.0
    #: Largest contrast change factor around 1.
    contrast: Unit = 0.0


class DistributedConfig(Section):
    #: Spark barrier tasks running MultiWorkerMirroredStrategy; 1 trains on the driver.
    workers: AtLeastOne = 1
    #: Each barrier task takes one GPU from Spark's resource scheduling.
    use_gpu: bool = False


class TrainConfig(Section):
    #: Architecture from the model zoo.
    model: ArchitectureName = "small_cnn"
    #: `none`, `imagenet`, or a path to a weights file.
    weights: str = "none"
    #: A cap: early stopping on validation loss ends training and restores the best weights.
    epochs: PositiveInt = 40
    #: Images per training step (per worker when distributed).
    batch_size: PositiveInt = 64
    #: Adam's learning rate (the fine-tuning phase of a pretrained base uses a tenth of it).
    learning_rate: PositiveFloat = 0.001
    #: Epochs without validation-loss improvement before stopping.
    patience: PositiveInt = 5
    #: `arrow` (pyarrow.dataset -> tf.data; reads the cache from any file system or s3a:// object
    #: storage) or `petastorm` (needs the `[petastorm]` extra, which needs pyarrow <= 14; reads its
    #: cache from a file system only: local, NFS, /dbfs, hdfs://).
    reader: Literal["arrow", "petastorm"] = "arrow"
    #: Where a training run materialises its splits for the reader (removed afterwards); empty
    #: means `<storage.root>/cache/train`. Every training worker must reach it.
    cache_uri: str = ""
    #: Fixed seed for repeatable runs; null leaves training unseeded.
    seed: int | None = 42
    #: Epochs trained with a frozen base before fine-tuning, when pretrained weights are given.
    fine_tune_epochs: int = 3
    #: Top layers of a pretrained base unfrozen for fine-tuning (BatchNorm layers stay frozen).
    fine_tune_layers: int = 20
    #: Threads each reader uses to read and decode batches.
    reader_workers: PositiveInt = 2
    #: Rows held in the shuffle buffer of the training stream.
    shuffle_buffer: PositiveInt = 2048
    #: A new version takes `champion` only when its val accuracy beats the champion's, on the same
    #: images, by more than this.
    promote_margin: NonNegative = 0.0
    #: The lowest val accuracy with which a new version may take `champion`.
    promote_min_accuracy: Probability = 0.0
    #: Seconds a train waits for another train on the same data (holding the lease on their shared
    #: checkpoint folder) to finish before it exits with status 1; after the wait it skips if that
    #: run registered the same data.
    lease_wait_s: NonNegative = 60.0
    augment: AugmentConfig = AugmentConfig()
    distributed: DistributedConfig = DistributedConfig()


class EvaluateConfig(Section):
    #: Split evaluated by default.
    split: Literal["train", "val", "test"] = "test"
    #: Bins of the reliability diagram and expected calibration error.
    calibration_bins: int = 10


class ScoreConfig(Section):
    #: How many labels with probabilities each prediction keeps.
    top_k: AtLeastOne = 3
    #: Rows per model call in the inference UDF.
    batch_size: AtLeastOne = 256
    #: Predictions with confidence under this go to the `review_queue` view.
    review_threshold: Probability = 0.6
    #: Attempts of the MERGE into `predictions` when a concurrent writer conflicts.
    merge_retries: int = 5


class ServeConfig(Section):
    #: Address `imageiq serve` listens on (`0.0.0.0` in a container); `--host` overrides it.
    host: str = "127.0.0.1"
    #: TCP port of `imageiq serve`; `--port` overrides it.
    port: Annotated[int, expects("a TCP port 0..65535", lambda v: 0 <= v <= 65535)] = 8080
    #: Most images in one forward pass of the micro-batcher.
    max_batch_size: AtLeastOne = 32
    #: Longest an idle model waits for more images, in milliseconds: for requests still being
    #: decoded, and for as many images as were in the server at once in the last second (under a
    #: concurrent load, the clients just answered). A request that arrives alone never waits, nor
    #: does a batch while another forward pass is running.
    max_wait_ms: NonNegative = 20.0
    #: Forward passes that run at once, the cores shared evenly between them (TensorFlow threads
    #: each). One pass over all cores answered more images/s than one pass per core on 2 cores at
    #: concurrency 8 and 32 (docs/benchmarks.md); more workers may pay on a many-core machine.
    forward_workers: AtLeastOne = 1
    #: Most images in one multipart or v2 infer request.
    max_images_per_request: AtLeastOne = 64
    #: Seconds between registry checks of the alias being served (a new version is loaded, then
    #: switched to); 0 never checks. A `models:/<name>/<version>` URI is never rechecked.
    alias_poll_s: NonNegative = 30.0
    #: Append every online prediction to Parquet files under `<storage.root>/request_log/`.
    request_log: bool = False
    #: Seconds between writes of the request log (also written every 1,000 rows and at shutdown).
    request_log_flush_s: PositiveFloat = 10.0
    #: Largest request body in bytes, on every route and content type (raw image, multipart, v2
    #: JSON or binary): counted while it streams in and answered 413 as soon as it is passed, so no
    #: more than this is ever held; a declared `Content-Length` over it is refused unread.
    max_body_bytes: PositiveInt = 20 * 1024 * 1024
    #: Largest image online (width x height), judged from its header before any decode: 422
    #: `too_many_pixels`. A 50 MP 16-bit RGBA PNG (2 MiB sent) took 1.5 GB or more while decoded and
    #: converted; one decode runs per core at once: lower this on a small machine.
    max_pixels: PositiveInt = 50_000_000
    #: Requests handled at once (reading the body, decoding, in the batcher); health probes and
    #: `/metrics` do not count. 0 means 8 per core (of the process's CPU affinity), at least
    #: `max_batch_size`. Each may hold up to `max_body_bytes` while its body arrives.
    max_concurrency: NonNegativeInt = 0
    #: Requests that wait for a free slot beyond `max_concurrency`; one more is answered 503 with a
    #: `Retry-After` header at once.
    max_queue: NonNegativeInt = 64
    #: Seconds a client has, from its request's admission, to send the whole body: a slower one is
    #: answered 408 and disconnected.
    body_timeout_s: PositiveFloat = 60.0
    #: Seconds a connection has to send a request's headers (from connecting, or from the request's
    #: first byte on a kept-alive connection): a slower or silent one is closed (408 if it began).
    header_timeout_s: PositiveFloat = 10.0
    #: Seconds an idle kept-alive connection stays open after an answer (uvicorn's keep-alive).
    keep_alive_s: PositiveFloat = 5.0
    #: File holding the bearer token every route but the health probes requires (`Authorization:
    #: Bearer <token>`); empty takes the environment variable `IMAGEIQ_SERVE_TOKEN`, and without
    #: either the server is open. The token is never logged.
    auth_token_file: str = ""
    #: `/metrics` answers without the token (for a scraper that cannot send one).
    metrics_public: bool = False
    #: PEM certificate (chain) for HTTPS, passed to uvicorn; empty serves plain HTTP.
    ssl_certfile: str = ""
    #: PEM private key of `ssl_certfile`.
    ssl_keyfile: str = ""


class ThresholdsConfig(Section):
    """Drift above a threshold raises an alert; null profiles the metric without alerting on it."""

    #: Population stability index of the predicted-label mix against the baseline's.
    label_psi: Threshold = 0.2
    #: Jensen-Shannon distance (base 2, 0..1) of the predicted-label mix against the baseline's.
    label_js: Threshold = 0.12
    #: Kolmogorov-Smirnov statistic of the confidence distribution against the baseline's.
    confidence_ks: Threshold = 0.25
    #: Wasserstein distance of the confidence distribution against the baseline's.
    confidence_wasserstein: Threshold = 0.1
    #: Kolmogorov-Smirnov statistic of image widths against the training images'.
    width_ks: Threshold = 0.3
    #: Kolmogorov-Smirnov statistic of image heights against the training images'.
    height_ks: Threshold = 0.3
    #: Kolmogorov-Smirnov statistic of mean brightness (grey level) against the training images'.
    brightness_ks: Threshold = 0.3
    #: Kolmogorov-Smirnov statistic of contrast (grey-level deviation over mean) against training's.
    contrast_ks: Threshold = 0.3
    #: Kolmogorov-Smirnov statistic of sharpness (Laplacian over image variance) against training's.
    sharpness_ks: Threshold = 0.3
    #: Population stability index of the file-format mix against the training images'.
    format_psi: Threshold = 0.25
    #: Share of the window's files that ingest quarantined.
    quarantine_rate: Threshold = 0.05
    #: Validation accuracy minus the window's accuracy, on images whose labels are known.
    accuracy_drop: Threshold = 0.1


class MonitorConfig(Section):
    #: Length of a monitoring window: `day` or `hour` (of predictions' scored_at, images' ingested_at).
    window: Literal["day", "hour"] = "day"
    #: Only windows that started at most this many days ago are recomputed.
    lookback_days: PositiveInt = 30
    #: Windows with fewer predictions than this are profiled but raise no alert (too few to judge).
    min_rows: PositiveInt = 50
    #: A breach over this many times its threshold is `critical`, under it `warning`.
    critical_factor: Annotated[float, expects("a number >= 1", lambda v: v >= 1)] = 2.0
    #: Prometheus text file (node-exporter textfile collector) with the latest window's values;
    #: empty means `<storage.root>/monitor/<catalog.database>.prom` when storage.root is a local path.
    textfile: str = ""
    thresholds: ThresholdsConfig = ThresholdsConfig()


class DuplicatesConfig(Section):
    #: Perceptual hashes (DCT, 64 bits) at most this many bits apart are near-duplicates (`phash`
    #: tier). Resized, JPEG-60 and 2.5%-per-side cropped copies of photos measured 0-8 bits; unrelated
    #: photos 20+. Higher finds more but makes the banded join slower (k // 2 + 1 shorter bands).
    max_distance: Annotated[int, expects("an integer 0..31", lambda v: 0 <= v <= 31)] = 8
    #: Images with a side shorter than this (pixels) get no `phash` pairs (counted in the summary and
    #: `job_runs.rows_skipped`; the other tiers still apply): on tiny images a 64-bit hash cannot tell
    #: a twin from a look-alike (the 5,000 distinct 28x28 sample digits, at 8 bits: 32,928 pairs
    #: linking 4,193 digits). At 32, 60x60 and 32x32 thumbnails of photos hash within 2 bits of their
    #: originals and pair with them; 1,000 distinct synthetic photos at full size, 60x60 and 32x32
    #: made no false pair (closest 10 bits apart). Glyph-like images of 32 px or more still link
    #: (the digits upscaled to 32x32 make 33,199 pairs): raise it for a lake of icons or digits.
    min_side: PositiveInt = 32
    #: Embeddings whose cosine similarity is at least this are near-duplicates (`embedding` tier).
    min_similarity: Annotated[float, expects("a number between -1 and 1", lambda v: -1 <= v <= 1)] = 0.97


class MaintainConfig(Section):
    #: `imageiq maintain` VACUUMs files that no table version of the last this many hours needs.
    #: Under 168 (Delta's default, 7 days) is refused unless the Spark conf
    #: `spark.databricks.delta.retentionDurationCheck.enabled` is `false`: a shorter retention can
    #: delete files a running reader or a time-travel query still needs.
    retention_hours: Annotated[int, expects("an integer >= 0", lambda v: v >= 0)] = 168


class MlflowConfig(Section):
    #: Tracking store; empty means SQLite under storage.root.
    tracking_uri: str = ""
    #: Model registry (`databricks-uc` for Unity Catalog, a database or server URI); empty means the
    #: tracking store.
    registry_uri: str = ""
    #: Registry name of the model; Unity Catalog's are three-level, `<catalog>.<schema>.<model>`.
    registered_model: str = "imageiq"
    #: Experiment the runs are logged to.
    experiment: str = "imageiq"
