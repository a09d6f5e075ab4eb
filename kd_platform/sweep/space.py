"""Search-space files: ``search_spaces/<method>.yaml``.

A file names the method's swept knobs (each with a distribution), its fixed knobs, the
metric and mode the sweep optimises, ASHA's settings and default sample and epoch
counts. It is validated against the method's and the recipe's knob declarations before
anything starts, so a typo fails in a second with the file and key named.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kd_platform.config.knobs import KnobSpec, knob_specs
from kd_platform.config.recipe import Recipe
from kd_platform.errors import UsageError
from kd_platform.methods import get_method
from kd_platform.methods.base import ANY
from kd_platform.run.spec import RunSpec

SPACE_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
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
        out: dict[str, Any] = {}
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
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file (a search space is UTF-8 YAML)") from None
    except _DuplicateKey as exc:
        raise UsageError(f"{path}: key '{exc}' appears twice{exc.where}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}: malformed YAML{where}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping with 'swept' and 'fixed' keys")
    return parse_space(method, raw, str(path))


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: Any) -> None:
        super().__init__(str(key))
        self.where = f" (line {mark.line + 1})" if mark is not None else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML whose mappings refuse a key given twice: PyYAML keeps the last one silently,
    so a knob swept twice would be swept once, with whichever distribution came last."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(key, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _mapping(source: str, raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{source}: '{key}' must be a mapping (key: value lines), not a {type(value).__name__}")
    return dict(value)


def parse_space(method: str, raw: dict[str, Any], source: str) -> SearchSpace:
    known = {"method", "metric", "mode", "samples", "epochs", "asha", "fixed", "swept", "description"}
    for key in raw:
        if key not in known:
            raise UsageError(f"{source}: unknown top-level key '{key}'; allowed: {', '.join(sorted(known))}")
    if raw.get("method", method) != method:
        raise UsageError(f"{source}: file is for method '{raw['method']}', not '{method}'")
    specs = all_specs(method)
    fixed = _mapping(source, raw, "fixed")
    swept = _mapping(source, raw, "swept")
    if not swept:
        raise UsageError(f"{source}: 'swept' is empty; a search space needs at least one swept knob")
    for key, dist in swept.items():
        swept[key] = _check_dist(source, key, dist, specs)
        if key in fixed:
            raise UsageError(f"{source}: knob '{key}' is both swept and fixed")
    for key in fixed:
        if key not in specs:
            raise UsageError(f"{source}: fixed knob '{key}' is not a knob of method '{method}'")
        try:
            fixed[key] = specs[key].coerce(fixed[key])
        except UsageError as exc:
            raise UsageError(f"{source}: fixed {exc}") from None
    metric = str(raw.get("metric", "val/acc/students_mean"))
    check_metric(method, metric, fixed, swept, source)
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise UsageError(f"{source}: mode must be 'max' or 'min', not '{mode}'")
    asha = _mapping(source, raw, "asha")
    unknown = sorted(set(asha) - {"grace_period", "reduction_factor"})
    if unknown:
        raise UsageError(f"{source}: unknown ASHA setting 'asha.{unknown[0]}'; allowed: grace_period, "
                         f"reduction_factor")
    space = SearchSpace(method, source, swept, fixed, metric=metric,
                        mode=mode, samples=_positive(source, "samples", raw.get("samples", 8)),
                        epochs=_positive(source, "epochs", raw.get("epochs", 5)),
                        grace_period=_positive(source, "asha.grace_period", asha.get("grace_period", 1)),
                        reduction_factor=_positive(source, "asha.reduction_factor", asha.get("reduction_factor", 2)))
    if space.reduction_factor < 2:
        raise UsageError(f"{source}: 'asha.reduction_factor' must be at least 2 (ASHA keeps 1 in that many "
                         f"trials at each rung), not {space.reduction_factor}")
    RunSpec.from_flat(method, fixed, 0)
    return space


MAX_CORNERS = 20_000


def resolve(method: str, flat: dict[str, Any]) -> tuple[Recipe, Any]:
    """The recipe and method config of a flat mapping of knobs, without a run's other checks."""
    return RunSpec.split(method, flat).resolved()


def corners(space: SearchSpace, epochs: int | None = None) -> list[dict[str, Any]]:
    """Every combination of the swept choices and the ends of the swept ranges, over the fixed
    knobs. A degenerate region of a space (a boolean off, a weight at 0) reaches a corner."""
    axes = [[(k, v) for v in (d["values"] if d["type"] == "choice" else [d["low"], d["high"]])]
            for k, d in space.swept.items()]
    run = {"epochs": epochs or space.fixed.get("epochs", space.epochs)}
    return [{**space.fixed, **run, **dict(combo)}
            for combo in itertools.islice(itertools.product(*axes), MAX_CORNERS)]


