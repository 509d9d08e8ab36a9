"""The one typed configuration object, loaded once per process.

A YAML file holds only the keys it changes; `--set dotted.key=value` overrides come last. Every key
is checked against the schema below: an unknown key or a wrong type raises `ConfigError` naming the
key and what was expected, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_CONF_PATH = "conf/local.yaml"
#: Input size `[height, width]` each architecture of the model zoo expects by default.
MODEL_INPUT_SIZES = {
    "small_cnn": (32, 32),
    "mobilenet_v2": (224, 224),
    "resnet50": (224, 224),
    "efficientnet_b0": (224, 224),
}


class ConfigError(ValueError):
    """A configuration key or command-line argument is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class StorageConfig:
    #: Where the embedded lakehouse lives: tables, checkpoints, MLflow store and artifacts.
    root: str = "./lake"


@dataclass(frozen=True)
class CatalogConfig:
    #: Database (schema) holding the tables.
    database: str = "imageiq"


@dataclass(frozen=True)
class IngestConfig:
    #: URI of the images (file://, s3a://, dbfs:/ ... or a local path). Required for ingest.
    source: str | None = None
    #: `folder` (parent folder name), a path to a CSV/Parquet manifest (`path,label`), or `none`.
    labels: str = "folder"
    #: Larger images are quarantined from their header, before any decode.
    max_pixels: int = 100_000_000
    #: Larger files are quarantined without being read.
    max_bytes: int = 268_435_456
    #: File name extensions taken as images, compared case-insensitively.
    extensions: list[str] = field(
        default_factory=lambda: [
            "jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "pgm", "ppm", "pbm",
        ]
    )
    #: Files per micro-batch: bounds memory and gives progress on large sources.
    files_per_batch: int = 20_000
    #: Fault-injection hook for tests: the Python worker probing a file whose path contains this
    #: string dies (`os._exit`), as on a native crash; the file must end in quarantine as
    #: `worker_crash` and the job go on. Empty (the default) injects nothing.
    fault_inject_path_contains: str = ""


@dataclass(frozen=True)
class SplitConfig:
    #: Fraction of images used to fit the model.
    train: float = 0.8
    #: Fraction used for early stopping and choosing the champion.
    val: float = 0.1
    #: Fraction held out for `evaluate`.
    test: float = 0.1


@dataclass(frozen=True)
class PreprocessConfig:
    #: `[height, width]` of prepared tensors; empty means the model's default size.
    size: list[int] = field(default_factory=list)
    #: `rgb` or `gray` output channels.
    color: Literal["rgb", "gray"] = "rgb"
    #: How an image is fitted to `size`.
    resize: Literal["stretch", "letterbox", "center_crop"] = "stretch"
    #: Enhancement operators, applied in this order.
    enhance: list[Literal["clahe", "denoise", "unsharp", "white_balance", "gamma"]] = field(
        default_factory=list
    )
    #: `clahe`: contrast limit of the histogram equalisation on luminance.
    clahe_clip_limit: float = 2.0
    #: `clahe`: tiles per side over which histograms are equalised.
    clahe_tile_grid: int = 8
    #: `denoise`: filter strength of non-local-means denoising (higher removes more noise and detail).
    denoise_strength: float = 5.0
    #: `unsharp`: how much of the detail (image minus its blur) is added back.
    unsharp_amount: float = 1.0
    #: `unsharp`: standard deviation in pixels of the blur the detail is measured against.
    unsharp_sigma: float = 1.0
    #: `gamma`: out = 255 * (in / 255) ** (1 / gamma); above 1 brightens mid-tones.
    gamma: float = 1.0
    #: Grey level (0..255) of the padding `letterbox` adds around the resized image.
    pad_value: int = 0
    #: Decode large JPEGs at 1/2, 1/4 or 1/8 scale when that still leaves twice the target size.
    reduced_decode: bool = True
    #: Fractions of images per split, chosen by a hash of `image_id` (stable across reruns).
    split: SplitConfig = field(default_factory=SplitConfig)
    #: Rows per Arrow batch in the preprocessing UDF.
    batch_rows: int = 256
    #: Parquet codec of the `prepared` tensors. Resized photos hardly compress (snappy saved 6%,
    #: zstd 35% at twice the write cost; docs/benchmarks.md), so by default they are stored as is.
    compression: Literal["none", "snappy", "zstd", "lz4"] = "none"


