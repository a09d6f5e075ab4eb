"""A comparison run: every (method, column, seed) cell as one trial of a Ray Tune grid, packed
like a sweep's trials, resumable, trained to the last epoch (no scheduler), logged as child
runs of one MLflow parent run tagged ``kind=comparison``.

Layout of ``<out>/<name>/``: Ray Tune's experiment state and checkpoints, ``kd_compare.json``
(what ``--resume`` needs) and ``comparison/`` (the table as Markdown and CSV, and its plot).
Offline methods of one column and seed share one teacher: it is described by its recipe and
seed, so the teacher stage trains it once (under a lock) and every other cell loads it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd_platform import tracking
from kd_platform.compare.plan import PRIMARY, Cell, Column
from kd_platform.compare.references import load_references
from kd_platform.compare.table import Record, Table, build_table, frame, markdown, plot, terminal_lines
from kd_platform.errors import UsageError
from kd_platform.launch.launcher import Launch
from kd_platform.launch.trial import run_trial
from kd_platform.run.spec import RunSpec
from kd_platform.sweep.disk import DiskGuard
from kd_platform.sweep.progress import Progress
from kd_platform.sweep.tuner import (
    SweepInterrupted,
    _fit,
    close_failed,
    close_interrupted,
    restored,
    run_config,
    start_driver,
    with_trial_resources,
)
from kd_platform.tracking.mlflow_callback import MlflowTrialLogger
from kd_platform.tracking.mlflow_writer import UNSENT_FILE
from kd_platform.tracking.models import DEFAULT_LOG_MODELS

STATE_FILE = "kd_compare.json"
REPORT_DIR = "comparison"
KIND = "comparison"


@dataclass
class CompareSettings:
    methods: list[str]
    columns: list[Column]
    cells: list[Cell]
    seeds: list[int]
    baseline: str
    tracking_uri: str
    experiment: str
    out: Path
    name: str
    launch: Launch
    address: str | None = None
    max_concurrent: int | None = None
    protocol: list[str] = field(default_factory=list)  # printed with the table
    resume: bool = False
    parent_run_id: str | None = None
    experiment_id: str | None = None
    finished: bool = False
    verbose: int = 1
    log_models: str = DEFAULT_LOG_MODELS  # "best" logs none: a comparison has no single best to keep
    register: bool = False         # register each column's first-ranked method's best network

    @property
    def run_dir(self) -> Path:
        return self.out / self.name

    @property
    def experiment_path(self) -> str:
        return f"{self.launch.storage_path.rstrip('/')}/{self.name}"

    @property
    def trials(self) -> int:
        return len(self.cells) * len(self.seeds)

    @property
    def epochs(self) -> int:
        return max(int(c.fixed["epochs"]) for c in self.cells)

    def to_json(self) -> dict[str, Any]:
        return {"methods": self.methods, "columns": [asdict(c) for c in self.columns],
                "cells": [c.to_json() for c in self.cells], "seeds": self.seeds, "baseline": self.baseline,
                "tracking_uri": self.tracking_uri, "experiment": self.experiment, "name": self.name,
                "launch": asdict(self.launch), "address": self.address, "max_concurrent": self.max_concurrent,
                "protocol": self.protocol, "parent_run_id": self.parent_run_id,
                "experiment_id": self.experiment_id, "finished": self.finished, "log_models": self.log_models,
                "register": self.register}

    @staticmethod
    def from_dir(path: Path) -> "CompareSettings":
        state = path / STATE_FILE
        if not state.is_file():
            raise UsageError(f"--resume: '{path}' holds no comparison (no {STATE_FILE})")
        try:
            d = json.loads(state.read_text())
            return CompareSettings(list(d["methods"]), [Column(**c) for c in d["columns"]],
                                   [Cell.from_json(c) for c in d["cells"]], list(d["seeds"]), d["baseline"],
                                   d["tracking_uri"], d["experiment"], path.parent, d["name"], Launch(**d["launch"]),
                                   d.get("address"), d.get("max_concurrent"), list(d.get("protocol", [])),
                                   resume=True, parent_run_id=d.get("parent_run_id"),
                                   experiment_id=d.get("experiment_id"), finished=bool(d.get("finished")),
                                   log_models=d.get("log_models", DEFAULT_LOG_MODELS), register=bool(d.get("register")))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--resume: '{state}' is unreadable ({exc})") from None


@dataclass
class CompareOutcome:
    table: Table
    parent_run_id: str
    experiment_id: str
    report: Path
    wall_s: float
    failed: int
    registered: list[str] = field(default_factory=list)  # one line per registered version


def run_cell(config: dict[str, Any], *, cells: dict[str, dict[str, Any]], launch: Launch) -> None:
    """Tune's trainable: the cell named by ``config`` at one seed, as any sweep trial runs."""
    cell = Cell.from_json(cells[config["cell"]])
    run_trial({"seed": config["seed"]}, method=cell.method, fixed=cell.fixed, seed=int(config["seed"]),
              launch=launch, assets=cell.assets)


