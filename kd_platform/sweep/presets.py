"""Recipe presets: ``presets/<name>.yaml``, one per row of the recipes table in METHODS.md.

A preset file has these keys::

    kinds: [single, online]             # the kinds of method the recipe serves ("all": every kind)
    exclude: [pcl]                      # optional: methods of those kinds it cannot serve, and why
    knobs: {dataset: cifar100, ...}     # recipe knobs and method knobs, one flat mapping
    per_method:                         # optional: knobs that differ for some methods
      pcl: {nesterov: true}

A recipe names kinds, not methods, so a method added later is served by every recipe of its
kind without touching the presets; ``exclude`` is for structural limits (a method that needs
a network form the recipe's architecture lacks).

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

from kd_platform.errors import UsageError
from kd_platform.methods.base import MethodKind

PRESET_DIR = Path(__file__).resolve().parents[2] / "presets"
_TOP_KEYS = ("kinds", "exclude", "knobs", "per_method")


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
    kinds = raw.get("kinds")
    if kinds != "all" and (not isinstance(kinds, list) or not kinds
                           or not all(k in {m.value for m in MethodKind} for k in kinds)):
        raise UsageError(f"preset file {path}: 'kinds' must be 'all' or a list of "
                         f"{', '.join(m.value for m in MethodKind)}")
    if not isinstance(raw.get("exclude") or [], list):
        raise UsageError(f"preset file {path}: 'exclude' must be a list of method names")
    per_method = raw.get("per_method") or {}
    if not isinstance(per_method, dict) or not all(isinstance(v, dict) for v in per_method.values()):
        raise UsageError(f"preset file {path}: 'per_method' must map method names to knob mappings")
    return raw


def load_preset(name: str) -> dict[str, Any]:
    """Every knob of preset ``name`` (recipe and method knobs, flat), without the
    per-method exceptions; see :func:`preset_for_method` for what one method should run with."""
    return dict(_read(name)["knobs"])


def preset_methods(name: str) -> list[str]:
    """The methods preset ``name`` serves: every method of its kinds but those it excludes."""
    from kd_platform.methods import get_method, method_names
    raw = _read(name)
    kinds, exclude = raw["kinds"], {str(m) for m in raw.get("exclude") or []}
    return [m for m in method_names() if (kinds == "all" or get_method(m).kind in kinds) and m not in exclude]


def preset_for_method(name: str, method: str) -> dict[str, Any]:
    """The knobs of preset ``name`` that ``method`` runs with: the preset's knobs, then its
    ``per_method`` entry for ``method``, keeping only recipe knobs and ``method``'s own."""
    from kd_platform.config.knobs import knob_specs
    from kd_platform.config.recipe import Recipe
    from kd_platform.methods import get_method
    raw = _read(name)
    merged = {**raw["knobs"], **(raw.get("per_method") or {}).get(method, {})}
    allowed = set(knob_specs(Recipe)) | set(knob_specs(get_method(method).Config))
    return {k: v for k, v in merged.items() if k in allowed}
