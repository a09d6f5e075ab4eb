"""A :class:`~kd_platform.data.DataModule` for datasets read from files, through torch
``DataLoader`` worker processes.

Images stay ``uint8`` on the CPU until the last moment: loader workers decode and augment
one sample at a time, batches travel to the device as bytes and are normalised there.

Reproducibility does not depend on the number of loader workers or on which worker takes
which sample: every sample's augmentation is drawn from a generator seeded by
``(seed, epoch, sample index, view)``, and the epoch's order is one permutation seeded by
``(seed, epoch)``, shared by all data-parallel ranks, each taking its own disjoint share.
A resumed run therefore sees exactly the stream the interrupted one would have seen.

This is the path for augmentations that exist only per image (RandAugment, AutoAugment)
and for data too large for the device; the others usually take ``device_data``. Splits,
epoch orders, batch counts and the 'val' fallback come from ``split``, shared by both.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from kd_platform.config.recipe import Recipe
from kd_platform.data.augment import Normaliser, Pipeline, build_pipeline, view_pipeline_names
from kd_platform.data.base import Batch, PathNote
from kd_platform.data.split import (
    EVAL_BATCH_SIZE,
    EvalSplits,
    Split,
    batches_per_epoch,
    epoch_order,
    fixed_subset,
    generator,
)
from kd_platform.errors import UsageError

MAX_AUTO_WORKERS = 8


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
    """Batch sampler of one rank: its share of the epoch's order (:func:`epoch_order`), cut
    into batches (:func:`batches_per_epoch`)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.num_views = 0, 1

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.world)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order = epoch_order(self.n, self.seed, self.epoch, self.rank, self.world)
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
    'val' without a validation split reads the test set (:class:`split.EvalSplits`)."""

    in_channels = 3
    path = "loader"

    def __init__(self, name: str, splits: dict[str, Split], num_classes: int, image_size: int,
                 mean: Sequence[float], std: Sequence[float], recipe: Recipe, seed: int,
                 device: torch.device, rank: int, world: int,
                 policy: v2.AutoAugmentPolicy = v2.AutoAugmentPolicy.CIFAR10,
                 reason: str = "data_path=loader") -> None:
        self.name, self.splits = name, splits
        self.note = PathNote(name, self.path, reason)
        self.num_classes, self.image_size = num_classes, image_size
        self.device, self.rank, self.world, self.seed = device, rank, world, seed
        self._evals = EvalSplits(name, splits)
        self.val_is_test = self._evals.val_is_test
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

    def _loader(self, dataset: Dataset, batch_sampler: Iterable[list[Any]], persistent: bool) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.workers, pin_memory=self.pin,
                          persistent_workers=persistent and self.workers > 0)

    def steps_per_epoch(self) -> int:
        return len(self._sampler)

    def _to_device(self, x: Tensor) -> Tensor:
        return self.normalise(x.to(self.device, non_blocking=self.pin))

    def train_batches(self, epoch: int, num_views: int) -> Iterator[Batch]:
        self.note.log_once()
        self._sampler.epoch, self._sampler.num_views = epoch, num_views
        for views, y in _guarded(self._train):
            yield Batch([self._to_device(v) for v in views], y.to(self.device, non_blocking=self.pin))

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        split = self._evals.resolve(split)
        if split not in self._eval:
            data = self.splits[split]
            # The validation loader runs every epoch, the test loader once at the end.
            self._eval[split] = self._loader(_EvalSet(data), _EvalBatches(len(data), EVAL_BATCH_SIZE,
                                                                           self.rank, self.world),
                                             persistent=split == "val")
        for x, y in _guarded(self._eval[split]):
            yield self._to_device(x), y.to(self.device, non_blocking=self.pin)

    def train_eval_batches(self, n: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The training split's fixed subset of ``n`` samples (``split.fixed_subset``), unaugmented
        and normalised, in batches of ``EVAL_BATCH_SIZE``; read in this process (a subset is small)."""
        data = self.splits["train"]
        pick = fixed_subset(len(data), n, seed).tolist()
        for start in range(0, len(pick), EVAL_BATCH_SIZE):
            pos = pick[start:start + EVAL_BATCH_SIZE]
            x = torch.stack([data.source.image(int(data.indices[p])) for p in pos])
            yield self._to_device(x), data.labels[pos].to(self.device)
