"""Ablation plans: a grid over a few knobs' listed values, each cell repeated over seeds,
every other knob pinned (to its declared default, or to the best trial of an earlier sweep)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from kd_platform.errors import UsageError
from kd_platform.methods import get_method
from kd_platform.sweep.space import SearchSpace, all_specs, resolve


@dataclass
class Ablation:
    knobs: list[str]
    grid: dict[str, list[Any]]
    seeds: list[int]
    defaults: dict[str, Any]      # the reference value of each ablated knob (tables show differences to it)
    pinned: dict[str, Any]        # swept knobs that are not ablated, pinned for every cell
    from_sweep: str | None = None

    @property
    def cells(self) -> int:
        return math.prod(len(v) for v in self.grid.values())

    @property
    def trials(self) -> int:
        return self.cells * len(self.seeds)

    def to_json(self) -> dict[str, Any]:
        return {"knobs": self.knobs, "grid": self.grid, "seeds": self.seeds, "defaults": self.defaults,
                "pinned": self.pinned, "from_sweep": self.from_sweep}


def listed_values(space: SearchSpace, knob: str) -> list[Any]:
    dist = space.swept.get(knob)
    if dist is None:
        where = "fixed" if knob in space.fixed else "not in"
        raise UsageError(f"--ablate: knob '{knob}' is {where} {space.source}; ablation needs a swept knob "
                         f"with listed values")
    values = dist.get("values")
    if not values:
        raise UsageError(f"--ablate: swept knob '{knob}' in {space.source} is a range; add 'values: [...]' "
                         f"to list the values to ablate")
    return list(values)


def plan_ablation(space: SearchSpace, knobs_arg: str, n_seeds: int, first_seed: int,
                  best: dict[str, Any] | None = None, from_sweep: str | None = None,
                  epochs: int | None = None, steps_per_epoch: int | None = None) -> Ablation:
    """The grid for ``--ablate k1,k2 --seeds N``; ``best`` pins the other knobs to an earlier sweep's best.
    A grid with a degenerate cell, or with values that cannot differ in a run of ``epochs``
    epochs of ``steps_per_epoch`` steps, is refused before anything starts."""
    knobs = [k.strip() for k in knobs_arg.split(",") if k.strip()]
    if not knobs:
        raise UsageError("--ablate needs at least one knob name")
    if len(set(knobs)) != len(knobs):
        raise UsageError(f"--ablate names a knob twice: {knobs_arg}")
    specs = all_specs(space.method)
    for k in knobs:
        if k not in specs:
            raise UsageError(f"--ablate: unknown knob '{k}' for method '{space.method}'")
    grid = {k: listed_values(space, k) for k in knobs}
    reference = {k: specs[k].coerce(v) for k, v in (best or {}).items() if k in specs}
    defaults = {k: reference.get(k, specs[k].default) for k in knobs}
    pinned = {k: reference.get(k, specs[k].default) for k in space.swept if k not in grid}
    base = {**space.fixed, **pinned, "epochs": epochs or space.fixed.get("epochs", space.epochs)}
    _check_cells(space.method, base, grid, steps_per_epoch)
    return Ablation(knobs, grid, [first_seed + i for i in range(n_seeds)], defaults, pinned, from_sweep)


def _check_cells(method: str, base: dict[str, Any], grid: dict[str, list[Any]], steps: int | None) -> None:
    cls = get_method(method)
    cells = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    for cell in cells:
        recipe, cfg = resolve(method, {**base, **cell})
        why = cls.degenerate(cfg, recipe)
        if why:
            where = ", ".join(f"{k}={v}" for k, v in cell.items())
            raise UsageError(f"--ablate: the cell {where} is degenerate: {why}")
    for k, values in grid.items():
        # Values of k that train like another of its values in every combination of the other
        # ablated knobs can never differ: the table would show one result twice.
        alike_everywhere: set[Any] | None = None
        reason = ""
        for other in (c for c in cells if c[k] == values[0]):
            classes: dict[Any, list[Any]] = {}
            for v in values:
                recipe, cfg = resolve(method, {**base, **other, k: v})
                void = cls.void_knobs(cfg, recipe, steps).get(k)
                classes.setdefault(void.same_as if void else v, []).append(v)
                reason = void.reason if void else reason
            alike = {v for group in classes.values() if len(group) > 1 for v in group}
            alike_everywhere = alike if alike_everywhere is None else alike_everywhere & alike
            if not alike_everywhere:
                break
        if alike_everywhere:
            same = [v for v in values if v in alike_everywhere]
            if len(same) == len(values):
                raise UsageError(f"--ablate {k}: no value of it changes this run: {reason}; ablate another knob")
            raise UsageError(f"--ablate {k}: values {' and '.join(map(str, same))} train identically in this run, "
                             f"as {reason}; drop values or lengthen the run")


def best_of_sweep(uri: str, run_id: str) -> dict[str, str]:
    """The best knobs recorded on an earlier sweep's parent run (its ``best.*`` tags)."""
    from kd_platform import tracking
    try:
        run = tracking.client(uri).get_run(run_id)
    except Exception:  # MLflow raises its own exception types for unknown ids
        raise UsageError(f"--from-sweep: no MLflow run '{run_id}' in {uri}") from None
    best = {k[len("best."):]: v for k, v in run.data.tags.items() if k.startswith("best.")}
    if not best:
        raise UsageError(f"--from-sweep: run '{run_id}' is not a finished sweep (it has no best.* tags)")
    return best
