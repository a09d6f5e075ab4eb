"""MLflow bookkeeping: where the store is, experiments, run tags, params and metrics.

Everything goes through ``MlflowClient`` with explicit experiment and run ids, because
the fluent API keeps process-global state (an active run, ``MLFLOW_EXPERIMENT_ID``) that
does not survive the hop from the sweep driver to Ray's processes.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError

DEFAULT_DB = "mlruns.db"
PARENT_TAG = "mlflow.parentRunId"


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite store in the working directory;
    a relative sqlite path is made absolute because Ray's processes change directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:
        raise UsageError(f"tracking URI '{uri}' is not a URI (expected e.g. sqlite:///mlruns.db or http://host:5000)")
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before anything starts if the store cannot be written (sqlite) or reached (http)."""
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise UsageError(f"tracking URI '{uri}': directory '{parent}' does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"tracking URI '{uri}': directory '{parent}' is not writable")
    elif uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
                pass
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(f"tracking URI '{uri}' is unreachable ({reason})") from None


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store go beside the database file, not into whatever
    directory a Ray worker happens to run in."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def client(uri: str) -> "MlflowClient":  # noqa: F821
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Id of experiment ``name``, created (with a local artifact root) if missing."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(uri)
    return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("torch", "ray", "optuna", "mlflow", "kd-platform"):
        try:
            out[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def log_params(c: Any, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=items[i:i + 100])


def log_metrics(c: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and (k == "epoch" or "/" in k or k == "lr")]
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i:i + 1000])


def set_tags(c: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag
    c.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def ui_command(uri: str) -> str:
    """The exact command that opens the MLflow UI on this store (bound to 127.0.0.1)."""
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"
