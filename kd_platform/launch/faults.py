"""Fault injection for reliability tests, driven by ``$KD_PLATFORM_FAULT``.

Ray's worker processes inherit the driver's environment, so a test can make a trial
misbehave deep inside Ray without a special method or a mock:

- ``nan@E``: the training loss becomes NaN in epoch ``E`` (1-based);
- ``exit@E``: the process dies abruptly at the start of epoch ``E`` unless the file
  named by ``$KD_PLATFORM_FAULT_ONCE`` exists (it is created first, so only one death);
- either form with ``:KNOB=VALUE`` appended (``nan@2:lr=0.5``) fires only in a run whose
  knob has that value, so one trial of a sweep fails while the others train normally.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

ENV, ONCE_ENV = "KD_PLATFORM_FAULT", "KD_PLATFORM_FAULT_ONCE"

# The environment is shared by every trial a process runs, so the knobs that a conditional
# fault tests must come from the run itself; whoever starts a run binds them here.
_bound: dict[str, Any] = {}


def bind(knobs: Mapping[str, Any]) -> None:
    """Record the knobs of the run this process is about to train."""
    _bound.clear()
    _bound.update(knobs)


def _same(actual: Any, wanted: str) -> bool:
    if str(actual).lower() == wanted.lower():
        return True
    try:
        return float(actual) == float(wanted)
    except (TypeError, ValueError):
        return False


def _planned(kind: str) -> int | None:
    spec = os.environ.get(ENV, "")
    name, _, rest = spec.partition("@")
    epoch, _, condition = rest.partition(":")
    if name != kind or not epoch.isdigit():
        return None
    if condition:
        knob, _, wanted = condition.partition("=")
        if knob not in _bound or not _same(_bound[knob], wanted):
            return None
    return int(epoch)


def at_epoch_start(epoch: int) -> None:
    if _planned("exit") == epoch + 1:
        marker = os.environ.get(ONCE_ENV)
        if marker and Path(marker).exists():
            return
        if marker:
            Path(marker).touch()
        os._exit(17)


def corrupt_loss(epoch: int, loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan") if _planned("nan") == epoch + 1 else loss


class _Injection:
    """The engine's ``RunHooks`` that fire the faults of ``$KD_PLATFORM_FAULT``."""

    def epoch_start(self, epoch: int) -> None:
        at_epoch_start(epoch)

    def loss(self, epoch: int, loss: torch.Tensor) -> torch.Tensor:
        return corrupt_loss(epoch, loss)


def hooks(knobs: Mapping[str, Any]) -> _Injection:
    """Bind the knobs of the run this process is about to train and return the hooks that
    inject its planned faults (``engine.train``'s ``hooks``)."""
    bind(knobs)
    return _Injection()
