"""A :class:`~kd_platform.data.DataModule` for datasets read from files, through torch
``DataLoader`` worker processes.

Images stay ``uint8`` on the CPU until the last moment: loader workers decode and augment
one sample at a time, batches travel to the device as bytes and are normalised there.

Reproducibility does not depend on the number of loader workers or on which worker takes
which sample: every sample's augmentation is drawn from a generator seeded by
``(seed, epoch, sample index, view)``, and the epoch's order is one permutation seeded by
``(seed, epoch)``, shared by all data-parallel ranks, each taking its own disjoint share.
A resumed run therefore sees exactly the stream the interrupted one would have seen.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..errors import UsageError
from ..methods.base import Batch
from ..recipe import Recipe
from .augment import Normaliser, Pipeline, build_pipeline, view_pipeline_names
from .split import generator, shard, stratified_split

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 500
MAX_AUTO_WORKERS = 8


class ImageSource(Protocol):
    """Random access to the images of one file set, as ``uint8`` tensors ``(C, H, W)``."""

    def __len__(self) -> int: ...

    def image(self, i: int) -> Tensor: ...


class ArraySource:
    """Images already decoded into one ``uint8`` array ``(N, H, W, C)`` (CIFAR's pickles)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def image(self, i: int) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[i].transpose(2, 0, 1)))


class FileSource:
    """One image file per sample (TinyImageNet's JPEGs), decoded to RGB on access."""

    def __init__(self, paths: Sequence[str], image_size: int) -> None:
        self.paths = list(paths)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Tensor:
        from PIL import Image
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                # Some TinyImageNet JPEGs are greyscale; every network expects three channels.
                img = TF.pil_to_tensor(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:
            raise UsageError(f"corrupt image file {path}: {err}") from None
        if img.shape[-2:] != (self.image_size, self.image_size):
            img = TF.resize(img, [self.image_size, self.image_size], antialias=True)
        return img


@dataclass
class Split:
    """Samples ``indices`` of ``source`` with their class ``labels`` (aligned with ``indices``)."""
    source: ImageSource
    indices: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.indices)


def sample_seed(*parts: int) -> int:
    return generator(*parts).initial_seed()


class _TrainSet(Dataset):
    """Keys are ``(position, epoch, num_views)``: the sampler says what the epoch wants, so
    persistent workers need no message when a new epoch or another view count begins."""

    def __init__(self, split: Split, seed: int, augment: str, view_augments: Sequence[str],
                 pipelines: dict[str, Pipeline]) -> None:
        self.split, self.seed = split, seed
        self.augment, self.view_augments, self.pipelines = augment, list(view_augments), pipelines

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[list[Tensor], int]:
        pos, epoch, num_views = key
        index = int(self.split.indices[pos])
        img = self.split.source.image(index)
        views = []
        # Without loader workers this runs in the training process, whose generator the
        # methods draw from (Dirichlet weights, dropout): leave it as it was.
        with torch.random.fork_rng(devices=[]):
            for v, name in enumerate(view_pipeline_names(self.augment, self.view_augments, num_views)):
                torch.manual_seed(sample_seed(self.seed, epoch, index, v))
                views.append(self.pipelines[name](img))
        return views, int(self.split.labels[pos])


class _EvalSet(Dataset):
    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, pos: int) -> tuple[Tensor, int]:
        return self.split.source.image(int(self.split.indices[pos])), int(self.split.labels[pos])


class _EpochBatches:
    """Batch sampler of one rank: the epoch's permutation from ``generator(seed, epoch)`` (the
    same on every rank), this rank's equal share of it (:func:`shard`), cut into batches.

    A final batch of a single sample is dropped: BatchNorm cannot normalise one sample."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.num_views = 0, 1

    def per_rank(self) -> int:
        return (self.n - self.n % self.world) // self.world

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank(), self.batch_size)
        return full + (rest > 1)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order = shard(torch.randperm(self.n, generator=generator(self.seed, self.epoch)), self.rank, self.world)
        for b in range(len(self)):
            part = order[b * self.batch_size:(b + 1) * self.batch_size].tolist()
            yield [(p, self.epoch, self.num_views) for p in part]


class _EvalBatches:
    """Every ``world``-th sample from ``rank`` on, in order; shares may differ by one sample
    because evaluation only sums counts across ranks."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int) -> None:
        self.positions = list(range(rank, n, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.positions), self.batch_size):
            yield self.positions[start:start + self.batch_size]


def cpus_available() -> tuple[int, bool]:
    """CPUs this process may use, and whether Ray assigned them (inside a Ray worker) rather
    than the OS's affinity mask, which every local process shares."""
    # Only a process that already runs Ray can be inside a Ray worker; importing Ray to find
    # out would cost seconds (and ray.get_runtime_context() would start a local cluster).
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if assigned:
                return max(1, int(assigned)), True
    except Exception:  # noqa: BLE001 - no usable Ray context: fall back to the OS's answer
        pass
    try:
        return len(os.sched_getaffinity(0)), False
    except AttributeError:
        return os.cpu_count() or 1, False


