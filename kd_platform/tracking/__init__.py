"""Layer tracking: everything that writes to or reads MLflow during a run or a sweep (this
module: the store, experiments, tags, params and UI URLs; the writer, the sweep's callback,
the Ray Train controller's writer and a run's reporter beside it). Imports run and teachers.

MLflow bookkeeping: where the store is, experiments, run tags, params and metrics.

Everything goes through ``MlflowClient`` with explicit experiment and run ids, because
the fluent API keeps process-global state (an active run, ``MLFLOW_EXPERIMENT_ID``) that
does not survive the hop from the sweep driver to Ray's processes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from kd_platform.errors import UsageError

DEFAULT_DB = "mlruns.db"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3 sorts experiments into GenAI and model-training ones by this tag.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The UI (3.17) chooses its view from the route's query, not from the experiment's tag: a hash
# route takes it after the route (``#/experiments/1/runs?workflowType=...``); without it the UI
# opens the GenAI view (traces, token usage) it remembers or defaults to.
UI_QUERY = "?workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where ``ui_command`` serves a sqlite store
DATASET_CONTEXT_TAG = "mlflow.data.context"


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite store in the working directory;
    a relative sqlite path is made absolute because Ray's processes change directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB}"
    _check_scheme(uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri and uri != "databricks" and not uri.startswith("file:"):
        raise UsageError(f"tracking URI '{uri}' is not a URI (expected e.g. sqlite:///mlruns.db or http://host:5000)")
    return uri


# Stores this platform writes to: sqlite files, tracking servers, Databricks, and the
# databases SQLAlchemy reaches (a driver may follow the dialect, as in postgresql+psycopg2).
URI_SCHEMES = ("sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")


def _check_scheme(uri: str) -> None:
    """Reject a URI whose scheme no supported store has, with one line, before anything starts."""
    if uri == "databricks" or "://" not in uri and not uri.startswith("file:"):
        return  # a bare path: resolve_tracking_uri says it is not a URI
    scheme = uri.split(":", 1)[0].lower()
    if scheme == "file":
        if not os.environ.get("MLFLOW_ALLOW_FILE_STORE"):
            raise UsageError(f"--tracking-uri: MLflow no longer accepts the file store '{uri}' "
                             f"(unless MLFLOW_ALLOW_FILE_STORE is set); use sqlite:///path.db")
        return
    if scheme.split("+", 1)[0] not in URI_SCHEMES:
        raise UsageError(f"--tracking-uri: unsupported scheme '{scheme}'; use sqlite:///path.db or http(s)://host:port")


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


# MLflow's own HTTP retries (7, doubling from 2 s) would hold one call for minutes while a
# server is down; the platform retries itself (mlflow_writer), so each try stays short.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def _quiet_lock_errors(record: logging.LogRecord) -> bool:
    """MLflow logs a traceback for a sqlite lock that outlasts its busy wait (20 s) before it
    raises; the platform retries the write and reports the wait in its own words."""
    return "database is locked" not in record.getMessage()


def raw_client(uri: str) -> Any:
    """A plain ``MlflowClient``: each call tried once (briefly retried by MLflow over HTTP)."""
    from mlflow.tracking import MlflowClient

    from kd_platform.tracking.mlflow_writer import call_with_retry, patience_s
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    db_log = logging.getLogger("mlflow.store.db.utils")
    db_log.setLevel(logging.WARNING)  # "Creating initial MLflow database tables" is no news to a user
    if _quiet_lock_errors not in db_log.filters:
        db_log.addFilter(_quiet_lock_errors)
    # The first client of a process opens the store, and of a new file creates its tables: two
    # sweeps starting at once on one file would both create them. A lock beside the file makes
    # them take turns; the second finds the tables made.
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return call_with_retry(MlflowClient, tracking_uri=uri, patience=patience_s())


def client(uri: str) -> Any:
    """An ``MlflowClient`` whose calls wait out a store that is briefly away or locked
    (``mlflow_writer.RetryingClient``)."""
    from kd_platform.tracking.mlflow_writer import RetryingClient
    return RetryingClient(raw_client(uri))


def ensure_experiment(uri: str, name: str) -> str:
    """Id of experiment ``name``, created (with a local artifact root) if missing, and tagged
    as a model-training experiment (an existing one too)."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root(uri)
        try:
            return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                       tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception as exc:  # another sweep on the same store created it a moment ago
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = c.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


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