class CellLogger(MlflowTrialLogger):
    """The sweep's trial logger, with each run's method, knobs and tags taken from its cell."""

    def __init__(self, cells: list[Cell], **kwargs: Any) -> None:
        super().__init__(method="", fixed={}, **kwargs)
        self.cells = {c.key: c for c in cells}

    def spec_of(self, config: dict[str, Any]) -> RunSpec:
        cell = self.cells[config["cell"]]
        return RunSpec.from_flat(cell.method, cell.fixed, int(config["seed"]), cell.assets)

    def run_tags(self, config: dict[str, Any]) -> dict[str, Any]:
        cell = self.cells[config["cell"]]
        return {"method": cell.method, "pair": cell.column, "knobs_from": cell.knobs_from}


def _parent_run(s: CompareSettings, c: Any, experiment_id: str) -> str:
    if s.parent_run_id:
        tracking.reopen(c, s.parent_run_id)
        return s.parent_run_id
    run = c.create_run(experiment_id, run_name=s.name, tags={
        "kind": KIND, "methods": ",".join(s.methods), "pairs": ",".join(col.label for col in s.columns),
        "baseline": s.baseline, "git_commit": tracking.git_commit(), "sweep_dir": str(s.run_dir),
        **tracking.package_versions()})
    params = {"methods": ",".join(s.methods), "pairs": ",".join(col.label for col in s.columns),
              "presets": ",".join(col.preset for col in s.columns), "seeds": len(s.seeds),
              "seed_list": ",".join(map(str, s.seeds)), "baseline": s.baseline, "metric": PRIMARY,
              "workers_per_trial": s.launch.workers, "cpus_per_trial": s.launch.cpus,
              "gpus_per_trial": s.launch.gpus,
              **{f"protocol.{i + 1}": line[:500] for i, line in enumerate(s.protocol)},
              **column_params(s.columns)}
    try:
        tracking.log_params(c, run.info.run_id, params)
    except BaseException:
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    return run.info.run_id


def column_params(columns: list[Column]) -> dict[str, str]:
    """The columns as parent-run params, which ``--report`` reads back."""
    return {f"column.{i + 1}": json.dumps(asdict(c)) for i, c in enumerate(columns)}


def _save_state(s: CompareSettings) -> None:
    (s.run_dir / STATE_FILE).write_text(json.dumps(s.to_json(), indent=2, default=str))


def _tuner(s: CompareSettings, trainable: Any, callbacks: list[Any]) -> Any:
    """Every cell once per seed, to the last epoch (no scheduler); a resumed comparison's grid as it was."""
    from ray import tune
    tuner = restored(s.experiment_path, trainable, callbacks) if s.resume else None
    if tuner is not None:
        return tuner
    space = {"cell": tune.grid_search([c.key for c in s.cells]), "seed": tune.grid_search(s.seeds)}
    return tune.Tuner(trainable, param_space=space,
                      tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=s.max_concurrent,
                                                  reuse_actors=s.launch.in_process()),
                      run_config=run_config(s.name, s.launch.storage_path, callbacks, s.verbose))


