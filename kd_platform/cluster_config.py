"""Offline validation of a Ray cluster config with Ray's own schema and rules.

``python -m platform.check_cluster cluster.yaml`` runs it before ``ray up``, so a typo in
the config is one line here instead of a half-started cluster. After ``ray up``,
``python -m platform.check_cluster --smoke`` trains on every node (``cluster_smoke``).
"""
from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from kd_platform.errors import UsageError


def check_cluster_config(path: Path) -> dict[str, Any]:
    """The config as ``ray up`` would use it; a ``UsageError`` naming the file if Ray rejects it."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # keep errors to one line
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"cluster config '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UsageError(f"cluster config '{path}': malformed YAML") from None
    if not isinstance(raw, dict):
        raise UsageError(f"cluster config '{path}': expected a mapping")
    try:
        config = prepare_config(copy.deepcopy(raw))
        validate_config(config)
    except Exception as exc:  # jsonschema, ValueError and click errors all mean "Ray rejects it"
        first = str(getattr(exc, "message", exc)).strip().splitlines()[0]
        raise UsageError(f"cluster config '{path}' is invalid: {first}") from None
    return config


USAGE = ("usage: python -m platform.check_cluster CLUSTER_YAML\n"
         "       python -m platform.check_cluster --smoke [--address ADDRESS] [--timeout SECONDS]")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--smoke":
        return smoke_main(args[1:])
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        config = check_cluster_config(Path(args[0]))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args[0]}: valid ({config.get('provider', {}).get('type', '?')} provider, "
          f"{len(config.get('available_node_types', {}))} node types)")
    return 0


def smoke_main(args: Sequence[str]) -> int:
    """0 when every node passed, 1 when one failed, 2 for a bad command line or no cluster."""
    from kd_platform.cluster_smoke import format_rows, parse_smoke_args, run_smoke
    try:
        address, timeout = parse_smoke_args(args)
        print(f"Training OKDPH resnet8 x2 on every node of the Ray cluster at '{address}' ...", flush=True)
        rows = run_smoke(address, timeout)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in format_rows(rows):
        print(line)
    return 0 if rows and all(r.get("ok") for r in rows) else 1
