"""Wide residual networks.

- ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``: Zagoruyko & Komodakis (2016) WRN-d-k as used by the
  CRD benchmark (Tian et al. 2020, RepDistiller): pre-activation basic blocks, a 16-channel
  stem, stages 16k/32k/64k with (d - 4) / 6 blocks each, a 1x1 conv shortcut (no BN) where the
  shape changes, and a final BN-ReLU before pooling. No dropout, as in the benchmark.
- ``wrn_20_8``: the "WRN-20-8" of the online-distillation papers (OKDDip, PCL, OKDPH code
  bases). Despite the name it is not a Zagoruyko-Komodakis WRN (20 is not 6n + 4): it is the
  CIFAR bottleneck ResNet with [2, 2, 2] blocks (3 convs each, 3 * 6 + 2 = 20 layers) whose
  inner 1x1/3x3 convolutions are 8x wide (torchvision's ``width_per_group = 64 * 8``), so the
  stages are 128/256/512 wide inside and 64/128/256 at their outputs.
"""
from __future__ import annotations

from typing import Iterator

import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.models.base import Stage, ZooNet, init_weights, named
from kd_platform.models.registry import register_model
from kd_platform.models.resnet import RESNET_SPECS, Bottleneck, CifarResNet, ResNetSpec


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # A projecting block sees the activated input on both paths; an identity block adds
        # the raw input, as in the pre-activation ResNet.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(ZooNet):
    """WRN-``depth``-``widen`` for CIFAR-sized inputs of any resolution."""

    stackable = True  # channels mix only in Conv2d/Linear: see kd_platform.models.stacked

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        for i in range(3):
            blocks = [PreActBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                  (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.feature_channels = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self, zero_biases=True)

    def stages(self) -> Iterator[tuple[str, Stage]]:
        """The last stage ends with the final BN-ReLU, so its output is what the head pools."""
        return named({"stem": self.stem, "stage1": self.layer1, "stage2": self.layer2,
                      "stage3": lambda t: F.relu(self.bn(self.layer3(t)))})


def _register(depth: int, widen: int) -> None:
    @register_model(f"wrn_{depth}_{widen}")
    def build(num_classes: int, in_channels: int = 3) -> ZooNet:
        return WideResNet(depth, widen, num_classes, in_channels)


for _depth, _widen in ((16, 2), (40, 1), (40, 2)):
    _register(_depth, _widen)


RESNET_SPECS["wrn_20_8"] = ResNetSpec(Bottleneck, (2, 2, 2), (16, 16, 32, 64), width_factor=8)


@register_model("wrn_20_8")
def wrn_20_8(num_classes: int, in_channels: int = 3) -> ZooNet:
    return CifarResNet(RESNET_SPECS["wrn_20_8"], num_classes, in_channels)
