"""Named augmentation pipelines for image datasets read from files (CIFAR, TinyImageNet).

A pipeline maps one ``uint8`` image ``(C, H, W)`` to an augmented ``uint8`` image and runs
per sample in the loader's worker processes; normalisation runs afterwards on whole
batches on the training device (:class:`Normaliser`), which is cheaper than per sample on
the CPU and sends a quarter of the bytes to the device. The policy transforms
(RandAugment, AutoAugment) are defined on 8-bit intensities anyway.

Every random draw comes from torch's global generator, which the loader re-seeds per
sample from ``(seed, epoch, index, view)``; nothing here draws from Python's ``random``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..errors import UsageError
from ..recipe import AUGMENTATIONS

Pipeline = Callable[[Tensor], Tensor]
ROTATION_DEGREES = 15.0


class Cutout:
    """Paint a ``size`` x ``size`` square centred anywhere on the image with ``fill`` (DeVries &
    Taylor, 2017, who zero it after normalisation, i.e. paint the mean colour).

    The centre is uniform over the whole image, so the square may hang over the border and
    cover less; RandomErasing keeps its box inside, which erases more near the edges than
    the published cutout does.
    """

    def __init__(self, size: int, fill: Sequence[int]) -> None:
        self.size = size
        self.fill = torch.tensor(list(fill), dtype=torch.uint8).view(-1, 1, 1)

    def __call__(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        half = self.size // 2
        y0, y1 = max(0, cy - half), min(h, cy - half + self.size)
        x0, x1 = max(0, cx - half), min(w, cx - half + self.size)
        out = img.clone()
        out[..., y0:y1, x0:x1] = self.fill.to(out.dtype)
        return out

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


def mean_colour(mean: Sequence[float]) -> list[int]:
    """The dataset's mean colour in 8-bit intensities: what normalisation maps to zero."""
    return [int(round(255 * m)) for m in mean]


def build_pipeline(name: str, image_size: int, mean: Sequence[float],
                   policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10) -> Pipeline:
    """The training pipeline ``name`` (one of ``kd_platform.recipe.AUGMENTATIONS``) on ``uint8``
    images; ``mean`` (in [0, 1]) is the colour cutout paints.

    ``shift`` pads by ``image_size // 8`` and crops back (zero fill), the CIFAR convention of
    4 pixels at 32x32; cutout covers a square of half the image side (16 px at 32x32).
    """
    if name not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation '{name}'; known: {', '.join(AUGMENTATIONS)}")
    shift: list[Callable] = [v2.RandomCrop(image_size, padding=max(1, image_size // 8))]
    standard = shift + [v2.RandomHorizontalFlip()]
    steps = {"none": [], "shift": shift, "standard": standard,
             "rotate": standard + [v2.RandomRotation(ROTATION_DEGREES)],
             "cutout": standard + [Cutout(image_size // 2, mean_colour(mean))],
             "randaugment": standard + [v2.RandAugment()],
             "autoaugment": standard + [v2.AutoAugment(policy)]}[name]
    return v2.Compose(steps) if steps else _identity


def _identity(img: Tensor) -> Tensor:
    return img


class Normaliser:
    """``uint8`` batches to ``float32``, scaled to [0, 1] and standardised per channel, on
    whatever device the batch lives on."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, batch: Tensor) -> Tensor:
        return TF.normalize(TF.to_dtype(batch, torch.float32, scale=True), self.mean, self.std)


def view_pipeline_names(augment: str, view_augments: Sequence[str], num_views: int) -> list[str]:
    """The pipeline of every view: ``augment`` for a single shared view, else ``view_augments``
    cycled over the views (or ``augment`` for all when ``view_augments`` is empty)."""
    if num_views == 1 or not view_augments:
        return [augment] * num_views
    return [view_augments[i % len(view_augments)] for i in range(num_views)]
