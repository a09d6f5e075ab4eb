"""What the data layer hands the engine: a batch, and the interface every dataset implements."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from torch import Tensor

log = logging.getLogger("kd_platform.data")


@dataclass
class Batch:
    """One training batch. ``views`` holds one augmented view per network when the
    method asked for per-network views (``Method.num_views``), else a single shared view."""
    views: list[Tensor]
    y: Tensor

    @property
    def x(self) -> Tensor:
        return self.views[0]

    def view(self, i: int) -> Tensor:
        return self.views[i % len(self.views)]



class DataModule(Protocol):
    num_classes: int
    in_channels: int
    image_size: int
    path: str

    def steps_per_epoch(self) -> int: ...

    def train_batches(self, epoch: int, num_views: int) -> Iterator[Batch]: ...

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]: ...

    def train_eval_batches(self, n: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class PathNote:
    """Which data path a module takes and why, logged at INFO the first time it yields a
    training batch: a module built only to check a recipe or to read its shapes stays
    quiet, so that a command's one-line error stays its only line."""
    dataset: str
    path: str
    reason: str
    _logged: bool = field(default=False, repr=False)

    def log_once(self) -> None:
        if not self._logged:
            log.info("%s: %s data path (%s)", self.dataset, self.path, self.reason)
            self._logged = True
