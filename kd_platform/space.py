"""Search-space files: ``search_spaces/<method>.yaml``.

A file names the method's swept knobs (each with a distribution), its fixed knobs, the
metric and mode the sweep optimises, ASHA's settings and default sample and epoch
counts. It is validated against the method's and the recipe's knob declarations before
anything starts, so a typo fails in a second with the file and key named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .engine import RunSpec
from .errors import UsageError
from .knobs import KnobSpec, knob_specs
from .methods import get_method
from .recipe import Recipe

SPACE_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
KINDS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "int": ("low", "high"),
         "choice": ("values",)}


@dataclass
class SearchSpace:
    method: str
    source: str
    swept: dict[str, dict[str, Any]]
    fixed: dict[str, Any]
    metric: str = "val/acc/students_mean"
    mode: str = "max"
    samples: int = 8
    epochs: int = 5
    grace_period: int = 1
    reduction_factor: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def fix(self, overrides: dict[str, Any]) -> None:
        """Pin knobs given with ``--set``: they leave the swept set and join the fixed one."""
        specs = all_specs(self.method)
        for key, value in overrides.items():
            if key not in specs:
                raise UsageError(f"--set: unknown knob '{key}' for method '{self.method}'")
            self.swept.pop(key, None)
            self.fixed[key] = specs[key].coerce(value)
        RunSpec.from_flat(self.method, self.fixed, 0)

    def optuna_distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
        out = {}
        for key, d in self.swept.items():
            if d["type"] == "choice":
                out[key] = CategoricalDistribution(list(d["values"]))
            elif d["type"] == "int":
                out[key] = IntDistribution(d["low"], d["high"], log=bool(d.get("log", False)))
            else:
                out[key] = FloatDistribution(d["low"], d["high"], log=d["type"] == "loguniform")
        return out


def all_specs(method: str) -> dict[str, KnobSpec]:
    return {**knob_specs(Recipe), **knob_specs(get_method(method).Config)}


def default_space_path(method: str) -> Path:
    return SPACE_DIR / f"{method}.yaml"


def load_space(method: str, path: Path | None = None) -> SearchSpace:
    get_method(method)  # unknown method: fail before looking for a file
    path = Path(path) if path else default_space_path(method)
    if not path.is_file():
        raise UsageError(f"search space file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}: malformed YAML{where}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping with 'swept' and 'fixed' keys")
    return parse_space(method, raw, str(path))


def parse_space(method: str, raw: dict[str, Any], source: str) -> SearchSpace:
    known = {"method", "metric", "mode", "samples", "epochs", "asha", "fixed", "swept", "description"}
    for key in raw:
        if key not in known:
            raise UsageError(f"{source}: unknown top-level key '{key}'; allowed: {', '.join(sorted(known))}")
    if raw.get("method", method) != method:
        raise UsageError(f"{source}: file is for method '{raw['method']}', not '{method}'")
    specs = all_specs(method)
    fixed = dict(raw.get("fixed") or {})
    swept = dict(raw.get("swept") or {})
    if not swept:
        raise UsageError(f"{source}: 'swept' is empty; a search space needs at least one swept knob")
    for key, dist in swept.items():
        swept[key] = _check_dist(source, key, dist, specs)
        if key in fixed:
            raise UsageError(f"{source}: knob '{key}' is both swept and fixed")
    for key in fixed:
        if key not in specs:
            raise UsageError(f"{source}: fixed knob '{key}' is not a knob of method '{method}'")
        fixed[key] = specs[key].coerce(fixed[key])
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise UsageError(f"{source}: mode must be 'max' or 'min', not '{mode}'")
    asha = raw.get("asha") or {}
    space = SearchSpace(method, source, swept, fixed, metric=str(raw.get("metric", "val/acc/students_mean")),
                        mode=mode, samples=_positive(source, "samples", raw.get("samples", 8)),
                        epochs=_positive(source, "epochs", raw.get("epochs", 5)),
                        grace_period=_positive(source, "asha.grace_period", asha.get("grace_period", 1)),
                        reduction_factor=_positive(source, "asha.reduction_factor", asha.get("reduction_factor", 2)))
    RunSpec.from_flat(method, fixed, 0)
    return space


def _positive(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{source}: '{key}' must be a positive integer, not {value!r}")
    return value


def _check_dist(source: str, key: str, dist: Any, specs: dict[str, KnobSpec]) -> dict[str, Any]:
    if key not in specs:
        raise UsageError(f"{source}: swept knob '{key}' is not a knob of this method")
    if not isinstance(dist, dict) or dist.get("type") not in KINDS:
        raise UsageError(f"{source}: swept knob '{key}' needs 'type' one of {', '.join(KINDS)}")
    missing = [f for f in KINDS[dist["type"]] if f not in dist]
    if missing:
        raise UsageError(f"{source}: swept knob '{key}' ({dist['type']}) lacks '{missing[0]}'")
    spec = specs[key]
    out = dict(dist)
    try:
        if dist["type"] == "choice":
            if not isinstance(dist["values"], list) or not dist["values"]:
                raise UsageError(f"{source}: swept knob '{key}': 'values' must be a non-empty list")
            out["values"] = [spec.coerce(v) for v in dist["values"]]
        else:
            out["low"], out["high"] = spec.coerce(dist["low"]), spec.coerce(dist["high"])
            if "values" in dist:  # optional: the points an ablation grid visits
                out["values"] = [spec.coerce(v) for v in dist["values"]]
                if not all(out["low"] <= v <= out["high"] for v in out["values"]):
                    raise UsageError(f"{source}: swept knob '{key}': 'values' must lie in [low, high]")
            if out["low"] >= out["high"]:
                raise UsageError(f"{source}: swept knob '{key}': low must be below high")
            if dist["type"] == "loguniform" and out["low"] <= 0:
                raise UsageError(f"{source}: swept knob '{key}': loguniform needs low > 0")
    except UsageError as exc:
        msg = str(exc)
        raise UsageError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    return out
