"""The one typed configuration object, loaded once per process.

A YAML file holds only the keys it changes; `--set dotted.key=value` overrides come last. `Config`
holds the sections (`core.config_sections`, the schema: strict types, frozen, unknown keys
refused). A `ValidationError` becomes one `ConfigError` naming the dotted key and what was
expected, which the CLI turns into exit code 2. Resize policies and architectures are checked
against their registries (`core.registry`) when named.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError

from imageiq_spark.core.config_sections import (
    CatalogConfig,
    DuplicatesConfig,
    EvaluateConfig,
    IngestConfig,
    MaintainConfig,
    MlflowConfig,
    MonitorConfig,
    PreprocessConfig,
    ScoreConfig,
    Section,
    ServeConfig,
    StorageConfig,
    TrainConfig,
)
from imageiq_spark.core.config_types import Expected, SparkConf, architectures, describe, is_section
from imageiq_spark.core.redact import redact_settings

DEFAULT_CONF_PATH = "conf/local.yaml"


class ConfigError(ValueError):
    """A configuration key or command-line argument is missing, unknown or of the wrong type."""


class Config(Section):
    storage: StorageConfig = StorageConfig()
    catalog: CatalogConfig = CatalogConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    score: ScoreConfig = ScoreConfig()
    serve: ServeConfig = ServeConfig()
    duplicates: DuplicatesConfig = DuplicatesConfig()
    mlflow: MlflowConfig = MlflowConfig()
    monitor: MonitorConfig = MonitorConfig()
    maintain: MaintainConfig = MaintainConfig()
    #: Passed to the Spark session builder; what spark-submit or the platform sets wins. A
    #: `spark.driver.extraJavaOptions` here is added after the project's own (its log settings).
    spark_conf: SparkConf = {}

    @property
    def image_size(self) -> tuple[int, int]:
        """`preprocess.size`, or the default input size of `train.model`."""
        if self.preprocess.size:
            height, width = self.preprocess.size
            return height, width
        return architectures()[self.train.model].input_size

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with dotted keys replaced, validated like a loaded file."""
        data = to_dict(self)
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return from_dict(data)

    def fingerprint(self, section: str) -> str:
        """A short stable hash of one section's resolved values (but for NOT_FINGERPRINTED)."""
        values = {key: value for key, value in to_dict(self)[section].items()
                  if key not in NOT_FINGERPRINTED.get(section, ())}
        payload = json.dumps(values, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


#: Keys that set how a stage waits, not what it makes: a change keeps the section's fingerprint
#: (train's checkpoint folder and its skip check).
NOT_FINGERPRINTED = {"train": ("lease_wait_s",)}


def to_dict(config: BaseModel) -> dict[str, Any]:
    return config.model_dump()


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


def loggable_params(config: Config) -> dict[str, str]:
    """The whole resolved config as flat string params for MLflow, credentials redacted
    (`redact`: secret-named `spark_conf` keys, passwords in URIs, token parameters)."""
    data = to_dict(config)
    data["spark_conf"] = redact_settings(data["spark_conf"])
    return redact_settings({key: json.dumps(value) if isinstance(value, (list, dict)) else str(value)
                            for key, value in flatten(data).items()})


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
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None


def _config_error(exc: ValidationError) -> ConfigError:
    """Pydantic's first error (an unknown key before a wrong value) in our words."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = error["loc"]
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if error["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(_section_at(loc[:-1]).model_fields))
        return ConfigError(f"unknown config key '{key}'; keys allowed here: {allowed}")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, Expected):
        expected, shown = cause.expected, cause.shown
    else:
        expected, shown = describe(_type_at(loc)), error["input"]
    return ConfigError(f"config key '{key}' expects {expected}, got {shown!r}")


def _type_at(loc: tuple[int | str, ...]) -> Any:
    """The annotation (Annotated kept) of the key or list item at `loc`."""
    tp: Any = Config
    for part in loc:
        tp = _bare(tp)
        if isinstance(part, int):
            (tp,) = typing.get_args(tp)
        elif is_section(tp):
            tp = typing.get_type_hints(tp, include_extras=True)[part]
        else:  # a value of a mapping
            tp = typing.get_args(tp)[1]
    return tp


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    return _bare(_type_at(loc))


def _bare(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
