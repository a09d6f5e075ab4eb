"""The architecture zoo, registered by name.

Every model is a :class:`~kd_platform.models.base.ZooNet`: it maps ``(N, C, H, W)`` images
of any size and channel count to logits and exposes the pieces distillation methods need:

- ``stage_features(x)``: every stage's output by name (``stem``, ``stage1``..), in order;
- ``features(x)``: the last stage's map ``(N, feature_channels, h, w)``;
- ``classify(fmap)``: pooling and the linear head, so ``forward(x) == classify(features(x))``;
- ``feature_channels``: the channel count of that map.

Adding an architecture is one ``@register_model("name")`` builder in a module of this
package; the registry imports every module here on first use.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..registry import Registry
from .base import ZooNet

_BUILDERS: Registry[Callable[..., ZooNet]] = Registry("architecture", __name__, __path__)


def register_model(name: str) -> Callable:
    """Decorator registering ``builder(num_classes, in_channels) -> ZooNet`` under ``name``."""
    def wrap(builder: Callable[..., ZooNet]) -> Callable[..., ZooNet]:
        return _BUILDERS.add(name, builder)
    return wrap


def model_names() -> list[str]:
    return _BUILDERS.names()


def build_model(name: str, num_classes: int, in_channels: int = 3) -> ZooNet:
    """A freshly initialised network ``name`` for ``num_classes`` classes."""
    return _BUILDERS.get(name)(num_classes=num_classes, in_channels=in_channels)


def build_multibranch(name: str, num_classes: int, in_channels: int = 3, branches: int = 3) -> nn.Module:
    """A PCL-style multi-branch form of ResNet ``name``: shared stem and first two stages,
    ``branches`` separate last stages with their own heads, and a linear ensemble head over
    the concatenated pooled branch features. ``forward`` returns ``(branch_logits, ensemble)``.
    """
    # Imported here because the ResNet modules import ``register_model`` from this package.
    from .multibranch import build_multibranch as _build
    return _build(name, num_classes, in_channels, branches)
