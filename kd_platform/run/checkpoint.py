"""Checkpoint files: written atomically, read back with ``weights_only=True``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from kd_platform.errors import UsageError

STATE_FILE = "state.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash mid-write never replaces a good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checked(path: Path) -> Any:
    """Load a checkpoint with ``weights_only=True``; a truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise UsageError(f"checkpoint '{path}' is corrupt or truncated ({type(exc).__name__})") from None


CHECKPOINT_TAG = "checkpoint_dir"
"""MLflow tag naming where a run's latest checkpoint directory (holding ``STATE_FILE``) is."""


def checkpoint_location(checkpoint: Any) -> str | None:
    """Where a Ray ``Checkpoint`` lives: a local path, or ``scheme://path`` on another filesystem."""
    if checkpoint is None or not getattr(checkpoint, "path", None):
        return None
    path = str(checkpoint.path)
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local") if fs is not None else "local"
    return path if kind == "local" or "://" in path else f"{kind}://{path}"
