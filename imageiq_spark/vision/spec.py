"""The transform's parameters: `TransformSpec`, whose `version` hash names the tensors it makes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from imageiq_spark.core.config import Config
from imageiq_spark.core.config_sections import PreprocessConfig
from imageiq_spark.core.registry import RESIZE_POLICIES

#: Bumped whenever the code changes the pixels it produces for the same parameters, so that the
#: table's `preprocess_version` changes with it (2: shrinking by 2x2 means over a supersample).
ALGORITHM_REVISION = 2
COLORS = ("rgb", "gray")
ENHANCEMENTS = ("clahe", "denoise", "unsharp", "white_balance", "gamma")
#: Parameters that only matter when their operator is listed in `enhance`.
ENHANCE_PARAMS = {
    "clahe": ("clahe_clip_limit", "clahe_tile_grid"),
    "denoise": ("denoise_strength",),
    "unsharp": ("unsharp_amount", "unsharp_sigma"),
    "white_balance": (),
    "gamma": ("gamma",),
}

#: The transform's defaults are the `preprocess` section's.
_PREPROCESS = PreprocessConfig()


@dataclass(frozen=True)
class TransformSpec:
    """Every parameter of the transform; its `version` hash names the tensors it makes."""

    size: tuple[int, int] = (32, 32)  # (height, width)
    color: str = _PREPROCESS.color
    resize: str = _PREPROCESS.resize
    enhance: tuple[str, ...] = tuple(_PREPROCESS.enhance)
    clahe_clip_limit: float = _PREPROCESS.clahe_clip_limit
    clahe_tile_grid: int = _PREPROCESS.clahe_tile_grid
    denoise_strength: float = _PREPROCESS.denoise_strength
    unsharp_amount: float = _PREPROCESS.unsharp_amount
    unsharp_sigma: float = _PREPROCESS.unsharp_sigma
    gamma: float = _PREPROCESS.gamma
    pad_value: int = _PREPROCESS.pad_value
    reduced_decode: bool = _PREPROCESS.reduced_decode

    def __post_init__(self) -> None:
        # Normalise lists from JSON/config to tuples so the spec is hashable and compares equal.
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "enhance", tuple(self.enhance))
        problems = []
        if len(self.size) != 2 or min(self.size) <= 0:
            problems.append(f"size expects (height, width) of two positive integers, got {self.size}")
        if self.color not in COLORS:
            problems.append(f"color expects one of {COLORS}, got {self.color!r}")
        if self.resize not in RESIZE_POLICIES.loaded():
            problems.append(f"resize expects one of {tuple(RESIZE_POLICIES)}, got {self.resize!r}")
        unknown = [e for e in self.enhance if e not in ENHANCEMENTS]
        if unknown:
            problems.append(f"enhance expects operators from {ENHANCEMENTS}, got {unknown}")
        if self.gamma <= 0:
            problems.append(f"gamma expects a positive number, got {self.gamma}")
        if not 0 <= self.pad_value <= 255:
            problems.append(f"pad_value expects an integer 0..255, got {self.pad_value}")
        if problems:
            raise ValueError("invalid TransformSpec: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Config) -> TransformSpec:
        """The spec of `preprocess`: every field but `size` is the config key of the same name."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "size"]
        return cls(size=config.image_size, **{name: getattr(config.preprocess, name) for name in names})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; `from_dict(spec.to_dict()) == spec`."""
        data = dataclasses.asdict(self)
        data["size"] = list(self.size)
        data["enhance"] = list(self.enhance)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"TransformSpec.from_dict: unknown keys {unknown}; expected some of {sorted(names)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def version(self) -> str:
        """Short stable hash of every parameter that can change the output pixels."""
        data = self.to_dict()
        # An operator's parameters count only when the operator is used: tuning an unused one
        # must not re-prepare the whole table.
        for operator, params in ENHANCE_PARAMS.items():
            if operator not in self.enhance:
                for name in params:
                    data.pop(name)
        for name, policy in RESIZE_POLICIES.items():
            if name != self.resize:
                for param in policy.params:
                    data.pop(param, None)
        data["algorithm_revision"] = ALGORITHM_REVISION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.size[0], self.size[1], self.channels
