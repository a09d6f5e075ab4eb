"""What a comparison trains: every (method, column, seed) cell, each at the knobs it runs with.

A column is one recipe: a preset (or the embedded ``digits`` one) and, with ``--pairs``, the
teacher and student architectures put on it. Every method of a column trains on the same
recipe, so that its rows differ only by method; ``--set`` and ``--epochs`` apply to all.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from kd_platform.errors import UsageError
from kd_platform.methods import get_method, method_names
from kd_platform.methods.base import MethodKind
from kd_platform.run.spec import Assets, RunSpec
from kd_platform.sweep.presets import load_preset, preset_for_method, preset_methods, preset_names

DEFAULT_PRESET = "digits"
PRIMARY = "test/acc/students_mean"
"""The table's figure: the students' mean test accuracy at the last epoch."""


@dataclass(frozen=True)
class Column:
    """One recipe of the table: ``label`` is the pair ``teacher:student`` or the student's name."""
    label: str
    preset: str
    dataset: str
    student: str
    teacher: str | None = None   # from --pairs (or the preset's teacher_arch where an offline method runs)
    explicit_pair: bool = False  # given with --pairs

    def lookup_pairs(self, method: str) -> list[str]:
        """The reference file's ``pair`` keys ``method`` may be listed under, most specific first."""
        if self.teacher and get_method(method).kind != MethodKind.ONLINE:
            return [f"{self.teacher}:{self.student}", self.student]
        return [self.student]


@dataclass
class Cell:
    """One method on one column: what every seed of it trains."""
    key: str
    method: str
    column: str                    # the column's label
    fixed: dict[str, Any]          # every knob but the seed
    assets: Assets = field(default_factory=Assets)
    knobs_from: str = "preset"     # "preset", or "sweep <run id>" with --tuned

    def spec(self, seed: int) -> RunSpec:
        return RunSpec.from_flat(self.method, self.fixed, seed, self.assets)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "assets": asdict(self.assets)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Cell":
        return Cell(d["key"], d["method"], d["column"], dict(d["fixed"]), Assets.from_json(d.get("assets")),
                    d.get("knobs_from", "preset"))


def cell_key(method: str, column: str) -> str:
    return f"{method}@{column}"


def check_methods(methods: Sequence[str]) -> list[str]:
    known = method_names()
    for m in methods:
        if m not in known:
            raise UsageError(f"unknown method '{m}'; known: {', '.join(known)}")
    if len(set(methods)) != len(methods):
        twice = next(m for m in methods if methods.count(m) > 1)
        raise UsageError(f"method '{twice}' is listed twice")
    return list(methods)


def parse_pairs(text: str | None) -> list[tuple[str, str]]:
    """``--pairs T:S,T2:S2`` as (teacher, student) pairs, architectures checked."""
    if text is None:
        return []
    from kd_platform.models import model_names
    pairs = []
    for item in text.split(","):
        teacher, sep, student = item.strip().partition(":")
        if not sep or not teacher or not student:
            raise UsageError(f"--pairs: '{item.strip()}' is not TEACHER:STUDENT (e.g. resnet32x4:resnet8x4)")
        for arch in (teacher, student):
            if arch not in model_names():
                raise UsageError(f"--pairs: unknown architecture '{arch}' in '{item.strip()}'; known: "
                                 f"{', '.join(model_names())}")
        pairs.append((teacher, student))
    if len(set(pairs)) != len(pairs):
        raise UsageError("--pairs: a pair is listed twice")
    return pairs


def _preset_of_pair(teacher: str, student: str) -> str:
    """The one preset whose teacher and student are this pair."""
    found = [p for p in preset_names()
             if (load_preset(p).get("teacher_arch"), load_preset(p).get("arch")) == (teacher, student)]
    if not found:
        raise UsageError(f"--pairs: no preset trains {teacher}:{student}; name the recipe with --preset "
                         f"(its teacher and student are then replaced by the pair)")
    if len(found) > 1:
        raise UsageError(f"--pairs: {teacher}:{student} is trained by presets {', '.join(found)}; name one with "
                         f"--preset")
    return found[0]


def plan_columns(methods: Sequence[str], preset: str | None, pairs: Sequence[tuple[str, str]],
                 sets: Mapping[str, Any]) -> list[Column]:
    """The table's columns, with every preset checked to serve every method."""
    online = [m for m in methods if get_method(m).kind == MethodKind.ONLINE]
    if pairs and online:
        raise UsageError(f"--pairs: '{online[0]}' is an online method (its peers have no teacher); compare it "
                         f"without --pairs, on a preset's network")
    columns = []
    wanted: list[tuple[str | None, str | None]] = list(pairs) or [(None, None)]
    for teacher, student in wanted:
        name = preset or (_preset_of_pair(teacher, student) if teacher and student else DEFAULT_PRESET)
        served = preset_methods(name)
        for m in methods:
            if m not in served:
                raise UsageError(f"preset '{name}' is a recipe for {', '.join(served)}, not '{m}'")
        knobs = {**load_preset(name), **sets}
        student = student or str(knobs.get("arch"))
        if teacher is None and any(get_method(m).kind == MethodKind.OFFLINE for m in methods):
            teacher = str(knobs.get("teacher_arch") or _default_teacher(methods))
        label = f"{teacher}:{student}" if teacher else student
        columns.append(Column(label, name, str(knobs.get("dataset")), student, teacher, bool(pairs)))
    return columns


def _default_teacher(methods: Sequence[str]) -> str:
    """The teacher an offline method trains when its recipe names none (its ``teacher_arch`` default)."""
    from kd_platform.config.knobs import knob_specs
    offline = next(m for m in methods if get_method(m).kind == MethodKind.OFFLINE)
    return str(knob_specs(get_method(offline).Config)["teacher_arch"].default)


def cell_knobs(method: str, column: Column, sets: Mapping[str, Any], epochs: int | None,
               tuned: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The flat knobs of ``method`` on ``column``: its preset's, the pair's architectures, the
    tuned knobs, then ``--set`` (only the keys the method has) and ``--epochs``."""
    from kd_platform.config.knobs import knob_specs
    from kd_platform.config.recipe import Recipe
    own = set(knob_specs(Recipe)) | set(knob_specs(get_method(method).Config))
    knobs = preset_for_method(column.preset, method)
    if column.explicit_pair:
        knobs["arch"] = column.student
        if "teacher_arch" in own and column.teacher:
            knobs["teacher_arch"] = column.teacher
    knobs.update(tuned or {})
    knobs.update({k: v for k, v in sets.items() if k in own})
    if epochs is not None:
        knobs["epochs"] = epochs
    return knobs


def check_sets(methods: Sequence[str], sets: Mapping[str, Any]) -> None:
    """A ``--set`` key no listed method has is a typo, not a knob to skip."""
    from kd_platform.config.knobs import knob_specs
    from kd_platform.config.recipe import Recipe
    own = set(knob_specs(Recipe)).union(*(knob_specs(get_method(m).Config) for m in methods))
    unknown = sorted(set(sets) - own)
    if unknown:
        raise UsageError(f"--set: unknown knob '{unknown[0]}' for methods {', '.join(methods)}")
    if "seed" in sets:
        raise UsageError("--set: 'seed' is not a knob here; --seeds N trains seeds 0..N-1 (--seed shifts them)")


def seeds_of(first: int, n: int) -> list[int]:
    return list(range(first, first + n))
