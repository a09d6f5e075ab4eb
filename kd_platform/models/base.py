"""What every network of the zoo is to a method: named stages, their features, and a head.

A :class:`ZooNet` lists its stages in order (``stem`` first, ``stage1``..``stageK`` after it,
the last of them ending where pooling starts); everything else follows from that list:

- ``stage_features(x)``: every stage's output by name, for feature-based distillation
  (FitNets-style hints, attention transfer, per-stage correlation);
- ``features(x)``: the last stage's map ``(N, feature_channels, h, w)``;
- ``classify(fmap)``: global average pooling and the linear head ``fc``;
- ``forward(x) == classify(features(x))``.

Stage outputs are the same tensors the forward computes, not copies, so tapping every stage
costs nothing beyond keeping them alive.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Iterator

import torch.nn.functional as F
from torch import Tensor, nn

Stage = Callable[[Tensor], Tensor]


class ZooNet(nn.Module):
    """Subclasses build ``fc`` and set ``feature_channels``, and implement :meth:`stages`."""

    stackable: ClassVar[bool] = False
    """True when the forward mixes channels only in Conv2d/Linear (see ``models.stacked``)."""
    feature_channels: int
    fc: nn.Linear

    def stages(self) -> Iterator[tuple[str, Stage]]:
        """The network's stages in forward order, as ``(name, callable)`` pairs."""
        raise NotImplementedError

    def stage_features(self, x: Tensor) -> dict[str, Tensor]:
        """Every stage's output by name, in forward order; the last one is ``features(x)``."""
        out: dict[str, Tensor] = {}
        for name, stage in self.stages():
            x = out[name] = stage(x)
        return out

    def features(self, x: Tensor) -> Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return x

    def classify(self, fmap: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(fmap, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.features(x))


def named(modules: dict[str, Stage]) -> Iterator[tuple[str, Stage]]:
    """Stages that are whole submodules, in the given order."""
    return iter(modules.items())


def split_sequential(body: nn.Sequential, ends: list[int], names: list[str]) -> Iterator[tuple[str, Stage]]:
    """Stages of a flat ``body``: stage ``i`` runs layers ``ends[i-1]:ends[i]``. A slice of an
    ``nn.Sequential`` shares its layers, so the stages are views, not copies."""
    start = 0
    for name, end in zip(names, ends):
        yield name, body[start:end]
        start = end


def init_weights(module: nn.Module, *, linear_std: float | None = None, zero_biases: bool = False) -> None:
    """He-normal (fan-out) convolutions and unit BatchNorm, as every CIFAR zoo uses; the zoos
    differ only in the head and biases. ``linear_std``: normal-initialised linear weights
    (MobileNet, VGG) instead of PyTorch's default; ``zero_biases``: convolution and linear
    biases start at zero instead of PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if zero_biases and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            if zero_biases:
                nn.init.zeros_(m.bias)
