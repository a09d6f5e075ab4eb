"""Distillation methods, one module each, registered by name (layer: methods; imports the
config, models and data layers, never a run, a tracker or Ray).

Adding a method is one module here with a ``@register_method`` class, one
``search_spaces/<name>.yaml`` and its tests; the registry (``methods/registry.py``) imports
every module of this package on first use.
"""
from __future__ import annotations

from kd_platform.methods.base import Method
from kd_platform.methods.registry import get_method, method_names, register_method

__all__ = ["Method", "get_method", "method_names", "register_method"]
