"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped inside the
installed package: the embedded default, needing no download.

Digits has no official test split, so a fixed stratified 20% (seed 0, independent of the
run's seed) plays that role; validation is then held out of the rest with the run's seed.
"""
from __future__ import annotations

import torch

from ..recipe import Recipe
from . import register_dataset
from .split import stratified_split
from .tensor_data import TensorDataModule

TEST_FRACTION = 0.2


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - 0.5) / 0.5, torch.tensor(raw.target, dtype=torch.long)


@register_dataset("digits")
def build_digits(recipe: Recipe, seed: int, device: torch.device, rank: int, world: int) -> TensorDataModule:
    x, y = load_digits_tensors()
    rest, test = stratified_split(y, TEST_FRACTION, seed=0)
    train_rel, val_rel = stratified_split(y[rest], recipe.val_fraction, seed=seed)
    train, val = rest[train_rel], rest[val_rel]
    splits = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
    return TensorDataModule(splits, 10, recipe.batch_size, recipe.augment, seed, device, rank, world)
