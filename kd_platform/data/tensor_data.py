"""An in-memory dataset held as tensors on the training device, with on-device augmentation.

Small datasets (digits) fit in device memory whole, so batches are index gathers and
augmentation runs batched on the device instead of in loader processes.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods.base import Batch
from .split import generator, shard


def random_shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Translate every image independently by up to ``H // 8`` pixels (at least 1), zero fill."""
    n, c, h, w = x.shape
    p = max(1, h // 8)
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


class TensorDataModule:
    def __init__(self, splits: dict[str, tuple[Tensor, Tensor]], num_classes: int, batch_size: int,
                 augment: str, seed: int, device: torch.device, rank: int, world: int) -> None:
        self.splits = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
        x_train = self.splits["train"][0]
        self.num_classes = num_classes
        self.in_channels = x_train.shape[1]
        self.image_size = x_train.shape[2]
        self.batch_size = max(1, batch_size // world)
        self.augment, self.seed, self.rank, self.world = augment, seed, rank, world

    def steps_per_epoch(self) -> int:
        n = len(self.splits["train"][1]) // self.world
        return -(-n // self.batch_size)

    def train_batches(self, epoch: int, num_views: int) -> Iterator[Batch]:
        x, y = self.splits["train"]
        order = shard(torch.randperm(len(y), generator=generator(self.seed, epoch)), self.rank, self.world)
        g = generator(self.seed, epoch, self.rank, 1)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size].to(x.device)
            xb = x[idx]
            views = [random_shift(xb, g) if self.augment == "shift" else xb for _ in range(num_views)]
            yield Batch(views, y[idx])

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.splits[split]
        idx = torch.arange(self.rank, len(y), self.world, device=x.device)
        for start in range(0, len(idx), 512):
            part = idx[start:start + 512]
            yield x[part], y[part]
