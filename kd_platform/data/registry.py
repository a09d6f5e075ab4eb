"""The dataset registry: a leaf, so dataset modules register into it without importing their
own package."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from kd_platform.config.recipe import Recipe
from kd_platform.data.base import DataModule
from kd_platform.registry import Registry

_BUILDERS: Registry[Callable[..., DataModule]] = Registry(
    "dataset", __name__.rpartition(".")[0], [str(Path(__file__).parent)], skip=("base", "registry"))
_CHECKS: dict[str, Callable[[Recipe], None]] = {}


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