@dataclass(frozen=True)
class AugmentConfig:
    """Random changes applied to training images only (never to val, test or scoring)."""

    #: Mirror left-right at random (off by default: it turns digits and text into other glyphs).
    flip: bool = False
    #: Largest rotation, as a fraction of a full turn (0.05 = 18 degrees).
    rotation: float = 0.0
    #: Largest zoom in or out, as a fraction of the size.
    zoom: float = 0.0
    #: Largest brightness shift, as a fraction of the 0..255 range.
    brightness: float = 0.0
    #: Largest contrast change factor around 1.
    contrast: float = 0.0


@dataclass(frozen=True)
class DistributedConfig:
    #: Spark barrier tasks running MultiWorkerMirroredStrategy; 1 trains on the driver.
    workers: int = 1
    #: Each barrier task takes one GPU from Spark's resource scheduling.
    use_gpu: bool = False


@dataclass(frozen=True)
class TrainConfig:
    #: Architecture from the model zoo.
    model: Literal["small_cnn", "mobilenet_v2", "resnet50", "efficientnet_b0"] = "small_cnn"
    #: `none`, `imagenet`, or a path to a weights file.
    weights: str = "none"
    #: A cap: early stopping on validation loss ends training and restores the best weights.
    epochs: int = 40
    #: Images per training step (per worker when distributed).
    batch_size: int = 64
    #: Adam's learning rate (the fine-tuning phase of a pretrained base uses a tenth of it).
    learning_rate: float = 0.001
    #: Epochs without validation-loss improvement before stopping.
    patience: int = 5
    #: `petastorm` or `arrow` (pyarrow.dataset -> tf.data).
    reader: Literal["petastorm", "arrow"] = "petastorm"
    #: Fixed seed for repeatable runs; null leaves training unseeded.
    seed: int | None = 42
    #: Epochs trained with a frozen base before fine-tuning, when pretrained weights are given.
    fine_tune_epochs: int = 3
    #: Top layers of a pretrained base unfrozen for fine-tuning (BatchNorm layers stay frozen).
    fine_tune_layers: int = 20
    #: Threads each reader uses to read and decode batches.
    reader_workers: int = 2
    #: Rows held in the shuffle buffer of the training stream.
    shuffle_buffer: int = 2048
    #: A new version takes `champion` only when its val accuracy beats the champion's, on the same
    #: images, by more than this.
    promote_margin: float = 0.0
    #: The lowest val accuracy with which a new version may take `champion`.
    promote_min_accuracy: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    #: Split evaluated by default.
    split: Literal["train", "val", "test"] = "test"
    #: Bins of the reliability diagram and expected calibration error.
    calibration_bins: int = 10


@dataclass(frozen=True)
class ScoreConfig:
    #: How many labels with probabilities each prediction keeps.
    top_k: int = 3
    #: Rows per model call in the inference UDF.
    batch_size: int = 256
    #: Predictions with confidence under this go to the `review_queue` view.
    review_threshold: float = 0.6
    #: Attempts of the MERGE into `predictions` when a concurrent writer conflicts.
    merge_retries: int = 5