def default_workers(world: int) -> int:
    """Loader processes per training process: the CPUs left beside the training process,
    split among ``world`` local ranks unless Ray assigned each its own."""
    cpus, assigned = cpus_available()
    share = cpus if assigned else cpus // max(1, world)
    return max(1, min(MAX_AUTO_WORKERS, share - 1))


def one_line(err: UsageError) -> UsageError:
    """A UsageError raised in a loader worker comes back carrying the worker's traceback;
    keep only the original message, which is the traceback's last line."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else str(err)
    prefix = f"{UsageError.__module__}.{UsageError.__qualname__}: "
    return UsageError(last[len(prefix):] if last.startswith(prefix) else last)


def _guarded(loader: Iterable) -> Iterator:
    try:
        yield from loader
    except UsageError as err:
        raise one_line(err) from None


class LoaderDataModule:
    """Train, validation and test splits of a file dataset behind one ``DataLoader`` each.

    With ``val_fraction=0`` there is no validation split: ``eval_batches("val")`` then yields
    the test set, with a warning, and ``val_is_test`` is true, so that a caller can refuse
    to tune on it. That is for final runs trained on the whole official train set, whose
    per-epoch curves are then test curves; it must never drive a sweep.
    """

    in_channels = 3

    def __init__(self, name: str, splits: dict[str, Split], num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], recipe: Recipe, seed: int,
                 device: torch.device, rank: int, world: int,
                 policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10) -> None:
        self.name, self.splits = name, splits
        self.num_classes, self.image_size = num_classes, image_size
        self.device, self.rank, self.world, self.seed = device, rank, world, seed
        self.val_is_test = "val" not in splits
        self._warned_val = False
        self.normalise = Normaliser(mean, std)
        self.batch_size = max(1, recipe.batch_size // world)
        self.workers = default_workers(world) if recipe.loader_workers < 0 else recipe.loader_workers
        self.pin = device.type == "cuda"
        names = {recipe.augment, *recipe.view_augment_list()}
        pipelines = {n: build_pipeline(n, image_size, mean, policy) for n in names}
        self._sampler = _EpochBatches(len(splits["train"]), self.batch_size, seed, rank, world)
        train_set = _TrainSet(splits["train"], seed, recipe.augment, recipe.view_augment_list(), pipelines)
        self._train = self._loader(train_set, self._sampler, persistent=True)
        self._eval: dict[str, DataLoader] = {}
        if self.val_is_test:
            log.warning("%s: val_fraction=0, so no validation split is held out; 'val' metrics are "
                        "measured on the TEST set (fine for a final run, never for tuning)", name)

    def _loader(self, dataset: Dataset, batch_sampler: object, persistent: bool) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.workers, pin_memory=self.pin,
                          persistent_workers=persistent and self.workers > 0)

    def steps_per_epoch(self) -> int:
        return len(self._sampler)

    def _to_device(self, x: Tensor) -> Tensor:
        return self.normalise(x.to(self.device, non_blocking=self.pin))

    def train_batches(self, epoch: int, num_views: int) -> Iterator[Batch]:
        self._sampler.epoch, self._sampler.num_views = epoch, num_views
        for views, y in _guarded(self._train):
            yield Batch([self._to_device(v) for v in views], y.to(self.device, non_blocking=self.pin))

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        if split == "val" and self.val_is_test:
            if not self._warned_val:
                log.warning("%s: evaluating 'val' on the test set (val_fraction=0)", self.name)
                self._warned_val = True
            split = "test"
        if split not in self.splits:
            raise UsageError(f"dataset '{self.name}' has no split '{split}'")
        if split not in self._eval:
            data = self.splits[split]
            # The validation loader runs every epoch, the test loader once at the end.
            self._eval[split] = self._loader(_EvalSet(data), _EvalBatches(len(data), EVAL_BATCH_SIZE,
                                                                           self.rank, self.world),
                                             persistent=split == "val")
        for x, y in _guarded(self._eval[split]):
            yield self._to_device(x), y.to(self.device, non_blocking=self.pin)


def data_root(recipe: Recipe) -> Path:
    if not recipe.data_dir:
        raise UsageError(f"dataset '{recipe.dataset}' is read from files: set knob 'data_dir' to the "
                         "directory that holds them")
    return Path(recipe.data_dir).expanduser()


def split_train(train: Split, val_fraction: float, seed: int) -> dict[str, Split]:
    """``train`` and a stratified, seeded ``val`` held out of it (none when the fraction is 0)."""
    if val_fraction <= 0:
        return {"train": train}
    kept, held = stratified_split(train.labels, val_fraction, seed)
    return {"train": Split(train.source, train.indices[kept], train.labels[kept]),
            "val": Split(train.source, train.indices[held], train.labels[held])}


def check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UsageError(f"{where}: labels outside 0..{num_classes - 1}")
