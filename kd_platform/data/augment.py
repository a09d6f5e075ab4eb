"""Named augmentation pipelines for image datasets read from files (CIFAR, TinyImageNet).

A pipeline maps one ``uint8`` image ``(C, H, W)`` to a normalised ``float32`` image. The
geometric and policy transforms (crop, flip, rotation, RandAugment, AutoAugment) run on
``uint8`` because the policies are defined on 8-bit intensities; cutout runs last, on the
normalised image, so its zeros are the dataset's mean colour, as in the cutout paper.

Every random draw comes from torch's global generator, which the loader re-seeds per
sample from ``(seed, epoch, index, view)``; nothing here draws from Python's ``random``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import UsageError
from ..recipe import AUGMENTATIONS

Pipeline = Callable[[Tensor], Tensor]
ROTATION_DEGREES = 15.0


class Cutout:
    """Zero a ``size`` x ``size`` square centred anywhere on the image (DeVries & Taylor, 2017).

    The centre is uniform over the whole image, so the square may hang over the border and
    erase less; RandomErasing keeps its box inside, which erases more near the edges than
    the published cutout does.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        half = self.size // 2
        y0, y1 = max(0, cy - half), min(h, cy - half + self.size)
        x0, x1 = max(0, cx - half), min(w, cx - half + self.size)
        out = img.clone()
        out[..., y0:y1, x0:x1] = 0
        return out

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


class _Plain:
    """Strip the tv_tensors wrapper so that what leaves a pipeline is an ordinary tensor."""

    def __call__(self, img: Tensor) -> Tensor:
        return img.as_subclass(Tensor)


def build_pipeline(name: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                   policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10) -> Pipeline:
    """The training pipeline ``name`` (one of ``kd_platform.recipe.AUGMENTATIONS``).

    ``shift`` pads by ``image_size // 8`` and crops back (zero fill), the CIFAR convention of
    4 pixels at 32x32; cutout erases a square of half the image side (16 px at 32x32).
    """
    if name not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation '{name}'; known: {', '.join(AUGMENTATIONS)}")
    shift = [v2.RandomCrop(image_size, padding=max(1, image_size // 8))]
    standard = shift + [v2.RandomHorizontalFlip()]
    before = {"none": [], "shift": shift, "standard": standard, "cutout": standard,
              "rotate": standard + [v2.RandomRotation(ROTATION_DEGREES)],
              "randaugment": standard + [v2.RandAugment()],
              "autoaugment": standard + [v2.AutoAugment(policy)]}[name]
    after: list[Callable] = [Cutout(image_size // 2)] if name == "cutout" else []
    return v2.Compose([tv_tensors.Image, *before, *normalise(mean, std), *after, _Plain()])


def eval_pipeline(mean: Sequence[float], std: Sequence[float]) -> Pipeline:
    return v2.Compose([tv_tensors.Image, *normalise(mean, std), _Plain()])


def normalise(mean: Sequence[float], std: Sequence[float]) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def view_pipeline_names(augment: str, view_augments: Sequence[str], num_views: int) -> list[str]:
    """The pipeline of every view: ``augment`` for a single shared view, else ``view_augments``
    cycled over the views (or ``augment`` for all when ``view_augments`` is empty)."""
    if num_views == 1 or not view_augments:
        return [augment] * num_views
    return [view_augments[i % len(view_augments)] for i in range(num_views)]
