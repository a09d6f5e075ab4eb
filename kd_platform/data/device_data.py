"""A :class:`~kd_platform.data.DataModule` that keeps the decoded dataset on the training
device: the device data path, used by digits always and by the file datasets when their
augmentations have device forms and the data fits (``data_path``, see ``data_path.py``).

All images of all splits are ONE ``uint8 (N, C, H, W)`` tensor on the device (a quarter
of the bytes of floats); a split is an index tensor into it with its labels, a batch is an
index gather, augmentation runs batched per sample on the device (``device_augment``),
and normalisation to float runs on the device per batch. Nothing in a training step
touches the CPU: the epoch's order and every view's augmentation parameters are drawn up
front and moved to the device once, so no step waits for the host.

The stream depends only on ``(seed, epoch, rank, world)`` and the views asked for: the
order is the epoch's permutation shared with the loader path (``split.epoch_order``), and
view ``v``'s parameters come from ``generator(seed, epoch, rank, v)``, so a run resumed at
an epoch boundary sees exactly what the uninterrupted run would have.

Images are decoded on first use, not when the module is built, so building one only to
read its shapes (a teacher checkpoint check) costs nothing.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from kd_platform.config.recipe import Recipe
from kd_platform.data.augment import Normaliser, mean_colour, view_pipeline_names
from kd_platform.data.base import Batch, PathNote
from kd_platform.data.device_augment import BatchAugment, Params
from kd_platform.data.sources import ImageSource
from kd_platform.data.split import (
    EVAL_BATCH_SIZE,
    EvalSplits,
    Split,
    batches_per_epoch,
    epoch_order,
    fixed_subset,
    generator,
)


def distinct_sources(splits: dict[str, Split]) -> list[ImageSource]:
    """The sources behind ``splits``, each once, in order of first use (validation is held
    out of the training source, so the two share it)."""
    seen: dict[int, ImageSource] = {}
    for split in splits.values():
        seen.setdefault(id(split.source), split.source)
    return list(seen.values())


def decoded_bytes(splits: dict[str, Split]) -> int:
    """Bytes of the ``uint8`` tensor the device path would hold for ``splits``."""
    return sum(len(s) * s.shape[0] * s.shape[1] * s.shape[2] for s in distinct_sources(splits))


class DeviceDataModule:
    """The splits of one dataset over one device-resident ``uint8`` tensor.

    ``scale`` is the dataset's maximum stored intensity (255 for 8-bit images), ``mean``
    and ``std`` the per-channel statistics of images scaled to [0, 1]."""

    path = "device"

    def __init__(self, name: str, splits: dict[str, Split], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], recipe: Recipe, seed: int, device: torch.device, rank: int,
                 world: int, scale: float = 255.0, reason: str = "data_path=device") -> None:
        self.name, self.splits = name, splits
        self.note = PathNote(name, self.path, reason)
        self.sources = distinct_sources(splits)
        self.in_channels, self.image_size, _ = self.sources[0].shape
        if any(s.shape != self.sources[0].shape for s in self.sources):
            raise ValueError(f"{name}: sources of different image shapes cannot share one tensor")
        self.num_classes = num_classes
        self.device, self.seed, self.rank, self.world = device, seed, rank, world
        self.batch_size = max(1, recipe.batch_size // world)
        self.normalise = Normaliser(mean, std, scale)
        self._evals = EvalSplits(name, splits)
        self.val_is_test = self._evals.val_is_test
        self.augment, self.view_augments = recipe.augment, recipe.view_augment_list()
        fill = mean_colour(mean, scale)
        self.augments = {a: BatchAugment(a, self.image_size, fill) for a in recipe.augment_names()}
        self._index = self._device_index(splits)
        self._images: Tensor | None = None

    def _device_index(self, splits: dict[str, Split]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per split: positions in the joint tensor (sources laid end to end) and labels."""
        offsets, start = {}, 0
        for source in self.sources:
            offsets[id(source)], start = start, start + len(source)
        return {k: ((s.indices + offsets[id(s.source)]).to(self.device), s.labels.to(self.device))
                for k, s in splits.items()}

    @property
    def images(self) -> Tensor:
        """Every image of every split, ``uint8 (N, C, H, W)`` on the device; decoded on first use."""
        if self._images is None:
            total = sum(len(s) for s in self.sources)
            images = torch.empty((total, *self.sources[0].shape), dtype=torch.uint8, device=self.device)
            start = 0
            for source in self.sources:  # one source at a time: never two copies of all on the host
                images[start:start + len(source)].copy_(source.decoded())
                start += len(source)
            self._images = images
        return self._images

    def steps_per_epoch(self) -> int:
        return batches_per_epoch(len(self.splits["train"]), self.batch_size, self.world)

    def _epoch_params(self, epoch: int, names: list[str], n: int) -> list[Params]:
        """Every view's parameters for the whole epoch, drawn on the CPU, moved once."""
        params = []
        for v, name in enumerate(names):
            drawn = self.augments[name].draw(n, generator(self.seed, epoch, self.rank, v))
            params.append({k: t.to(self.device) for k, t in drawn.items()})
        return params

    def train_batches(self, epoch: int, num_views: int) -> Iterator[Batch]:
        self.note.log_once()
        index, labels = self._index["train"]
        order = epoch_order(len(labels), self.seed, epoch, self.rank, self.world).to(self.device)
        names = view_pipeline_names(self.augment, self.view_augments, num_views)
        params = self._epoch_params(epoch, names, len(order))
        images = self.images
        for b in range(self.steps_per_epoch()):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            pos = order[part]
            raw = images[index[pos]]
            views = [self.normalise(self.augments[name](raw, {k: t[part] for k, t in p.items()}))
                     for name, p in zip(names, params)]
            yield Batch(views, labels[pos])

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's every ``world``-th sample, unaugmented, in batches of ``EVAL_BATCH_SIZE``."""
        index, labels = self._index[self._evals.resolve(split)]
        mine = torch.arange(self.rank, len(labels), self.world, device=self.device)
        images = self.images
        for start in range(0, len(mine), EVAL_BATCH_SIZE):
            pos = mine[start:start + EVAL_BATCH_SIZE]
            yield self.normalise(images[index[pos]]), labels[pos]

    def train_eval_batches(self, n: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The training split's fixed subset of ``n`` samples (``split.fixed_subset``), unaugmented
        and normalised, in batches of ``EVAL_BATCH_SIZE``; every rank gets the whole subset."""
        index, labels = self._index["train"]
        pick = fixed_subset(len(labels), n, seed).to(self.device)
        images = self.images
        for start in range(0, len(pick), EVAL_BATCH_SIZE):
            pos = pick[start:start + EVAL_BATCH_SIZE]
            yield self.normalise(images[index[pos]]), labels[pos]
