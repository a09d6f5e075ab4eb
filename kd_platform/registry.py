"""One registry of named entries, filled by the modules of a package on first use.

Methods, architectures and datasets are each one such registry: a module of the package
registers its entries with a decorator, a name registered twice is a programming error, and
an unknown name is the user's, a one-line :class:`UsageError` listing what is known.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, Iterable, TypeVar

from kd_platform.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, package_path: Iterable[str], skip: tuple[str, ...] = ()) -> None:
        self.kind, self.package, self.path, self.skip = kind, package, list(package_path), skip
        self._entries: dict[str, T] = {}
        self._loaded = False

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' registered twice")
        self._entries[name] = entry
        return entry

    def _load_all(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a module registering entries may ask for names itself
            for info in pkgutil.iter_modules(self.path):
                if info.name not in self.skip:
                    importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_all()
        return name in self._entries

    def get(self, name: str) -> T:
        self._load_all()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UsageError(f"unknown {self.kind} '{name}'; known {self.kind}s: {known}")
        return self._entries[name]
