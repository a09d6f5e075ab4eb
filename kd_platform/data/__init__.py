"""Datasets behind one interface, registered by name.

A :class:`DataModule` yields training batches already on the device (sharded across
data-parallel workers, every shuffle and augmentation drawn from generators derived
from ``(seed, epoch, rank)`` so a resumed run sees the same stream) and evaluation
batches for the validation and test splits. Its ``path`` says how the images get there:
``"device"`` (held on the device, augmented in whole batches, ``device_data``) or
``"loader"`` (DataLoader workers, one image at a time, ``loader_data``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from ..methods.base import Batch
from ..recipe import Recipe
from ..registry import Registry

log = logging.getLogger(__name__)

_BUILDERS: Registry[Callable[..., "DataModule"]] = Registry("dataset", __name__, __path__)
_CHECKS: dict[str, Callable[[Recipe], None]] = {}


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


def register_dataset(name: str, check: Callable[[Recipe], None] | None = None) -> Callable:
    """Decorator registering ``builder(recipe, seed, device, rank, world) -> DataModule``;
    ``check(recipe)`` raises a UsageError for knobs the dataset cannot honour."""
    def wrap(builder: Callable[..., DataModule]) -> Callable[..., DataModule]:
        _BUILDERS.add(name, builder)
        if check is not None:
            _CHECKS[name] = check
        return builder
    return wrap


def dataset_names() -> list[str]:
    return _BUILDERS.names()


def check_recipe(recipe: Recipe) -> None:
    """Fail now, with a UsageError, if the data of ``recipe`` (the recipe the data sees) cannot
    be built as asked: an unknown dataset, ``data_path=device`` with an augmentation that has
    no device form, or a knob the dataset itself refuses (digits has no loader path)."""
    _BUILDERS.get(recipe.dataset)
    recipe.check_data_path()
    if recipe.dataset in _CHECKS:
        _CHECKS[recipe.dataset](recipe)


def build_data(recipe: Recipe, seed: int, device: torch.device, rank: int = 0, world: int = 1) -> DataModule:
    check_recipe(recipe)
    return _BUILDERS.get(recipe.dataset)(recipe, seed, device, rank, world)