def _trainable(s: CompareSettings) -> Any:
    from ray import tune
    return with_trial_resources(tune.with_parameters(run_cell, cells={c.key: c.to_json() for c in s.cells},
                                                     launch=s.launch), s.launch)


def header(s: CompareSettings) -> str:
    cols = ", ".join(f"{c.label} ({c.dataset}, preset {c.preset})" for c in s.columns)
    return (f"{'Resuming' if s.resume else 'Comparison'} {s.name}: {', '.join(s.methods)} on {cols}, "
            f"{len(s.seeds)} seeds each ({s.trials} runs), to the last epoch\n"
            f"  MLflow {s.tracking_uri} (experiment {s.experiment}); results in {s.run_dir}")


def run_compare(s: CompareSettings) -> CompareOutcome:
    """Run (or resume) the comparison ``s``; every input was validated beforehand."""
    t0 = time.perf_counter()
    d = start_driver(s.run_dir, s.resume, s.address, s.launch, s.trials, s.max_concurrent, s.verbose, header(s),
                     s.tracking_uri, s.experiment, "comparison")
    c, experiment_id = d.client, d.experiment_id  # d holds the directory's lock until return
    s.max_concurrent = d.packing.max_concurrent
    s.parent_run_id = _parent_run(s, c, experiment_id)
    logger = CellLogger(s.cells, uri=s.tracking_uri, experiment_id=experiment_id, parent_run_id=s.parent_run_id,
                        seed=s.seeds[0], epochs=s.epochs,
                        tags={"git_commit": tracking.git_commit(), "sweep": s.name, "kind": "trial",
                              "stage": KIND}, unsent=s.run_dir / UNSENT_FILE, log_models=s.log_models)
    try:
        _save_state(s)
        progress = Progress(PRIMARY, s.epochs, ["cell"], s.trials, KIND)
        guard = DiskGuard([str(s.run_dir), s.launch.storage_path], s.max_concurrent or 1)
        callbacks: list[Any] = [logger, progress, guard] if s.verbose == 1 else [logger, guard]
        results = _fit(_tuner(s, _trainable(s), callbacks))
    except SweepInterrupted:
        close_interrupted(c, logger, experiment_id, s.parent_run_id, guard)
        raise
    except BaseException as exc:
        close_failed(exc, c, experiment_id, s.parent_run_id, s.run_dir)
        raise
    failed = sum(1 for r in results if r.error is not None)
    outcome = _finish(s, logger.client, experiment_id, failed, time.perf_counter() - t0)
    logger.close()
    s.finished, s.experiment_id = True, experiment_id
    _save_state(s)
    return outcome


def _finish(s: CompareSettings, c: Any, experiment_id: str, failed: int, wall: float) -> CompareOutcome:
    """The table from the child runs (what ``--report`` rebuilds too), written and logged to the
    parent run, whose status says whether every cell finished."""
    assert s.parent_run_id is not None
    c.flush()
    table = table_of_runs(c.client, experiment_id, s.parent_run_id, s.columns, s.methods, s.baseline)
    report = write_report(table, s.protocol, s.run_dir / REPORT_DIR, s.name)
    for path in sorted(report.parent.iterdir()):
        c.log_artifact(s.parent_run_id, str(path), REPORT_DIR)
    metrics = {"compare/failed": failed, "compare/wall_s": wall}
    for r in table.rows:
        if r.values:
            low, high = r.interval
            base = f"compare/{r.column.replace(':', '-')}/{r.method}"
            metrics.update({f"{base}/mean": r.mean, f"{base}/n": r.n,
                            **({f"{base}/std": r.std, f"{base}/ci_low": low, f"{base}/ci_high": high}
                               if r.n > 1 else {})})
    tracking.log_metrics(c, s.parent_run_id, metrics, step=0)
    tracking.set_tags(c, s.parent_run_id, {"compare.summary": " ".join(table.verdicts())[:5000]})
    registered = register_winners(s, c.client, table) if s.register else []
    c.set_terminated(s.parent_run_id, status="FINISHED" if failed == 0 else "FAILED")
    return CompareOutcome(table, s.parent_run_id, experiment_id, report, wall, failed, registered)


