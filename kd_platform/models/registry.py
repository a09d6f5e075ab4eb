"""The architecture registry: a leaf, so the zoo's modules register into it without importing
their own package."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from kd_platform.models.base import ZooNet
from kd_platform.registry import Registry

_BUILDERS: Registry[Callable[..., ZooNet]] = Registry(
    "architecture", __name__.rpartition(".")[0], [str(Path(__file__).parent)], skip=("registry",))


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
