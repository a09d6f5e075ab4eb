"""Fault injection for reliability tests, driven by ``$KD_PLATFORM_FAULT``.

Ray's worker processes inherit the driver's environment, so a test can make a trial
misbehave deep inside Ray without a special method or a mock:

- ``nan@E``: the training loss becomes NaN in epoch ``E`` (1-based);
- ``exit@E``: the process dies abruptly at the start of epoch ``E`` unless the file
  named by ``$KD_PLATFORM_FAULT_ONCE`` exists (it is created first, so only one death).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

ENV, ONCE_ENV = "KD_PLATFORM_FAULT", "KD_PLATFORM_FAULT_ONCE"


def _planned(kind: str) -> int | None:
    spec = os.environ.get(ENV, "")
    name, _, epoch = spec.partition("@")
    return int(epoch) if name == kind and epoch.isdigit() else None


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
