"""MobileNetV2 (Sandler et al. 2018) in the CIFAR form used by the CRD benchmark (Tian et al.
2020, RepDistiller ``mobile_half``, from Jin et al.'s RCO code), which distillation papers
report simply as "MobileNetV2".

Width multiplier 0.5 and expansion ratio 6 on the standard inverted-residual table, with the
CIFAR strides: a stride-2 stem, stride 1 in the 24-channel stage and stride 2 in the 32-, 64-
and 160-channel stages (16x total reduction, so 32x32 inputs end at 2x2). The last 1x1 conv
keeps 1280 channels (the multiplier is not applied below 1.0). Unlike the paper, the
expansion-1 block still has its 1x1 expand conv, as in the benchmark code.
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor, nn

from kd_platform.models.base import Stage, ZooNet, init_weights, split_sequential
from kd_platform.models.registry import register_model

# (expansion, output channels at width 1.0, blocks, stride of the first block)
_SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
             relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(*_conv_bn(c_in, hidden, 1),
                                  *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  *_conv_bn(hidden, c_out, 1, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(ZooNet):
    """Stages: the stem, then one stage per resolution (the last ends with the 1x1 conv to
    1280 channels)."""

    stackable = True  # channels mix only in Conv2d/Linear: see kd_platform.models.stacked

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5,
                 expansion: int = 6) -> None:
        super().__init__()
        c = int(32 * width_mult)
        layers: list[nn.Module] = list(_conv_bn(in_channels, c, 3, 2))
        self._stage_ends = [len(layers)]
        for t, c_base, n, s in _SETTING:
            if s == 2:  # a new resolution starts a new stage
                self._stage_ends.append(len(layers))
            c_out = int(c_base * width_mult)
            for j in range(n):
                layers.append(InvertedResidual(c, c_out, s if j == 0 else 1, expansion if t != 1 else 1))
                c = c_out
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        layers += _conv_bn(c, last, 1)
        self._stage_ends.append(len(layers))
        self.body = nn.Sequential(*layers)
        self.feature_channels = last
        self.fc = nn.Linear(last, num_classes)
        init_weights(self, linear_std=0.01, zero_biases=True)

    def stages(self) -> Iterator[tuple[str, Stage]]:
        names = ["stem"] + [f"stage{i}" for i in range(1, len(self._stage_ends))]
        return split_sequential(self.body, self._stage_ends, names)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # the whole body at once: no per-call slicing on the hot path


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int = 3) -> ZooNet:
    return CifarMobileNetV2(num_classes, in_channels)
