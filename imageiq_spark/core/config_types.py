"""The value types of config keys, and what each expects in words.

Constrained numbers, SQL identifiers, names of a registry (`core.registry`, read when a value is
checked) and Spark settings, for the config sections (`core.config_sections`). A value a type alone
cannot refuse raises `Expected`, which `core.config` turns into a `ConfigError`; `describe` words
a type for those errors and for the manual's config reference (`cli.docs`).
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator

from imageiq_spark.core.registry import ARCHITECTURES, RESIZE_POLICIES


class Expected(ValueError):
    """A value a type alone cannot refuse: what was expected, and the value as validated."""

    def __init__(self, expected: str, shown: Any) -> None:
        super().__init__(expected)
        self.expected, self.shown = expected, shown


def expects(expected: str, ok: Callable[[Any], bool]) -> AfterValidator:
    """A validator refusing each value `ok` rejects with `Expected(expected, value)`."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise Expected(expected, value)
        return value

    return AfterValidator(check)


class OneOf:
    """The names of a registry, read when a value is checked: a name registered later is valid."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:
        self.names = names

    def check(self, value: str) -> str:
        if value not in self.names():
            raise ValueError(value)
        return value


def _one_of(names: Callable[[], Iterable[str]]) -> Any:
    choice = OneOf(names)
    return Annotated[str, choice, AfterValidator(choice.check)]


def _resize_policies() -> Iterable[str]:
    return RESIZE_POLICIES.loaded()


def architectures() -> dict[str, Any]:
    return ARCHITECTURES.loaded()


def _strings(value: Any) -> Any:
    """Spark settings are strings: YAML numbers and booleans are written the way Spark reads them."""
    if not isinstance(value, dict):
        return value
    return {str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in value.items()}


PositiveInt = Annotated[int, expects("a positive integer", lambda v: v > 0)]
PositiveFloat = Annotated[float, expects("a positive number", lambda v: v > 0)]
AtLeastOne = Annotated[int, expects("an integer >= 1", lambda v: v >= 1)]
NonNegative = Annotated[float, expects("a number >= 0", lambda v: v >= 0)]
NonNegativeInt = Annotated[int, expects("an integer >= 0", lambda v: v >= 0)]
Probability = Annotated[float, expects("a number between 0 and 1", lambda v: 0 <= v <= 1)]
Threshold = Annotated[float | None, expects("a number >= 0 or null", lambda v: v is None or v >= 0)]
Unit = Annotated[float, expects("a number in [0, 1)", lambda v: 0 <= v < 1)]
ImageSize = Annotated[list[int], expects("[height, width] of two positive integers",
                                         lambda v: v == [] or (len(v) == 2 and min(v) > 0))]
#: Names that go into SQL (backquoted): plain identifiers only, so no value can end the quote.
IDENTIFIER = "[A-Za-z_][A-Za-z0-9_]*"
Identifier = Annotated[str, expects(f"an SQL identifier matching ^{IDENTIFIER}$",
                                    lambda v: re.fullmatch(IDENTIFIER, v) is not None)]
ResizePolicyName = _one_of(_resize_policies)
ArchitectureName = _one_of(architectures)
SparkConf = Annotated[dict[str, str], BeforeValidator(_strings)]


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def describe(tp: Any) -> str:
    """What a value of type `tp` is, in words: the `expects ...` of errors and the manual."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        choice = next((m for m in tp.__metadata__ if isinstance(m, OneOf)), None)
        if choice is not None:
            return "one of " + ", ".join(repr(name) for name in choice.names())
        return describe(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of strings"
    if tp is type(None):
        return "null"
    if is_section(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )
