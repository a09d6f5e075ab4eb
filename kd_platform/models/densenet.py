"""DenseNet-40 with growth rate 12 (Huang et al. 2017, "Densely Connected Convolutional
Networks", the plain DenseNet with L = 40, k = 12 of their CIFAR table, not DenseNet-BC).

A 3x3 stem conv to 16 channels, three dense blocks of (40 - 4) / 3 = 12 layers, each layer
BN-ReLU-3x3 conv adding 12 channels, and between blocks a transition BN-ReLU-1x1 conv (no
compression) followed by 2x2 average pooling. A final BN-ReLU precedes global pooling, so
the feature map has 16 + 36 * 12 = 448 channels. Dropout is omitted (the paper uses it only
without data augmentation).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.models.base import Stage, ZooNet, init_weights, split_sequential
from kd_platform.models.registry import register_model


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # ceil_mode so odd or 1-pixel maps are not truncated away on small inputs.
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2, ceil_mode=True)


class CifarDenseNet(ZooNet):
    """Stages: the stem conv, then each dense block with the transition after it (the last
    block with the final BN-ReLU)."""

    def __init__(self, depth: int, growth: int, num_classes: int, in_channels: int = 3,
                 stem_channels: int = 16) -> None:
        super().__init__()
        if (depth - 4) % 3:
            raise ValueError(f"DenseNet depth must be 3n + 4, got {depth}")
        n = (depth - 4) // 3
        layers: list[nn.Module] = [nn.Conv2d(in_channels, stem_channels, 3, 1, 1, bias=False)]
        c = stem_channels
        for block in range(3):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if block < 2:
                layers.append(Transition(c, c))
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self._stage_ends = [1, 2 + n, 3 + 2 * n, len(layers)]
        self.feature_channels = c
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, zero_biases=True)

    def stages(self) -> Iterator[tuple[str, Stage]]:
        return split_sequential(self.body, self._stage_ends, ["stem", "stage1", "stage2", "stage3"])

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # the whole body at once: no per-call slicing on the hot path


@register_model("densenet40_12")
def densenet40_12(num_classes: int, in_channels: int = 3) -> ZooNet:
    return CifarDenseNet(40, 12, num_classes, in_channels)
