"""CIFAR-style ResNets (He et al. 2016, section 4.2): a 3x3 stem and three stages of
residual blocks, the second and third stage halving the resolution.

Registered here:

- ``resnet8`` ... ``resnet110``: basic blocks, stem 16 and stages 16/32/64, depth = 6n + 2.
  This is the definition used by DML, PCL, OKDPH and the CRD/DIST offline benchmarks
  (projection shortcuts, i.e. a 1x1 conv + BN wherever the shape changes).
- ``resnet8x4``, ``resnet32x4``: the CRD benchmark's (Tian et al. 2020, RepDistiller) 4x wide
  variants: stem 32, stages 64/128/256.
- ``resnet110_bottleneck``: the "ResNet-110" of the online-distillation papers (ONE, CL-ILR,
  OKDDip, PCL, OKDPH): bottleneck blocks, [12, 12, 12] per stage, planes 16/32/64 with
  expansion 4, so depth = 9n + 2 and the last stage has 256 channels.

Every architecture is described by a :class:`ResNetSpec` in :data:`RESNET_SPECS`; the
multi-branch builder splits the same specs into a shared trunk and per-branch last stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.models.base import Stage, ZooNet, init_weights, named
from kd_platform.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``width_factor`` exists only for signature parity with :class:`Bottleneck`."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, width_factor: int = 1) -> None:
        super().__init__()
        if width_factor != 1:
            raise ValueError("BasicBlock has no inner width to widen")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``planes * 4``.

    ``width_factor`` multiplies the two inner convolutions only; the online papers' WRN-20-8
    is this block with ``width_factor=8``.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, width_factor: int = 1) -> None:
        super().__init__()
        width, out_planes = planes * width_factor, planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                         nn.BatchNorm2d(out_planes))


@dataclass(frozen=True)
class ResNetSpec:
    """``widths[0]`` is the stem width, ``widths[1:]`` the stages' planes (before expansion)."""

    block: type[BasicBlock] | type[Bottleneck]
    blocks_per_stage: tuple[int, int, int]
    widths: tuple[int, int, int, int]
    width_factor: int = 1

    def stage_in_planes(self, stage: int) -> int:
        """Channels entering stage ``stage`` (0-based)."""
        if stage == 0:
            return self.widths[0]
        return self.widths[stage] * self.block.expansion

    @property
    def out_channels(self) -> int:
        return self.widths[3] * self.block.expansion


def make_stem(spec: ResNetSpec, in_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, spec.widths[0], 3, 1, 1, bias=False),
                         nn.BatchNorm2d(spec.widths[0]), nn.ReLU(inplace=True))


def make_stage(spec: ResNetSpec, stage: int) -> nn.Sequential:
    """Stage ``stage`` (0-based) of ``spec``; stages 1 and 2 start with a stride-2 block."""
    in_planes, planes = spec.stage_in_planes(stage), spec.widths[stage + 1]
    blocks = []
    for j in range(spec.blocks_per_stage[stage]):
        stride = 2 if (stage > 0 and j == 0) else 1
        blocks.append(spec.block(in_planes, planes, stride, spec.width_factor))
        in_planes = planes * spec.block.expansion
    return nn.Sequential(*blocks)


class CifarResNet(ZooNet):
    """Stem, three stages (``layer1``..``layer3``), global average pooling and a linear head."""

    stackable = True  # channels mix only in Conv2d/Linear: see kd_platform.models.stacked

    def __init__(self, spec: ResNetSpec, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = make_stem(spec, in_channels)
        self.layer1 = make_stage(spec, 0)
        self.layer2 = make_stage(spec, 1)
        self.layer3 = make_stage(spec, 2)
        self.feature_channels = spec.out_channels
        self.fc = nn.Linear(self.feature_channels, num_classes)
        init_weights(self)

    def stages(self) -> Iterator[tuple[str, Stage]]:
        return named({"stem": self.stem, "stage1": self.layer1, "stage2": self.layer2, "stage3": self.layer3})


RESNET_SPECS: dict[str, ResNetSpec] = {}


def _register(name: str, spec: ResNetSpec) -> None:
    RESNET_SPECS[name] = spec

    @register_model(name)
    def build(num_classes: int, in_channels: int = 3) -> ZooNet:
        return CifarResNet(spec, num_classes, in_channels)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _n = (_depth - 2) // 6
    _register(f"resnet{_depth}", ResNetSpec(BasicBlock, (_n, _n, _n), (16, 16, 32, 64)))

_register("resnet8x4", ResNetSpec(BasicBlock, (1, 1, 1), (32, 64, 128, 256)))
_register("resnet32x4", ResNetSpec(BasicBlock, (5, 5, 5), (32, 64, 128, 256)))
_register("resnet110_bottleneck", ResNetSpec(Bottleneck, (12, 12, 12), (16, 16, 32, 64)))
