"""The method registry: a leaf, so method modules register into it without importing their
own package."""
from __future__ import annotations

from pathlib import Path

from kd_platform.methods.base import Method
from kd_platform.registry import Registry

_METHODS: Registry[type[Method]] = Registry(
    "method", __name__.rpartition(".")[0], [str(Path(__file__).parent)], skip=("base", "registry"))


def register_method(cls: type[Method]) -> type[Method]:
    return _METHODS.add(cls.name, cls)


def method_names() -> list[str]:
    return _METHODS.names()


def get_method(name: str) -> type[Method]:
    return _METHODS.get(name)
