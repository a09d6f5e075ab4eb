"""Distillation methods, one module each, registered by name.

Adding a method is one module here with a ``@register_method`` class, one
``search_spaces/<name>.yaml`` and its tests; the registry imports every module of
this package on first use.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import UsageError
from .base import Method

_METHODS: dict[str, type[Method]] = {}
_loaded = False


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method '{cls.name}' registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def method_names() -> list[str]:
    _load_all()
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    _load_all()
    if name not in _METHODS:
        raise UsageError(f"unknown method '{name}'; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
