"""Disk space under a sweep's (or a comparison's) directory.

A disk that fills while Ray Tune saves its own state leaves that state cut short, and no
``--resume`` can trust it. So a driver keeps a margin free: it refuses to start below it,
and stops like Ctrl-C (Tune saves its state; the trials resume) when a trial's result finds
less. A disk that fills faster than that is caught at ``--resume``, which names the damaged file.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kd_platform.errors import OneLineFailure, UsageError

MIN_FREE_ENV = "KD_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 64
MIB = 2 ** 20
# Below this, a failure is taken for a full disk: Tune reports whatever broke, not why.
LOW_DISK_BYTES = 16 * MIB


def min_free_bytes() -> int:
    """The margin kept free: ``$KD_MIN_FREE_MB`` MiB (default 64; 0 turns the guard off)."""
    raw = os.environ.get(MIN_FREE_ENV, str(DEFAULT_MIN_FREE_MB))
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{MIN_FREE_ENV}={raw!r} is not a number of MiB") from None
    if value < 0:
        raise UsageError(f"{MIN_FREE_ENV}={raw!r} must be >= 0")
    return int(value * MIB)


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` or its nearest existing parent."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def check_free(path: Path) -> None:
    """A driver does not start where the margin is already gone (nothing is written)."""
    floor, free = min_free_bytes(), free_bytes(path)
    if floor and free is not None and free < floor:
        raise OneLineFailure(f"disk nearly full under {path} ({free // MIB} MiB free, {floor // MIB} MiB needed; "
                             f"{MIN_FREE_ENV} sets the margin): free space first")


def _local(path: str) -> Path | None:
    return None if "://" in path else Path(path)


class DiskGuard(Callback):
    """A Tune callback that stops the experiment like Ctrl-C when a result finds less free space
    than the margin, or than two of the largest checkpoint yet for every trial at once (a new
    checkpoint is written before the old one is deleted)."""

    def __init__(self, folders: list[str], concurrent: int) -> None:
        self.folders = [p for p in map(_local, folders) if p is not None]
        self.concurrent, self.largest = max(1, concurrent), 0
        self.floor = min_free_bytes()
        self.low: tuple[Path, int, int] | None = None

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        path = _local(str(getattr(checkpoint, "path", "")) or "")
        if path is not None and path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            self.largest = max(self.largest, size)
        self._check()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._check()

    def needed(self) -> int:
        return max(self.floor, 2 * self.concurrent * self.largest) if self.floor else 0

    def _check(self) -> None:
        need = self.needed()
        if not need or self.low is not None or threading.current_thread() is not threading.main_thread():
            return
        for folder in self.folders:
            free = free_bytes(folder)
            if free is not None and free < need:
                self.low = (folder, free, need)
                os.kill(os.getpid(), signal.SIGINT)  # Tune's own Ctrl-C: state saved, trials resumable
                return

    def message(self) -> str:
        assert self.low is not None
        folder, free, need = self.low
        return (f"disk nearly full under {folder} ({free // MIB} MiB free, {need // MIB} MiB kept for checkpoints "
                f"and Ray Tune's state; {MIN_FREE_ENV} sets the margin): stopped with everything saved; "
                f"free space, then --resume")


def _readable(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            if path.name.startswith("experiment_state"):
                json.load(f)
            else:
                pickle.load(f)  # noqa: S301 - Tune's own files in the user's own sweep directory
        return True
    except Exception:  # noqa: BLE001 - any failure to read is damage
        return False


def check_tune_state(experiment: str) -> None:
    """Before ``--resume`` writes anything: every file Tune restores from reads back whole.
    Tune would otherwise restore what it can and silently run fewer trials than asked."""
    folder = _local(experiment)
    if folder is None or not folder.is_dir():
        return
    for pattern in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl", "tuner.pkl"):
        found = sorted(glob.glob(os.path.join(glob.escape(str(folder)), pattern)))
        path = Path(found[-1]) if found else None  # the newest: the one Tune restores from
        if path is not None and not _readable(path):
            raise UsageError(f"--resume: Ray Tune's state file '{path}' is damaged ({path.stat().st_size} bytes; "
                             f"a disk that filled while Tune saved it cuts it short): this experiment cannot "
                             f"resume. Its finished trials stay in MLflow; start a new sweep for the rest")
