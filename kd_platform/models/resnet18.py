"""ResNet-18 (He et al. 2016, ImageNet basic-block layout [2, 2, 2, 2] with 64-512 channels)
with the small-image stem used for 32x32 and 64x64 inputs in the distillation literature:
a 3x3 stride-1 convolution and no max-pool. This is the TinyImageNet recipe's network."""
from __future__ import annotations

from typing import Iterator

from torch import nn

from kd_platform.models.base import Stage, ZooNet, init_weights, named
from kd_platform.models.registry import register_model
from kd_platform.models.resnet import BasicBlock


class ResNet18(ZooNet):
    stackable = True  # channels mix only in Conv2d/Linear: see kd_platform.models.stacked

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True))
        stages, in_planes = [], 64
        for i, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_channels = 512
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def stages(self) -> Iterator[tuple[str, Stage]]:
        return named({"stem": self.stem, "stage1": self.layer1, "stage2": self.layer2, "stage3": self.layer3,
                      "stage4": self.layer4})


@register_model("resnet18")
def build(num_classes: int, in_channels: int = 3) -> ZooNet:
    return ResNet18(num_classes, in_channels)