def check_corners(space: SearchSpace, epochs: int | None = None) -> None:
    """A searched space must not sample a degenerate configuration, and each swept knob must
    have an effect somewhere in it: a sweep that trains either reports noise about another
    method. (An ablation pins the knobs it does not ablate and checks its own cells.)"""
    cls = get_method(space.method)
    void_everywhere = set(space.swept)
    reasons: dict[str, str] = {}
    for flat in corners(space, epochs):
        recipe, cfg = resolve(space.method, flat)
        why = cls.degenerate(cfg, recipe)
        if why:
            swept = ", ".join(f"{k}={flat[k]}" for k in space.swept)
            raise UsageError(f"{space.source}: the space samples degenerate configurations ({swept}): {why}; "
                             f"narrow the space or pin a knob with --set")
        void = cls.void_knobs(cfg, recipe)
        for k in list(void_everywhere):
            if k in void and void[k].same_as is ANY:
                reasons[k] = void[k].reason
            else:
                void_everywhere.discard(k)
    if void_everywhere:
        k = sorted(void_everywhere)[0]
        raise UsageError(f"{space.source}: swept knob '{k}' has no effect anywhere in this space: {reasons[k]}; "
                         f"pin it with --set or drop it from the space")


class _Shapes:
    """Shape information of a small dataset: enough to build a method and read its networks."""
    num_classes, in_channels, image_size = 10, 1, 8


class _UntrainedTeachers:
    """Stands in for the engine's teacher provider: an untrained network of the asked
    architecture (the names of the networks a method evaluates do not depend on training)."""

    def __call__(self, arch: str) -> Any:
        from kd_platform.models import build_model
        return build_model(arch, _Shapes.num_classes, _Shapes.in_channels)

    def derived(self, *args: Any) -> Any:
        raise LookupError("derived teacher state")


@functools.lru_cache(maxsize=64)
def _network_names(method: str, knobs: tuple) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """``(evaluated networks, groups, online with peers)`` of ``method`` built with ``knobs``."""
    import torch

    from kd_platform.run.engine import build_method
    cls = get_method(method)
    try:
        m = build_method(RunSpec.from_flat(method, dict(knobs), 0), _Shapes(), torch.device("cpu"),
                         _UntrainedTeachers())
        nets, students, groups = tuple(m.eval_networks()), tuple(m.students), dict(m.groups)
    except (LookupError, AttributeError, TypeError, ValueError, RuntimeError):
        # Built only with the trained teacher: the networks the knobs name.
        cfg = RunSpec.from_flat(method, dict(knobs), 0).resolved()[1]
        students, groups = cls.student_names(cfg), cls.group_names(cfg)
        teacher = ["teacher"] if cls.kind == "offline" else []  # offline methods evaluate their teacher too
        nets = tuple(dict.fromkeys([*students, *(n for g in groups.values() for n in g), *teacher]))
    return nets, tuple(["students", *groups]), cls.kind == "online" and len(students) >= 2


def valid_metrics(method: str, fixed: dict[str, Any], swept: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The validation metrics a run of ``method`` reports every epoch (``engine.train_spec``),
    for the fixed knobs and, for swept integer knobs, the most networks they give."""
    variants = [dict(fixed)]
    for key, d in (swept or {}).items():
        if d["type"] == "int":
            variants.append({**fixed, key: d["high"]})
    names: dict[str, None] = {}
    for knobs in variants:
        nets, groups, online = _network_names(method, tuple(sorted(knobs.items())))
        names.update(dict.fromkeys(f"val/{k}/{n}" for k in ("acc", "ece", "nll") for n in nets))
        names.update(dict.fromkeys(f"val/acc/{g}_{s}" for g in groups for s in ("mean", "best")))
        if online:
            names.update(dict.fromkeys(f"val/diversity/{d}" for d in ("disagreement", "kl", "param_dist",
                                                                       "identical")))
    names.update(dict.fromkeys(["val/acc/best_network", "val/acc_best_epoch/students_mean"]))
    return list(names)


def check_metric(method: str, metric: str, fixed: dict[str, Any], swept: dict[str, dict[str, Any]],
                 source: str) -> None:
    """A sweep optimises a validation metric the method reports, never a test figure."""
    if metric.startswith("test/"):
        raise UsageError(f"{source}: metric '{metric}' is a test figure; sweeps tune on validation "
                         f"metrics only (val/...)")
    valid = valid_metrics(method, fixed, swept)
    if metric not in valid:
        shown = [m for m in valid if m.startswith("val/acc/")][:4] + [m for m in valid if "/ece/" in m][:1]
        raise UsageError(f"{source}: metric '{metric}' is not a validation metric method '{method}' reports; "
                         f"e.g. {', '.join(shown)}")


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
    if spec.type is int and dist["type"] in ("uniform", "loguniform"):
        raise UsageError(f"{source}: swept knob '{key}' is an integer; sweep it with type int or choice, "
                         f"not {dist['type']}")
    if spec.type in (bool, str) and dist["type"] != "choice":
        raise UsageError(f"{source}: swept knob '{key}' takes {spec.describe()}; sweep it with type choice")
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
