"""Datasets behind one interface, registered by name.

A :class:`DataModule` yields training batches already on the device (sharded across
data-parallel workers, every shuffle and augmentation drawn from generators derived
from ``(seed, epoch, rank)`` so a resumed run sees the same stream) and evaluation
batches for the validation and test splits.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from ..errors import UsageError
from ..methods.base import Batch
from ..recipe import Recipe

_BUILDERS: dict[str, Callable[..., "DataModule"]] = {}
_loaded = False


class DataModule(Protocol):
    num_classes: int
    in_channels: int
    image_size: int

    def steps_per_epoch(self) -> int: ...

    def train_batches(self, epoch: int, num_views: int) -> Iterator[Batch]: ...

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]: ...


def register_dataset(name: str) -> Callable:
    """Decorator registering ``builder(recipe, seed, device, rank, world) -> DataModule``."""
    def wrap(builder: Callable[..., DataModule]) -> Callable[..., DataModule]:
        _BUILDERS[name] = builder
        return builder
    return wrap


def dataset_names() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def build_data(recipe: Recipe, seed: int, device: torch.device, rank: int = 0, world: int = 1) -> DataModule:
    _load_all()
    if recipe.dataset not in _BUILDERS:
        raise UsageError(f"unknown dataset '{recipe.dataset}'; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[recipe.dataset](recipe, seed, device, rank, world)
