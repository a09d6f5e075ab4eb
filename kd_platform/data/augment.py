"""Named augmentation pipelines for image datasets read from files (CIFAR, TinyImageNet).

A pipeline maps one ``uint8`` image ``(C, H, W)`` to an augmented ``uint8`` image and runs
per sample in the loader's worker processes; normalisation runs afterwards on whole
batches on the training device (:class:`Normaliser`), which is cheaper than per sample on
the CPU and sends a quarter of the bytes to the device. The policy transforms
(RandAugment, AutoAugment) are defined on 8-bit intensities anyway.

The geometry both data paths share (shift padding, cutout side, rotation range, the
mean colour) is defined here once; ``device_augment`` draws the same transforms for whole
batches on the device.

Every random draw comes from torch's global generator, which the loader re-seeds per
sample from ``(seed, epoch, index, view)``; nothing here draws from Python's ``random``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

from kd_platform.config.recipe import AUGMENTATIONS
from kd_platform.errors import UsageError

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


def mean_colour(mean: Sequence[float], scale: float = 255.0) -> list[int]:
    """The dataset's mean colour in stored intensities (``scale`` is the maximum one): what
    normalisation maps to zero."""
    return [int(round(scale * m)) for m in mean]


def shift_padding(image_size: int) -> int:
    """How far ``shift`` translates: ``image_size // 8`` (4 px at 32x32, the CIFAR convention),
    at least 1."""
    return max(1, image_size // 8)


def cutout_size(image_size: int) -> int:
    """Side of the cutout square: half the image side (16 px at 32x32)."""
    return image_size // 2


def build_pipeline(name: str, image_size: int, mean: Sequence[float],
                   policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10) -> Pipeline:
    """The training pipeline ``name`` (one of ``kd_platform.config.recipe.AUGMENTATIONS``) on ``uint8``
    images; ``mean`` (in [0, 1]) is the colour cutout paints.

    ``shift`` pads by :func:`shift_padding` and crops back (zero fill); cutout covers a
    square of side :func:`cutout_size`.
    """
    if name not in AUGMENTATIONS:
        raise UsageError(f"unknown augmentation '{name}'; known: {', '.join(AUGMENTATIONS)}")
    shift: list[Callable] = [v2.RandomCrop(image_size, padding=shift_padding(image_size))]
    standard = shift + [v2.RandomHorizontalFlip()]
    steps = {"none": [], "shift": shift, "standard": standard,
             "rotate": standard + [v2.RandomRotation(ROTATION_DEGREES)],
             "cutout": standard + [Cutout(cutout_size(image_size), mean_colour(mean))],
             "randaugment": standard + [v2.RandAugment()],
             "autoaugment": standard + [v2.AutoAugment(policy)],
             "rrc": [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]}[name]
    return v2.Compose(steps) if steps else _identity


def _identity(img: Tensor) -> Tensor:
    return img


class Normaliser:
    """``uint8`` batches to the default float dtype (``float32`` unless a caller changed it):
    divided by ``scale`` (the dataset's maximum stored
    intensity) and standardised per channel, on whatever device the batch lives on.

    The statistics are kept as tensors per device: building them from Python lists every
    batch would copy them to the device every step, and such a copy waits for the host.
    Dividing (rather than multiplying by ``1 / scale``) keeps ``scale=240`` exact for digits'
    0..16 values stored times 15.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], scale: float = 255.0) -> None:
        if not all(std):
            raise ValueError("a standard deviation of zero")
        self.mean, self.std, self.scale = list(mean), list(std), float(scale)
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if (device, dtype) not in self._stats:
            self._stats[device, dtype] = (torch.tensor(self.mean, device=device, dtype=dtype).view(-1, 1, 1),
                                          torch.tensor(self.std, device=device, dtype=dtype).view(-1, 1, 1))
        return self._stats[device, dtype]

    def __call__(self, batch: Tensor) -> Tensor:
        dtype = torch.get_default_dtype()
        mean, std = self._on(batch.device, dtype)
        return batch.to(dtype).div_(self.scale).sub_(mean).div_(std)


def view_pipeline_names(augment: str, view_augments: Sequence[str], num_views: int) -> list[str]:
    """The pipeline of every view: ``augment`` for a single shared view, else ``view_augments``
    cycled over the views (or ``augment`` for all when ``view_augments`` is empty)."""
    if num_views == 1 or not view_augments:
        return [augment] * num_views
    return [view_augments[i % len(view_augments)] for i in range(num_views)]
