"""From an MLflow store to pandas: a sweep's parent run, its child runs as one table, and
per-epoch histories of the few runs that get plotted.

Params are strings in MLflow; each knob column is typed back as a whole (all ints, all
numbers, all booleans, else strings) so one column never mixes ``1`` and ``"1"``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kd_platform import tracking
from kd_platform.errors import UsageError

PARENT_KINDS = ("sweep", "ablation")
DEFAULT_METRIC = "val/acc/students_mean"
DEFAULT_PREFIX = "default."
SWEPT_PREFIX = "swept."


@dataclass
class Sweep:
    """One sweep: its parent run and one row per child run."""
    parent: Any                      # mlflow.entities.Run
    experiment_name: str
    runs: pd.DataFrame
    knobs: list[str]
    metric: str
    mode: str
    notes: list[str] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.parent.info.run_id

    @property
    def experiment_id(self) -> str:
        return self.parent.info.experiment_id

    @property
    def name(self) -> str:
        return self.parent.info.run_name or self.run_id

    @property
    def params(self) -> dict[str, str]:
        return dict(self.parent.data.params)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.parent.data.tags)

    @property
    def method(self) -> str | None:
        return self.tags.get("method")

    @property
    def ablate(self) -> list[str]:
        raw = self.params.get("ablate", "")
        return [k.strip() for k in raw.split(",") if k.strip()]

    @property
    def is_ablation(self) -> bool:
        return bool(self.ablate)

    @property
    def swept(self) -> dict[str, dict[str, Any]]:
        """The swept knobs' distributions as the sweep logged them (``swept.<knob>`` params)."""
        out = {}
        for key, value in self.params.items():
            if key.startswith(SWEPT_PREFIX):
                try:
                    out[key[len(SWEPT_PREFIX):]] = json.loads(value)
                except ValueError:
                    out[key[len(SWEPT_PREFIX):]] = {}
        return out

    @property
    def defaults(self) -> dict[str, str]:
        """Raw ``default.<knob>`` params of an ablation parent."""
        return {k[len(DEFAULT_PREFIX):]: v for k, v in self.params.items() if k.startswith(DEFAULT_PREFIX)}

    @property
    def sweep_dir(self) -> Path | None:
        raw = self.tags.get("sweep_dir")
        return Path(raw) if raw else None


def open_client(uri: str | None) -> tuple[str, Any]:
    """The resolved tracking URI and a client on it; a sqlite store that does not exist is
    refused rather than created, because opening it would write an empty database."""
    uri = tracking.resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise UsageError(f"no MLflow store at '{path}' (pass --tracking-uri or set MLFLOW_TRACKING_URI)")
    else:
        # A server that is not there fails in seconds here, not after MLflow's retries (minutes).
        tracking.check_reachable(uri)
    return uri, tracking.client(uri)


