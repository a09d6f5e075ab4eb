"""Seeded, stratified splits and per-(seed, epoch, rank) generators."""
from __future__ import annotations

import torch
from torch import Tensor


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
