"""Seeded, stratified splits, per-(seed, epoch, rank) generators, and the sample bookkeeping
every data path shares: which samples a split holds, which of them one rank trains on in
an epoch and in what order, how many batches that makes, and where 'val' points when no
validation split was held out.

Both data paths (``loader_data`` and ``device_data``) take their splits, epoch orders and
batch counts from here, so switching ``data_path`` changes how images reach the device,
never which images a step sees.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import torch
from torch import Tensor

from kd_platform.errors import UsageError

if TYPE_CHECKING:
    from kd_platform.data.sources import ImageSource

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 500


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, epoch, rank, ...)."""
    g = torch.Generator()
    state = 0x9E3779B97F4A7C15
    for p in parts:
        state = (state * 1_000_003 + int(p) + 1) % (2 ** 63)
    return g.manual_seed(state)


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(kept, held_out)``: ``round(fraction * n_c)`` of every class ``c`` held out."""
    g = generator(seed, 7919)
    kept, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(held)).values


def shard(indices: Tensor, rank: int, world: int) -> Tensor:
    """This worker's equal-length share (the remainder of ``len % world`` is dropped so that
    every worker runs the same number of steps and collective calls stay in lockstep)."""
    usable = len(indices) - len(indices) % world
    return indices[:usable][rank::world]


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> Tensor:
    """Positions ``0..n-1`` this rank visits in ``epoch``, in order: one permutation seeded by
    ``(seed, epoch)`` shared by every rank, each taking its own disjoint share of it."""
    return shard(torch.randperm(n, generator=generator(seed, epoch)), rank, world)


def fixed_subset(n: int, k: int, seed: int) -> Tensor:
    """The first ``k`` positions of a permutation of ``0..n-1`` seeded by ``seed`` alone (not by
    epoch or rank): the same samples on every rank and in every process."""
    return torch.randperm(n, generator=generator(seed, 104729))[:k]


def batches_per_epoch(n: int, batch_size: int, world: int) -> int:
    """Batches one rank draws from ``n`` training samples. A final batch of a single sample is
    dropped: BatchNorm cannot normalise one sample."""
    full, rest = divmod((n - n % world) // world, batch_size)
    return full + (rest > 1)


@dataclass
class Split:
    """Samples ``indices`` of ``source`` with their class ``labels`` (aligned with ``indices``)."""
    source: "ImageSource"
    indices: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.indices)


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


class EvalSplits:
    """Which split ``eval_batches(name)`` reads.

    With ``val_fraction=0`` there is no validation split: 'val' then reads the test set,
    with a warning, and ``val_is_test`` is true, so that a caller can refuse to tune on it.
    That is for final runs trained on the whole official train set, whose per-epoch curves
    are then test curves; it must never drive a sweep.
    """

    def __init__(self, dataset: str, splits: Mapping[str, object]) -> None:
        self.dataset, self.names = dataset, set(splits)
        self.val_is_test = "val" not in self.names and "test" in self.names
        self._warned = False
        if self.val_is_test:
            log.warning("%s: val_fraction=0, so no validation split is held out; 'val' metrics are "
                        "measured on the TEST set (fine for a final run, never for tuning)", dataset)

    def resolve(self, split: str) -> str:
        if split == "val" and self.val_is_test:
            if not self._warned:
                log.warning("%s: evaluating 'val' on the test set (val_fraction=0)", self.dataset)
                self._warned = True
            split = "test"
        if split not in self.names:
            raise UsageError(f"dataset '{self.dataset}' has no split '{split}'")
        return split