def register_winners(s: CompareSettings, c: Any, table: Table) -> list[str]:
    """``--register``: per column, the network with the best validation accuracy among the runs
    of the first-ranked method with the highest mean, registered as ``kd-<method>-<dataset>-<arch>``
    and tagged with the comparison, its figure with the interval, and the seeds; the lines to print."""
    from kd_platform.tracking import models
    lines = []
    cells = {(c_.method, c_.column): c_ for c_ in s.cells}
    for label in table.columns:
        ranked = [r for r in table.column(label) if r.rank == 1 and r.values]
        if not ranked:
            continue
        top = max(ranked, key=lambda r: r.mean)
        best = models.best_network(c, top.run_ids)
        if best is None:
            lines.append(f"Model registry: no logged model of {top.method} on {label}; nothing registered")
            continue
        acc, run, network = best
        spec = cells[(top.method, label)].spec(int(run.data.tags.get("seed", 0)))
        low, high = top.interval
        shared = [r.method for r in ranked if r is not top]
        tags = {"comparison": s.name, "comparison_run_id": s.parent_run_id, "column": label, "method": top.method,
                "run_id": run.info.run_id, "network": network, "metric": PRIMARY,
                f"{PRIMARY}.mean": f"{top.mean:.4f}", f"{PRIMARY}.std": f"{top.std:.4f}",
                f"{PRIMARY}.ci95": f"[{low:.4f}, {high:.4f}]", "seeds": ",".join(map(str, top.seeds)),
                "rank_shared_with": ",".join(shared) or "none", f"val/acc/{network}": f"{acc:.4f}",
                "knobs_hash": models.knobs_hash(spec)}
        lines.append(models.register(c, models.registered_name(spec, network), models.logged_models(run)[network],
                                     run.info.run_id, tags))
    return lines


def records_of(client: Any, experiment_id: str, parent_run_id: str) -> list[Record]:
    """Every finished cell run of the comparison, from MLflow."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}' "
                                                            f"and attributes.status = 'FINISHED'",
                              max_results=10_000)
    return [Record(r.data.tags["method"], r.data.tags["pair"], int(r.data.tags.get("seed", 0)),
                   dict(r.data.metrics), r.info.run_id)
            for r in runs if "method" in r.data.tags and "pair" in r.data.tags
            and r.data.tags.get("trial_outcome") == "completed"]


def table_of_runs(client: Any, experiment_id: str, parent_run_id: str, columns: list[Column], methods: list[str],
                  baseline: str) -> Table:
    return build_table(records_of(client, experiment_id, parent_run_id), columns, methods, baseline,
                       load_references())


def write_report(table: Table, protocol: list[str], directory: Path, name: str) -> Path:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``directory``; returns the Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    frame(table).to_csv(directory / "comparison.csv", index=False)
    plot(table, directory / "comparison.png")
    path = directory / "comparison.md"
    path.write_text(markdown(table, protocol, f"Comparison {name}"))
    return path


def print_table(table: Table, protocol: list[str]) -> None:
    print("Protocol:")
    for line in protocol:
        print(f"  {line}")
    print(f"test accuracy (%) at the last epoch, students' mean: mean ± std, Student-t 95% interval, seeds; "
          f"Welch vs {table.baseline}, Holm-corrected (* published figure unverified):")
    for line in terminal_lines(table):
        print(line)
    for line in table.verdicts():
        print(line)
