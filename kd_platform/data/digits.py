"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped inside the
installed package: the embedded default, needing no download.

Digits has no official test split, so a fixed stratified 20% (seed 0, independent of the
run's seed) plays that role; validation is then held out of the rest with the run's seed.

The whole set is 115 KB, so it always takes the device data path (``device_data``). Its
intensities are 0..16; stored as ``uint8`` times 15 (0..240) and normalised with scale
240, mean 0.5 and std 0.5, the network sees exactly ``(x / 16 - 0.5) / 0.5``.
"""
from __future__ import annotations

import numpy as np
import torch

from kd_platform.config.recipe import DEVICE_AUGMENTATIONS, Recipe
from kd_platform.data.device_data import DeviceDataModule
from kd_platform.data.registry import register_dataset
from kd_platform.data.sources import ArraySource
from kd_platform.data.split import Split, split_train, stratified_split
from kd_platform.errors import UsageError

TEST_FRACTION = 0.2
STORED_MAX = 240  # 16 * 15: the largest stored intensity
MEAN, STD = (0.5,), (0.5,)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 8, 8, 1)`` holding the raw 0..16 values times 15, and labels."""
    from sklearn.datasets import load_digits
    raw = load_digits()
    images = (raw.images * (STORED_MAX // 16)).round().astype(np.uint8)[..., None]
    return images, raw.target.astype(np.int64)


def check_digits(recipe: Recipe) -> None:
    """Digits lives on the device: no loader path, and only augmentations with device forms."""
    if recipe.data_path == "loader":
        raise UsageError("knob 'data_path': dataset 'digits' is held in memory and has no loader path")
    if recipe.data_dir:
        # It would be ignored, and recorded as where the data came from.
        raise UsageError("knob 'data_dir': dataset 'digits' ships with scikit-learn and reads no directory")
    for knob, names in (("augment", [recipe.augment]), ("view_augments", recipe.view_augment_list())):
        lacking = [a for a in names if a not in DEVICE_AUGMENTATIONS]
        if lacking:
            raise UsageError(f"knob '{knob}': dataset 'digits' is held in memory and its device path has "
                             f"no '{lacking[0]}' augmentation (it has {', '.join(DEVICE_AUGMENTATIONS)})")


@register_dataset("digits", check=check_digits)
def build_digits(recipe: Recipe, seed: int, device: torch.device, rank: int, world: int) -> DeviceDataModule:
    images, labels = load_digits_arrays()
    y = torch.from_numpy(labels)
    rest, test = stratified_split(y, TEST_FRACTION, seed=0)
    source = ArraySource(images)
    splits = {**split_train(Split(source, rest, y[rest]), recipe.val_fraction, seed),
              "test": Split(source, test, y[test])}
    return DeviceDataModule("digits", splits, 10, MEAN, STD, recipe, seed, device, rank, world,
                            scale=STORED_MAX, reason="digits is held in memory")
