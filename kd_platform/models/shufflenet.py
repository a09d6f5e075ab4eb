"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) in the CIFAR forms used by the
CRD benchmark (Tian et al. 2020, RepDistiller ``ShuffleV1``/``ShuffleV2``).

Both replace the ImageNet stem (3x3 stride-2 conv + max-pool) with a 1x1 conv to 24 channels
at full resolution; each of the three stages starts with a stride-2 unit, so 32x32 inputs end
at 4x4.

- ``shufflenetv1``: groups g = 3, stage outputs 240/480/960 with 4/8/4 units, bottleneck width
  a quarter of the unit's output; the stride-2 unit concatenates a 3x3 average-pooled
  shortcut, and the very first 1x1 conv is not grouped (24 input channels), as in the paper.
- ``shufflenetv2``: the 1x size, stage outputs 116/232/464 with one downsampling unit plus
  3/7/3 basic units, then a 1x1 conv to 1024 channels.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.models.base import Stage, ZooNet, init_weights, split_sequential
from kd_platform.models.registry import register_model


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _Shuffle(ZooNet):
    """Both families: a stem, then ``units`` split into three stages at ``_stage_ends``."""

    stem: nn.Module
    units: nn.Sequential
    _stage_ends: list[int]

    def stages(self) -> Iterator[tuple[str, Stage]]:
        yield "stem", self.stem
        yield from split_sequential(self.units, self._stage_ends, ["stage1", "stage2", "stage3"])

    def features(self, x: Tensor) -> Tensor:
        return self.units(self.stem(x))  # the whole body at once: no per-call slicing on the hot path


class ShuffleV1Unit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, group_first: bool) -> None:
        super().__init__()
        self.stride = stride
        # A stride-2 unit concatenates the pooled input, so its own branch produces the rest.
        branch_out = c_out - c_in if stride == 2 else c_out
        mid = branch_out // 4
        self.first_groups = groups if group_first else 1
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class CifarShuffleNetV1(_Shuffle):
    def __init__(self, num_classes: int, in_channels: int = 3, groups: int = 3,
                 stage_out: tuple[int, ...] = (240, 480, 960),
                 stage_units: tuple[int, ...] = (4, 8, 4)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24),
                                  nn.ReLU(inplace=True))
        units, c = [], 24
        self._stage_ends = []
        for s, (c_out, n) in enumerate(zip(stage_out, stage_units)):
            for j in range(n):
                units.append(ShuffleV1Unit(c, c_out, 2 if j == 0 else 1, groups,
                                           group_first=not (s == 0 and j == 0)))
                c = c_out
            self._stage_ends.append(len(units))
        self.units = nn.Sequential(*units)
        self.feature_channels = c
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)


class ShuffleV2Unit(nn.Module):
    """Basic unit: split channels in half, transform one half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        keep, transform = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(transform)], 1), 2)


class ShuffleV2Down(nn.Module):
    """Downsampling unit: both branches see the whole input and halve the resolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.left = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.right = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class CifarShuffleNetV2(_Shuffle):
    def __init__(self, num_classes: int, in_channels: int = 3,
                 stage_out: tuple[int, ...] = (116, 232, 464), stage_units: tuple[int, ...] = (3, 7, 3),
                 last_channels: int = 1024) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 24, 1, bias=False), nn.BatchNorm2d(24),
                                  nn.ReLU(inplace=True))
        units: list[nn.Module] = []
        c = 24
        self._stage_ends = []
        for c_out, n in zip(stage_out, stage_units):
            units.append(ShuffleV2Down(c, c_out))
            units += [ShuffleV2Unit(c_out) for _ in range(n)]
            c = c_out
            self._stage_ends.append(len(units))
        units += [nn.Conv2d(c, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels),
                  nn.ReLU(inplace=True)]
        self._stage_ends[-1] = len(units)  # the last stage ends with the 1x1 conv to last_channels
        self.units = nn.Sequential(*units)
        self.feature_channels = last_channels
        self.fc = nn.Linear(last_channels, num_classes)
        init_weights(self)


@register_model("shufflenetv1")
def shufflenetv1(num_classes: int, in_channels: int = 3) -> ZooNet:
    return CifarShuffleNetV1(num_classes, in_channels)


@register_model("shufflenetv2")
def shufflenetv2(num_classes: int, in_channels: int = 3) -> ZooNet:
    return CifarShuffleNetV2(num_classes, in_channels)
