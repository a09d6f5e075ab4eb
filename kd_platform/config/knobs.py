"""Typed, flat knob declarations shared by the engine and every method.

A knob is a dataclass field declared with :func:`knob`; its metadata carries the
allowed range or choices, so `--set`, search-space files and Optuna all validate
against one source of truth.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from kd_platform.errors import UsageError


def knob(default: Any, *, low: float | None = None, high: float | None = None,
         choices: tuple | None = None, form: str | None = None, help: str = "") -> Any:
    """Declare one knob of a config dataclass (a dataclass ``field`` with validation metadata).

    ``form`` names the shape of a string knob's value (see ``FORMS``), e.g. ``"epochs"`` for a
    comma-separated, strictly increasing list of positive epoch numbers."""
    return dataclasses.field(default=default, metadata={
        "low": low, "high": high, "choices": choices, "form": form, "help": help})


def _epoch_list(text: str) -> str:
    """A comma-separated, strictly increasing list of positive integers (epochs); empty is none."""
    items = [t.strip() for t in text.split(",")]
    if items == [""]:
        return text
    values = []
    for item in items:
        try:
            values.append(int(item))
        except ValueError:
            raise ValueError(f"'{item}' is not an integer; expected comma-separated epochs such as 30,60") from None
    if any(v < 1 for v in values):
        raise ValueError(f"epochs must be positive, not {min(values)}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError("epochs must be strictly increasing, e.g. 30,60")
    return text


# Value forms of string knobs: each checks a value and returns it, or raises ValueError saying why.
FORMS = {"epochs": _epoch_list}


@dataclass(frozen=True)
class KnobSpec:
    name: str
    type: type
    default: Any
    low: float | None
    high: float | None
    choices: tuple | None
    help: str
    form: str | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.type is bool:
            return "true or false"
        lo = "-inf" if self.low is None else self.low
        hi = "inf" if self.high is None else self.high
        return f"a{'n integer' if self.type is int else ' number'} in [{lo}, {hi}]"

    def coerce(self, value: Any) -> Any:
        """Convert ``value`` (a YAML value or a ``--set`` string) to this knob's type and check it."""
        try:
            out = _convert(self.type, value)
        except (TypeError, ValueError):
            raise UsageError(f"knob '{self.name}': {value!r} is not {self.describe()}") from None
        if isinstance(out, float) and not math.isfinite(out):
            raise UsageError(f"knob '{self.name}': {value!r} is not a finite number")
        if self.form is not None:
            try:
                FORMS[self.form](out)
            except ValueError as exc:
                raise UsageError(f"knob '{self.name}': {value!r}: {exc}") from None
        if self.choices is not None and out not in self.choices:
            raise UsageError(f"knob '{self.name}': {value!r} is not {self.describe()}")
        if self.type in (int, float) and (
                (self.low is not None and out < self.low) or (self.high is not None and out > self.high)):
            raise UsageError(f"knob '{self.name}': {value!r} is out of range; expected {self.describe()}")
        return out


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if kind is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return int(str(value).strip())
    if kind is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if kind is str:
        if isinstance(value, (dict, list)):
            raise TypeError(value)
        return str(value)
    raise TypeError(kind)


def knob_specs(cls: type) -> dict[str, KnobSpec]:
    """Every knob of a config dataclass, by name, in declaration order."""
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        specs[f.name] = KnobSpec(f.name, hints[f.name], f.default, meta.get("low"), meta.get("high"),
                                 meta.get("choices"), meta.get("help", ""),
                                 meta.get("form"))
    return specs


def build_config(cls: type, values: Mapping[str, Any]) -> Any:
    """Instantiate ``cls`` from ``values``, rejecting unknown keys and bad values by name."""
    specs = knob_specs(cls)
    for key in values:
        if key not in specs:
            raise UsageError(f"unknown knob '{key}'; known knobs: {', '.join(sorted(specs))}")
    return cls(**{k: specs[k].coerce(v) for k, v in values.items()})
