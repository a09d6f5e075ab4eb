"""Distillation methods, one module each, registered by name.

Adding a method is one module here with a ``@register_method`` class, one
``search_spaces/<name>.yaml`` and its tests; the registry imports every module of
this package on first use.
"""
from __future__ import annotations

from ..registry import Registry
from .base import Method

_METHODS: Registry[type[Method]] = Registry("method", __name__, __path__, skip=("base",))


def register_method(cls: type[Method]) -> type[Method]:
    return _METHODS.add(cls.name, cls)


def method_names() -> list[str]:
    return _METHODS.names()


def get_method(name: str) -> type[Method]:
    return _METHODS.get(name)
