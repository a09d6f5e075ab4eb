"""The GPU machine's bare environment, imitated in any Python environment: with this
directory first on ``PYTHONPATH``, only the standard library, the checkout's own code,
torch, torchvision, numpy and pyyaml, and the distributions they require, can be imported.
Everything else installed here (Ray, MLflow, Optuna, pandas, SciPy, ...) raises
ModuleNotFoundError, as it would there; code that guards an optional import sees it absent.

    PYTHONPATH=bench/bare:. python bench/gpu.py --sim-cuda --out /tmp/gpu

An allowlist rather than a list of refusals, so that a new dependency nobody thought of is
caught too. Child processes inherit ``PYTHONPATH``, and with it the same rule.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import site
import sys
from typing import Any, Iterator

ROOTS = ("torch", "torchvision", "numpy", "pyyaml")
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def required_distributions(roots: tuple[str, ...] = ROOTS) -> set[str]:
    """``roots`` and everything they require, extras followed only where a requirement asks."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        key = _canon(name) + "[" + ",".join(sorted(extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        for req in requires:
            spec, _, marker = req.partition(";")
            wanted = _EXTRA.search(marker)
            if wanted and wanted.group(1) not in extras:
                continue
            m = _NAME.match(spec)
            if m:
                todo.append((m.group(1), frozenset(e.strip() for e in (m.group(2) or "").split(",") if e.strip())))
    return {k.split("[")[0] for k in seen}


def allowed_modules(dists: set[str]) -> set[str]:
    return {module for module, owners in importlib.metadata.packages_distributions().items()
            if any(_canon(d) in dists for d in owners)}


def _installed_dirs() -> tuple[str, ...]:
    dirs = [*site.getsitepackages(), site.getusersitepackages(),
            *(p for p in sys.path if "site-packages" in p or "dist-packages" in p)]
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


class BareEnvironment(importlib.abc.MetaPathFinder):
    """Python's own path finder, except that a top-level module installed outside the allowed
    distributions is not found: importing it raises ModuleNotFoundError, and
    ``importlib.util.find_spec`` (which optional imports probe with) returns None."""

    def __init__(self) -> None:
        self.dists = required_distributions()
        modules = allowed_modules(self.dists)
        self.allowed = modules | set(sys.stdlib_module_names)
        self.installed = _installed_dirs()
        # What an allowed package vendors and puts on sys.path itself (setuptools' _vendor
        # folder, which pkg_resources imports jaraco from) is part of that package.
        self.inside_allowed = tuple(d + m + os.sep for d in self.installed for m in modules)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or path is not None or fullname in self.allowed:
            return spec  # a submodule's parent was allowed already
        places = [spec.origin] if spec.origin and spec.origin != "namespace" else []
        places += list(spec.submodule_search_locations or [])
        real = [os.path.realpath(p) for p in places]
        if real and all(p.startswith(self.installed) and not p.startswith(self.inside_allowed) for p in real):
            # Hidden; but an allowed package's own copy further down sys.path is what the
            # GPU machine would import (setuptools' vendored packaging).
            vendored = [p for p in sys.path if os.path.realpath(p).startswith(self.inside_allowed)]
            return importlib.machinery.PathFinder.find_spec(fullname, vendored, target) if vendored else None
        return spec  # the checkout's own code

    def find_distributions(self, context: Any = None) -> Iterator[Any]:
        """``importlib.metadata`` asks the path finder too: only the allowed distributions."""
        found = importlib.machinery.PathFinder.find_distributions(
            context or importlib.metadata.DistributionFinder.Context())
        return (d for d in found if _canon(d.metadata["Name"] or "") in self.dists)

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()


# In the place of Python's path finder, so no later finder finds what this one hides.
sys.meta_path[:] = [BareEnvironment() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
