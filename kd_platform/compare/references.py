"""Published figures a comparison prints beside its own: ``presets/reference/published.yaml``.

Each entry is a top-1 accuracy for one dataset, architecture pair and method, with its source
(paper and table) and, where it was read in that table or the released code's results,
``checked``. An entry without ``checked`` is reported as unverified.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kd_platform.errors import UsageError
from kd_platform.sweep.presets import PRESET_DIR

REFERENCE_FILE = PRESET_DIR / "reference" / "published.yaml"
_KEYS = {"dataset", "pair", "method", "top1", "source", "checked", "protocol"}


@dataclass(frozen=True)
class Published:
    top1: float
    source: str        # the paper and table, in words
    checked: str = ""  # where the figure was read; "" when unverified
    protocol: str = ""

    @property
    def verified(self) -> bool:
        return bool(self.checked)

    def note(self) -> str:
        protocol = f"; {self.protocol}" if self.protocol else ""
        return self.source + ("" if self.verified else " (unverified)") + protocol


def load_references(path: Path = REFERENCE_FILE) -> dict[tuple[str, str, str], Published]:
    """Every entry keyed by (dataset, pair, method); a malformed file is one line naming it."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"reference file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("references"), list):
        raise UsageError(f"reference file {path}: expected 'sources' and a 'references' list")
    sources: dict[str, Any] = raw.get("sources") or {}
    found: dict[tuple[str, str, str], Published] = {}
    for i, entry in enumerate(raw["references"]):
        where = f"reference file {path}, entry {i + 1}"
        if not isinstance(entry, dict) or not {"dataset", "pair", "method", "top1", "source"} <= set(entry):
            raise UsageError(f"{where}: needs dataset, pair, method, top1 and source")
        extra = set(entry) - _KEYS
        if extra:
            raise UsageError(f"{where}: unknown key '{sorted(extra)[0]}'")
        if entry["source"] not in sources:
            raise UsageError(f"{where}: source '{entry['source']}' is not under 'sources'")
        key = (str(entry["dataset"]), str(entry["pair"]), str(entry["method"]))
        found[key] = Published(float(entry["top1"]), str(sources[entry["source"]]), str(entry.get("checked") or ""),
                               str(entry.get("protocol") or ""))
    return found


def published(refs: dict[tuple[str, str, str], Published], dataset: str, pairs: list[str],
              method: str) -> Published | None:
    """The figure for ``method`` under the first of ``pairs`` that has one."""
    return next((refs[(dataset, p, method)] for p in pairs if (dataset, p, method) in refs), None)
