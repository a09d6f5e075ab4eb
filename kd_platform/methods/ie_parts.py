"""Building blocks of inheritance-and-exploration distillation (IE-KD; Huang et al., CVPR 2021).

A feature map is compressed into a "factor" by a small convolutional encoder: three 3x3
conv + BN + LeakyReLU(0.1) layers; the factor is the encoder output flattened and
L2-normalised per sample. The target side trains an auto-encoder (the same stack as
decoder) with mean L1 reconstruction; the learner splits its own map by channels into an
inheritance part, pulled towards the target factor, and an exploration part, pushed away
from it, each with its own encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.config.knobs import knob
from kd_platform.methods.base import MethodConfig

DISTANCES = ("l1", "l2", "cos")


@dataclass(frozen=True)
class IEKnobs(MethodConfig):
    """The knobs every inheritance/exploration method has; a method's config inherits them."""
    rate: float = knob(0.5, low=0.01, high=4.0, help="code channels k = rate * C")
    split: float = knob(0.5, low=0.01, high=0.99, help="fraction of channels in the inheritance part")
    split_mode: str = knob("natural", choices=("natural", "random"),
                           help="natural: the first channels inherit; random: a fixed random permutation")
    distance: str = knob("l1", choices=DISTANCES, help="D: mean |x-y| (l1), mean (x-y)^2 (l2) or 1 - cos")
    l_inh: float = knob(50.0, low=0.0, high=10000.0, help="weight of the inheritance (similarity) term")
    l_exp: float = knob(50.0, low=0.0, high=10000.0, help="weight of the exploration (dis-similarity) term")


def conv_stack(in_channels: int, out_channels: int, layers: int = 3) -> nn.Sequential:
    """``layers`` x (3x3 conv + BN + LeakyReLU(0.1)); the first changes the width, spatial size is kept."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=False),
                 nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1)]
    return nn.Sequential(*mods)


def factor_channels(channels: int, rate: float) -> int:
    """``k = rate * C`` rounded, at least 1."""
    return max(1, round(rate * channels))


def to_factor(code: Tensor) -> Tensor:
    """Flatten per sample and L2-normalise."""
    return F.normalize(code.flatten(1), dim=1)


def factor_distance(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """``l1``: mean |a - b|; ``l2``: mean (a - b)^2; ``cos``: mean over samples of 1 - cos(a, b)."""
    if kind == "l1":
        return (a - b).abs().mean()
    if kind == "l2":
        return (a - b).pow(2).mean()
    if kind == "cos":
        return (1.0 - F.cosine_similarity(a, b, dim=1)).mean()
    raise ValueError(f"unknown distance '{kind}'; expected one of {', '.join(DISTANCES)}")


class FactorAutoEncoder(nn.Module):
    """Compresses a ``channels``-wide map to ``k`` channels and back."""

    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.encoder = conv_stack(channels, k)
        self.decoder = conv_stack(k, channels)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        """``(code, mean L1 reconstruction loss)`` of ``fmap``."""
        code = self.encoder(fmap)
        return code, (self.decoder(code) - fmap).abs().mean()


class InheritExploreSplit(nn.Module):
    """Splits a map by channels and encodes the two parts into factors ``(f_I, f_E)``.

    ``mode=natural`` gives the inheritance part the first ``split * C`` channels; ``random``
    uses a permutation drawn once at construction and kept as a buffer, so a checkpoint
    restores the same split.
    """

    order: Tensor  # registered buffer: the channel permutation

    def __init__(self, channels: int, k: int, split: float = 0.5, mode: str = "natural") -> None:
        super().__init__()
        if channels < 2:
            raise ValueError("an inheritance/exploration split needs at least two channels")
        if mode not in ("natural", "random"):
            raise ValueError(f"unknown split mode '{mode}'; expected natural or random")
        self.n_inherit = min(max(round(split * channels), 1), channels - 1)
        order = torch.randperm(channels) if mode == "random" else torch.arange(channels)
        self.register_buffer("order", order)
        self.inherit = conv_stack(self.n_inherit, k)
        self.explore = conv_stack(channels - self.n_inherit, k)

    def forward(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        shuffled = fmap.index_select(1, self.order)
        return (to_factor(self.inherit(shuffled[:, :self.n_inherit])),
                to_factor(self.explore(shuffled[:, self.n_inherit:])))