@dataclass(frozen=True)
class ServeConfig:
    #: Address `imageiq serve` listens on (`0.0.0.0` in a container); `--host` overrides it.
    host: str = "127.0.0.1"
    #: TCP port of `imageiq serve`; `--port` overrides it.
    port: int = 8080
    #: Most images in one forward pass of the micro-batcher.
    max_batch_size: int = 32
    #: Longest a forward pass waits for requests still being decoded, in milliseconds; a request
    #: that arrives alone never waits.
    max_wait_ms: float = 5.0
    #: Most images in one multipart or v2 infer request.
    max_images_per_request: int = 64
    #: Seconds between registry checks of the alias being served (a new version is loaded, then
    #: switched to); 0 never checks. A `models:/<name>/<version>` URI is never rechecked.
    alias_poll_s: float = 30.0
    #: Append every online prediction to Parquet files under `<storage.root>/request_log/`.
    request_log: bool = False
    #: Seconds between writes of the request log (also written every 1,000 rows and at shutdown).
    request_log_flush_s: float = 10.0


@dataclass(frozen=True)
class ThresholdsConfig:
    """Drift above a threshold raises an alert; null profiles the metric without alerting on it."""

    #: Population stability index of the predicted-label mix against the baseline's.
    label_psi: float | None = 0.2
    #: Jensen-Shannon distance (base 2, 0..1) of the predicted-label mix against the baseline's.
    label_js: float | None = 0.12
    #: Kolmogorov-Smirnov statistic of the confidence distribution against the baseline's.
    confidence_ks: float | None = 0.25
    #: Wasserstein distance of the confidence distribution against the baseline's.
    confidence_wasserstein: float | None = 0.1
    #: Kolmogorov-Smirnov statistic of image widths against the training images'.
    width_ks: float | None = 0.3
    #: Kolmogorov-Smirnov statistic of image heights against the training images'.
    height_ks: float | None = 0.3
    #: Kolmogorov-Smirnov statistic of mean brightness (grey level) against the training images'.
    brightness_ks: float | None = 0.3
    #: Kolmogorov-Smirnov statistic of contrast (grey-level deviation over mean) against training's.
    contrast_ks: float | None = 0.3
    #: Kolmogorov-Smirnov statistic of sharpness (Laplacian over image variance) against training's.
    sharpness_ks: float | None = 0.3
    #: Population stability index of the file-format mix against the training images'.
    format_psi: float | None = 0.25
    #: Share of the window's files that ingest quarantined.
    quarantine_rate: float | None = 0.05
    #: Validation accuracy minus the window's accuracy, on images whose labels are known.
    accuracy_drop: float | None = 0.1


@dataclass(frozen=True)
class MonitorConfig:
    #: Length of a monitoring window: `day` or `hour` (of the prediction's scored_at).
    window: Literal["day", "hour"] = "day"
    #: Only windows that started at most this many days ago are recomputed.
    lookback_days: int = 30
    #: Windows with fewer predictions than this are profiled but raise no alert (too few to judge).
    min_rows: int = 50
    #: A breach over this many times its threshold is `critical`, under it `warning`.
    critical_factor: float = 2.0
    #: Prometheus text file (node-exporter textfile collector) with the latest window's values;
    #: empty means `<storage.root>/monitor/<catalog.database>.prom` when storage.root is a local path.
    textfile: str = ""
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)


@dataclass(frozen=True)
class DuplicatesConfig:
    #: Perceptual hashes (DCT, 64 bits) at most this many bits apart are near-duplicates (`phash`
    #: tier). Resized, JPEG-60 and 2.5%-per-side cropped copies of photos measured 0-8 bits; unrelated
    #: photos 20+. Higher finds more but makes the banded join slower (k+1 shorter bands).
    max_distance: int = 8
    #: Images with a side shorter than this (pixels) get no `phash` pairs: a 64-bit hash cannot tell
    #: a thumbnail's twin from a look-alike (on the 28x28 sample digits, 8 bits linked 4,193 of the
    #: 5,000 distinct digits into clusters, the largest of 3,971). The other tiers still apply.
    min_side: int = 64
    #: Embeddings whose cosine similarity is at least this are near-duplicates (`embedding` tier).
    min_similarity: float = 0.97


