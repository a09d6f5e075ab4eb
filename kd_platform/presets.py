"""Recipe presets: ``presets/<name>.yaml``, one per row of the recipes table in METHODS.md.

A preset file has three keys::

    methods: [ce, dml, okdph]          # the methods the recipe is meant for ("all": every one)
    knobs: {dataset: cifar100, ...}     # recipe knobs and method knobs, one flat mapping
    per_method:                         # optional: knobs that differ for some methods
      pcl: {nesterov: true}

The same recipe serves every method on the same data, so that comparisons are fair; the
few published exceptions (PCL and DKEL train with Nesterov momentum; OKDPH's released code
gives each network its own augmentation) live under ``per_method``. A preset may hold
knobs a given method does not have (``teacher_arch`` for an online method):
:func:`preset_for_method` drops them, :func:`load_preset` returns them all. Values are not
validated here; ``RunSpec.from_flat`` does that for the method actually run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
_TOP_KEYS = ("methods", "knobs", "per_method")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown preset '{name}'; known: {', '.join(preset_names()) or 'none'}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"preset file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("knobs"), dict):
        raise UsageError(f"preset file {path}: expected a mapping with a 'knobs' mapping")
    extra = set(raw) - set(_TOP_KEYS)
    if extra:
        raise UsageError(f"preset file {path}: unknown key '{sorted(extra)[0]}'; known: {', '.join(_TOP_KEYS)}")
    per_method = raw.get("per_method") or {}
    if not isinstance(per_method, dict) or not all(isinstance(v, dict) for v in per_method.values()):
        raise UsageError(f"preset file {path}: 'per_method' must map method names to knob mappings")
    return raw


def load_preset(name: str) -> dict[str, Any]:
    """Every knob of preset ``name`` (recipe and method knobs, flat), without the
    per-method exceptions; see :func:`preset_for_method` for what one method should run with."""
    return dict(_read(name)["knobs"])


def preset_methods(name: str) -> list[str]:
    """The methods preset ``name`` is written for."""
    from .methods import method_names
    methods = _read(name).get("methods") or []
    if methods == "all":
        return method_names()
    return [str(m) for m in methods]


def preset_for_method(name: str, method: str) -> dict[str, Any]:
    """The knobs of preset ``name`` that ``method`` runs with: the preset's knobs, then its
    ``per_method`` entry for ``method``, keeping only recipe knobs and ``method``'s own."""
    from .knobs import knob_specs
    from .methods import get_method
    from .recipe import Recipe
    raw = _read(name)
    merged = {**raw["knobs"], **(raw.get("per_method") or {}).get(method, {})}
    allowed = set(knob_specs(Recipe)) | set(knob_specs(get_method(method).Config))
    return {k: v for k, v in merged.items() if k in allowed}
