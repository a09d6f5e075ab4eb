"""Which data path a file dataset takes (knob ``data_path``).

``device`` holds the decoded dataset on the training device and augments whole batches
there (``device_data``); ``loader`` decodes and augments one image at a time in DataLoader
worker processes (``loader_data``). ``auto`` takes the device path when every augmentation
in use has a device form and the decoded ``uint8`` arrays take at most a quarter of the
device's free memory (host RAM for a CPU run), leaving the rest to the networks; the
policy augmentations (RandAugment, AutoAugment) and datasets too large for the device
take the loader. The module logs its path and the reason once, when it first trains.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torchvision.transforms import v2

from kd_platform.config.recipe import DEVICE_AUGMENTATIONS, Recipe
from kd_platform.data.device_data import DeviceDataModule, decoded_bytes
from kd_platform.data.loader_data import LoaderDataModule
from kd_platform.data.split import Split

MEMORY_SHARE = 4  # the device path may take 1/MEMORY_SHARE of the free memory


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (available RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MiB"


def choose_path(recipe: Recipe, nbytes: int, device: torch.device) -> tuple[str, str]:
    """``(path, reason)``: the data path for ``recipe`` with ``nbytes`` of decoded images."""
    if recipe.data_path != "auto":
        return recipe.data_path, f"data_path={recipe.data_path}"
    lacking = [a for a in recipe.augment_names() if a not in DEVICE_AUGMENTATIONS]
    if lacking:
        return "loader", f"augmentation '{lacking[0]}' has no device form"
    free = free_memory(device)
    if free is None:
        return "loader", f"free memory on {device} is unknown"
    if nbytes > free // MEMORY_SHARE:
        return "loader", (f"decoded images ({_mib(nbytes)}) exceed 1/{MEMORY_SHARE} of the free memory "
                          f"on {device} ({_mib(free)})")
    return "device", (f"augmentations {', '.join(recipe.augment_names())} have device forms and the "
                      f"decoded images ({_mib(nbytes)}) fit in 1/{MEMORY_SHARE} of the free memory on "
                      f"{device} ({_mib(free)})")


def build_file_data(name: str, splits: dict[str, Split], num_classes: int, image_size: int,
                    mean: Sequence[float], std: Sequence[float], recipe: Recipe, seed: int,
                    device: torch.device, rank: int, world: int,
                    policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10
                    ) -> DeviceDataModule | LoaderDataModule:
    """The data module of a file dataset, on the path :func:`choose_path` picks (``build_data``
    has checked the recipe: ``data_path=device`` comes with device augmentations only)."""
    path, reason = choose_path(recipe, decoded_bytes(splits), device)
    if path == "device":
        return DeviceDataModule(name, splits, num_classes, mean, std, recipe, seed, device, rank, world,
                                reason=reason)
    return LoaderDataModule(name, splits, num_classes, image_size, mean, std, recipe, seed, device, rank,
                            world, policy, reason=reason)