@dataclass(frozen=True)
class MlflowConfig:
    #: Tracking store; empty means SQLite under storage.root.
    tracking_uri: str = ""
    #: Registry name of the model.
    registered_model: str = "imageiq"
    #: Experiment the runs are logged to.
    experiment: str = "imageiq"


@dataclass(frozen=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    duplicates: DuplicatesConfig = field(default_factory=DuplicatesConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    #: Passed verbatim to the Spark session builder; what spark-submit or the platform sets wins.
    spark_conf: dict[str, str] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """`preprocess.size`, or the default input size of `train.model`."""
        if self.preprocess.size:
            height, width = self.preprocess.size
            return height, width
        return MODEL_INPUT_SIZES[self.train.model]

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted keys replaced, validated like a loaded file."""
        data = to_dict(self)
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return from_dict(data)

    def fingerprint(self, section: str) -> str:
        """A short stable hash of one section's resolved values."""
        payload = json.dumps(to_dict(self)[section], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; used to log the whole config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "spark_conf":
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


#: Parts of a Spark key whose value is a credential (fs.s3a.secret.key, ...access.key, ...password).
SECRET_KEY_PARTS = ("secret", "password", "token", "access.key", "credential")


def loggable_params(config: Config) -> dict[str, str]:
    """The whole resolved config as flat string params for MLflow, credentials redacted."""
    data = to_dict(config)
    data["spark_conf"] = {
        key: "***" if any(part in key.lower() for part in SECRET_KEY_PARTS) else value
        for key, value in data["spark_conf"].items()
    }
    return {key: json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            for key, value in flatten(data).items()}


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    section, _, rest = key.partition(".")
    if section == "spark_conf" and rest:
        # Spark keys are dotted themselves: everything after `spark_conf.` is one key.
        data.setdefault("spark_conf", {})[rest] = value
        return
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"config key '{key}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def parse_set_argument(argument: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", 3); the value is parsed as YAML."""
    key, sep, raw = argument.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (for example train.epochs=3), got '{argument}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value '{raw}' is not valid YAML ({exc})") from exc
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (default `conf/local.yaml` when present) and apply `--set` overrides."""
    data: dict[str, Any] = {}
    if path is None and Path(DEFAULT_CONF_PATH).is_file():
        path = DEFAULT_CONF_PATH
    if path is not None:
        conf_path = Path(path)
        if not conf_path.is_file():
            raise ConfigError(f"--conf: file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(conf_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--conf: '{path}' is not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--conf: '{path}' must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    for argument in overrides or []:
        key, value = parse_set_argument(argument)
        _set_dotted(data, key, value)
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' expects a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key '{key}'; keys allowed here: {', '.join(sorted(names))}"
        )
    values = {name: _coerce(hints[name], data[name], f"{prefix}{name}") for name in data}
    config = cls(**values)
    _validate(config, prefix)
    return config


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of strings"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _coerce(tp: Any, value: Any, key: str) -> Any:
    def fail() -> ConfigError:
        return ConfigError(f"config key '{key}' expects {_describe(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail()
        return value
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        raise fail()
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item_type,) = typing.get_args(tp)
        return [_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        return {str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise fail()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise fail()


def _require(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' expects {expected}, got {value!r}")


def _validate(config: Any, prefix: str) -> None:
    """Range checks that a type alone cannot say."""
    if isinstance(config, IngestConfig):
        _require(config.max_pixels > 0, prefix + "max_pixels", "a positive integer", config.max_pixels)
        _require(config.max_bytes > 0, prefix + "max_bytes", "a positive integer", config.max_bytes)
        _require(config.files_per_batch > 0, prefix + "files_per_batch", "a positive integer",
                 config.files_per_batch)
    elif isinstance(config, SplitConfig):
        total = config.train + config.val + config.test
        _require(abs(total - 1.0) < 1e-6 and min(config.train, config.val, config.test) >= 0,
                 prefix.rstrip("."), "train, val and test fractions >= 0 that sum to 1",
                 dataclasses.asdict(config))
    elif isinstance(config, PreprocessConfig):
        _require(config.size == [] or (len(config.size) == 2 and min(config.size) > 0),
                 prefix + "size", "[height, width] of two positive integers", config.size)
        _require(config.gamma > 0, prefix + "gamma", "a positive number", config.gamma)
        _require(0 <= config.pad_value <= 255, prefix + "pad_value", "an integer 0..255", config.pad_value)
        _require(config.clahe_clip_limit > 0, prefix + "clahe_clip_limit", "a positive number",
                 config.clahe_clip_limit)
        _require(config.clahe_tile_grid > 0, prefix + "clahe_tile_grid", "a positive integer",
                 config.clahe_tile_grid)
        _require(config.denoise_strength > 0, prefix + "denoise_strength", "a positive number",
                 config.denoise_strength)
        _require(config.unsharp_sigma > 0, prefix + "unsharp_sigma", "a positive number",
                 config.unsharp_sigma)
        _require(config.batch_rows > 0, prefix + "batch_rows", "a positive integer", config.batch_rows)
    elif isinstance(config, TrainConfig):
        for name in ("epochs", "batch_size", "patience", "reader_workers", "shuffle_buffer"):
            value = getattr(config, name)
            _require(value > 0, prefix + name, "a positive integer", value)
        _require(config.learning_rate > 0, prefix + "learning_rate", "a positive number",
                 config.learning_rate)
        _require(config.promote_margin >= 0, prefix + "promote_margin", "a number >= 0",
                 config.promote_margin)
        _require(0 <= config.promote_min_accuracy <= 1, prefix + "promote_min_accuracy",
                 "a number between 0 and 1", config.promote_min_accuracy)
    elif isinstance(config, AugmentConfig):
        for name in ("rotation", "zoom", "brightness", "contrast"):
            value = getattr(config, name)
            _require(0.0 <= value < 1.0, prefix + name, "a number in [0, 1)", value)
    elif isinstance(config, DistributedConfig):
        _require(config.workers >= 1, prefix + "workers", "an integer >= 1", config.workers)
    elif isinstance(config, MonitorConfig):
        for name in ("lookback_days", "min_rows"):
            value = getattr(config, name)
            _require(value > 0, prefix + name, "a positive integer", value)
        _require(config.critical_factor >= 1.0, prefix + "critical_factor", "a number >= 1",
                 config.critical_factor)
    elif isinstance(config, ThresholdsConfig):
        for name, value in dataclasses.asdict(config).items():
            _require(value is None or value >= 0, prefix + name, "a number >= 0 or null", value)
    elif isinstance(config, ServeConfig):
        _require(0 <= config.port <= 65535, prefix + "port", "a TCP port 0..65535", config.port)
        for name in ("max_batch_size", "max_images_per_request"):
            value = getattr(config, name)
            _require(value >= 1, prefix + name, "an integer >= 1", value)
        for name in ("max_wait_ms", "alias_poll_s"):
            value = getattr(config, name)
            _require(value >= 0, prefix + name, "a number >= 0", value)
        _require(config.request_log_flush_s > 0, prefix + "request_log_flush_s", "a positive number",
                 config.request_log_flush_s)
    elif isinstance(config, DuplicatesConfig):
        _require(0 <= config.max_distance <= 31, prefix + "max_distance", "an integer 0..31",
                 config.max_distance)
        _require(config.min_side >= 1, prefix + "min_side", "a positive integer", config.min_side)
        _require(-1.0 <= config.min_similarity <= 1.0, prefix + "min_similarity",
                 "a number between -1 and 1", config.min_similarity)
    elif isinstance(config, ScoreConfig):
        _require(config.top_k >= 1, prefix + "top_k", "an integer >= 1", config.top_k)
        _require(config.batch_size >= 1, prefix + "batch_size", "an integer >= 1", config.batch_size)
        _require(0.0 <= config.review_threshold <= 1.0, prefix + "review_threshold",
                 "a number between 0 and 1", config.review_threshold)