def check_out_dir(path: Path) -> None:
    """A report folder that is a file, or under one, is refused before anything is read or written."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"--out '{path}': '{p}' is a file, not a directory")
            return


def live_run(c: Any, run_id: str) -> Any:
    """The run ``run_id``; a one-line UsageError when the store has none or it is deleted."""
    from mlflow.exceptions import MlflowException
    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise UsageError(f"no MLflow run with id '{run_id}' in this store") from None
    if run.info.lifecycle_stage == "deleted":
        raise UsageError(f"MLflow run '{run_id}' is deleted")
    return run


def find_parent(c: Any, method: str | None, experiment: str | None, run_id: str | None) -> Any:
    """The sweep parent run: ``run_id`` if given, else the newest parent of the experiment."""
    if run_id:
        run = live_run(c, run_id)
        if run.data.tags.get("kind") == "comparison":
            raise UsageError(f"run '{run_id}' is a comparison, not a sweep: python -m platform.compare --report "
                             f"{run_id} rebuilds its table")
        return run
    name = experiment or method
    if not name:
        raise UsageError("name a method (e.g. okdph), --experiment or --sweep RUN_ID")
    exp = c.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        if method and not experiment:
            _check_method(method)
        raise UsageError(f"no MLflow experiment '{name}' in this store (run a sweep first, or pass --experiment)")
    found = []
    for kind in PARENT_KINDS:
        found += c.search_runs([exp.experiment_id], filter_string=f"tags.kind = '{kind}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise UsageError(f"experiment '{name}' holds no sweep (no run tagged kind=sweep or kind=ablation)")
    return max(found, key=lambda r: r.info.start_time or 0)


def _check_method(method: str) -> None:
    from kd_platform.methods import get_method
    get_method(method)  # raises a UsageError naming the known methods


def load_sweep(c: Any, parent: Any, metric: str | None = None) -> Sweep:
    """The parent run's children as a typed table (one row per child run)."""
    children = list(_search_all(c, parent.info.experiment_id,
                                f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'"))
    if not children:
        raise UsageError(f"run '{parent.info.run_id}' has no child runs; it is not a sweep parent")
    params = parent.data.params
    metric = metric or params.get("metric") or DEFAULT_METRIC
    if metric == params.get("metric") and params.get("mode") in ("max", "min"):
        mode = params["mode"]
    else:  # another metric than the sweep optimised: losses go down, accuracies up
        mode = "min" if "loss" in metric else "max"
    runs, knobs = runs_frame(children)
    exp = c.get_experiment(parent.info.experiment_id)
    sweep = Sweep(parent, exp.name, runs, knobs, metric, mode)
    if metric not in runs.columns:
        raise UsageError(f"no child run of sweep '{sweep.name}' logged metric '{metric}'")
    return sweep


def _search_all(c: Any, experiment_id: str, filter_string: str) -> Iterable[Any]:
    token = None
    while True:
        page = c.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def runs_frame(runs: Iterable[Any]) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: ids, status, outcome, typed knobs (params), final metrics (the value of
    the last step; ``metric.<name>`` where a knob has the same name) and ``tag.<name>``."""
    rows, knob_names = [], []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
               "trial_outcome": tags.get("trial_outcome", "unknown"),
               "epochs_run": tags.get("epochs_run"), "seed": params.get("seed", tags.get("seed"))}
        for key, value in params.items():
            if key != "seed":
                row[key] = value
                if key not in knob_names:
                    knob_names.append(key)
        # A metric named like a knob (the schedule's final ``lr``) must not hide the knob.
        row.update({(f"metric.{k}" if k in params else k): v for k, v in run.data.metrics.items()})
        row.update({f"tag.{k}": v for k, v in tags.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in knob_names + ["epochs_run", "seed"]:
        df[col] = typed(df[col])
    return df, knob_names


def typed(column: pd.Series) -> pd.Series:
    """A string column as ints, numbers or booleans when every present value is one."""
    values = [v for v in column if not _missing(v)]
    complete = len(values) == len(column)
    for convert, dtype in ((_to_bool, "bool" if complete else "boolean"),
                           (_to_int, "int64" if complete else "Int64"), (_to_float, "float64")):
        try:
            mapping = {v: convert(v) for v in values}
        except (TypeError, ValueError):
            continue
        return column.map(lambda v, m=mapping: None if _missing(v) else m[v]).astype(dtype)
    return column


def coerce_like(column: pd.Series, raw: str) -> Any:
    """``raw`` (a ``default.<knob>`` param) converted the way ``column`` was typed."""
    api = pd.api.types
    for check, convert in ((api.is_bool_dtype, _to_bool), (api.is_integer_dtype, _to_int),
                           (api.is_float_dtype, _to_float)):
        if check(column.dtype):
            try:
                return convert(raw)
            except (TypeError, ValueError):
                return raw
    return raw


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    text = str(value).strip()
    if not text.lstrip("-").isdigit():
        raise ValueError(value)
    return int(text)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError(value)
    return float(str(value).strip())


def history(c: Any, run_id: str, key: str) -> pd.Series:
    """One metric of one run by epoch (MLflow step), the last value logged at each step."""
    points = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return pd.Series({m.step: m.value for m in points}, name=key, dtype="float64").sort_index()