def log_metrics(c: Any, run_id: str, metrics: Mapping[str, Any], step: int, **batch: Any) -> None:
    """The numeric metrics of ``metrics`` at ``step``; ``batch`` goes to ``c.log_batch`` (a
    ``BufferedClient`` takes a ``guard``)."""
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and (k == "epoch" or "/" in k or k == "lr")]
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i:i + 1000], **batch)


def set_tags(c: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag
    c.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def reopen(c: Any, run_id: str, tags: Mapping[str, str] | None = None) -> None:
    """Mark a run that ``--resume`` continues RUNNING again. The error its interrupted attempt
    left is kept as ``error.previous``: under ``error`` it would stay on a run that then finishes."""
    if tags is None:
        tags = c.get_run(run_id).data.tags
    if "error" in tags:
        set_tags(c, run_id, {"error.previous": tags["error"]})
        c.delete_tag(run_id, "error")
    c.update_run(run_id, status="RUNNING")


def ui_command(uri: str) -> str:
    """The exact command that opens the MLflow UI on this store (bound to 127.0.0.1)."""
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


def ui_base(uri: str) -> str | None:
    """Where the UI of this store is browsed: the server itself, or for a sqlite store the
    ``mlflow ui`` that ``ui_command`` starts; None for a store without a UI."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    if uri.startswith("sqlite:"):
        return LOCAL_UI
    return None


def ui_url(uri: str, experiment_id: str, run_id: str | None = None, page: str = "") -> str | None:
    """The UI's page of an experiment's runs table, or of one run (``page``: a tab of it such
    as ``artifacts``), in the model-training view."""
    base = ui_base(uri)
    if base is None:
        return None
    route = f"#/experiments/{experiment_id}/runs"
    if run_id:
        route += f"/{run_id}" + (f"/{page}" if page else "")
    return f"{base}/{route}{UI_QUERY}"


def describe_data(recipe: Any, seed: int) -> Any:
    """The data a run trains and evaluates on, as an MLflow dataset: named after the dataset,
    its digest a hash of the dataset's name and of which samples (indices and labels) each split
    holds, its profile the split sizes. Builds the data module on the CPU, which reads labels
    (and, for file datasets, the files' index) but decodes no image."""
    import torch
    from mlflow.entities import Dataset

    from kd_platform.data import build_data
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the run itself logs the dataset's warnings
    try:
        data = build_data(recipe, seed, torch.device("cpu"))
    finally:
        root.setLevel(level)
    splits = getattr(data, "splits", {})
    h = hashlib.sha256(recipe.dataset.encode())
    for name in sorted(splits):
        split = splits[name]
        h.update(name.encode())
        h.update(split.indices.to(torch.int64).numpy().tobytes())
        h.update(split.labels.to(torch.int64).numpy().tobytes())
    sizes = {name: len(splits[name]) if name in splits else 0 for name in ("train", "val", "test")}
    profile = {"num_rows": sum(sizes.values()), **{f"{k}_size": v for k, v in sizes.items()},
               "num_classes": data.num_classes, "image_shape": [data.in_channels, data.image_size,
                                                                data.image_size]}
    source: dict[str, Any]
    if recipe.data_dir:
        source_type, source = "local", {"uri": str(Path(recipe.data_dir).expanduser().resolve())}
    else:  # shipped with a package (digits): the module that loads it is its source
        source_type, source = "code", {"tags": {"mlflow.source.name": f"{__package__}.data.{recipe.dataset}"}}
    return Dataset(name=recipe.dataset, digest=h.hexdigest()[:16], source_type=source_type,
                   source=json.dumps(source), profile=json.dumps(profile))


def log_dataset(c: Any, run_id: str, dataset: Any) -> None:
    """Record ``dataset`` (from ``describe_data``) as the run's training input."""
    from mlflow.entities import DatasetInput, InputTag
    c.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, "training")])])
