"""CIFAR VGG with batch normalisation, as defined by the CRD benchmark (Tian et al. 2020,
RepDistiller ``vgg8_bn``/``vgg13_bn``/``vgg16_bn``, registered there as vgg8/vgg13/vgg16).

Five conv groups (3x3 conv with bias, BN, ReLU) separated by 2x2 max-pools after the first
three groups, no fully connected stack: global average pooling and one linear layer on the
512-channel output. Configurations follow Simonyan & Zisserman's A/B/D columns; "vgg8" is
the benchmark's single-conv-per-group variant. The benchmark pools a fourth time only for
64x64 inputs; we generalise that to inputs at least 64 pixels high so 32x32 CIFAR images see
exactly the benchmark network.
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor, nn

from kd_platform.models.base import Stage, ZooNet, init_weights
from kd_platform.models.registry import register_model

_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


class CifarVGG(ZooNet):
    """Stages ``stage1``..``stage5``: the conv groups, each with the max-pool after it."""

    stackable = True  # channels mix only in Conv2d/Linear: see kd_platform.models.stacked

    def __init__(self, config: list[list[int]], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        groups, c_in = [], in_channels
        for widths in config:
            layers: list[nn.Module] = []
            for w in widths:
                layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c_in = w
            groups.append(nn.Sequential(*layers))
        self.groups = nn.ModuleList(groups)
        # ceil_mode keeps a 1x1 map at 1x1 instead of collapsing it, so tiny inputs still work.
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.feature_channels = c_in
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self, linear_std=0.01, zero_biases=True)

    def stage_features(self, x: Tensor) -> dict[str, Tensor]:
        # Whether the fourth group pools depends on the input's size, not on a stage's.
        pool_fourth = x.shape[-2] >= 64
        out: dict[str, Tensor] = {}
        for i, group in enumerate(self.groups):
            x = group(x)
            if i < 3 or (i == 3 and pool_fourth):
                x = self.pool(x)
            out[f"stage{i + 1}"] = x
        return out

    def stages(self) -> Iterator[tuple[str, Stage]]:
        raise TypeError("a VGG's stages depend on the input size: use stage_features(x)")

    def features(self, x: Tensor) -> Tensor:
        return self.stage_features(x)[f"stage{len(self.groups)}"]


def _register(name: str) -> None:
    @register_model(name)
    def build(num_classes: int, in_channels: int = 3) -> ZooNet:
        return CifarVGG(_CONFIGS[name], num_classes, in_channels)


for _name in _CONFIGS:
    _register(_name)
