"""What a sweep prints while it runs: one line per finished trial, not Ray Tune's tables.

Each line names the stage, the trial's place in it, how it ended, its epochs, its metric and
its swept knobs (numbers shortened to three significant digits). What a trial's metrics warn
about (students that ended identical) is counted and said once at the end, not per worker.
``-v`` brings Ray Tune's own tables and the workers' logs back instead.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from ray.tune import Callback

from kd_platform.run.evaluation import collapsed


def short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class Progress(Callback):
    def __init__(self, metric: str, epochs: int, swept: list[str], total: int, stage: str,
                 out: TextIO | None = None) -> None:
        self.metric, self.epochs, self.swept, self.total, self.stage = metric, epochs, swept, total, stage
        self.out = out
        self.done = 0
        self.warned: dict[str, list[str]] = {}   # warning -> trial ids
        self.last: dict[str, dict[str, Any]] = {}

    def start(self, stage: str, total: int) -> None:
        """The next stage (the confirmation after the search) counts its own trials."""
        self.stage, self.total, self.done = stage, total, 0

    def _print(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.last[trial.trial_id] = result
        if collapsed(result):
            ids = self.warned.setdefault("the students ended identical (one network, not an online distillation)",
                                         [])
            if trial.trial_id not in ids:
                ids.append(trial.trial_id)

    def _line(self, trial: Any, outcome: str) -> str:
        self.done += 1
        result = self.last.get(trial.trial_id, {})
        epoch = int(result.get("epoch", 0))
        value = result.get(self.metric)
        shown = f"{value:6.2f}" if isinstance(value, (int, float)) else "   n/a"
        knobs = " ".join(f"{k}={short(trial.config.get(k))}" for k in self.swept if k in trial.config)
        seed = trial.config.get("seed")
        seed_part = f" seed={seed}" if seed is not None else ""
        width = len(str(self.total))
        return (f"  {self.stage} {self.done:>{width}}/{self.total}  {outcome:<9} epoch {epoch}/{self.epochs}  "
                f"{shown}  {knobs}{seed_part}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epoch = int(self.last.get(trial.trial_id, {}).get("epoch", 0))
        self._print(self._line(trial, "completed" if epoch >= self.epochs else "stopped"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = str(getattr(trial, "error_msg", "") or "").strip().splitlines()
        self._print(self._line(trial, "FAILED") + (f"  ({error[-1][:160]})" if error else ""))

    def warnings(self) -> list[str]:
        return [f"{len(ids)} trial{'s' if len(ids) > 1 else ''}: {what}" for what, ids in self.warned.items()]
