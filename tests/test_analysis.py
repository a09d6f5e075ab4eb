"""The ablation analysis on a real sqlite MLflow store and a real Optuna study, filled with
runs whose metrics the test chose, so every number in the tables can be checked against an
independent pandas computation."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import runpy
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, run_cli, sqlite_uri

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC = "val/acc/students_mean"
EXTRA = "flat/hessian_trace/student1"  # an extra metric the runs log, as flatness=final would
STAT_COLUMNS = ["ci95_low", "ci95_high", "diff_ci95_low", "diff_ci95_high", "p_vs_default", "p_holm"]
EPOCHS = 3
# An OKDPH-like ablation around the default omega=0.8, fusion_interval=1.
DEFAULTS = {"omega": 0.8, "fusion_interval": 1}
OFF_GRID_DEFAULTS = {"omega": 0.8, "fusion_interval": 2}  # like hwm_grad=auto: a default the grid lacks
VALUES = {"omega": [0.5, 0.8, 1.0], "fusion_interval": [0, 1, 5]}
EFFECT = {("omega", 0.5): -4.0, ("omega", 0.8): 0.0, ("omega", 1.0): 1.5,
          ("fusion_interval", 0): -2.5, ("fusion_interval", 1): 0.0, ("fusion_interval", 5): 0.75}
SEEDS = [0, 1, 2]
NETWORKS = ("student1", "student2", "hwm", "ensemble")
_RUN_NUMBERS = itertools.count(1)


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _experiment(c, name: str, root: Path) -> str:
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name, artifact_location=(root / name).as_uri())


def _log(c, run_id: str, params: dict | None = None, tags: dict | None = None,
         metrics: dict[str, list[float]] | None = None) -> None:
    """Params and tags as text, each metric as a per-epoch history (step = epoch, 1-based)."""
    from mlflow.entities import Metric, Param, RunTag
    now = int(time.time() * 1000)
    c.log_batch(run_id, params=[Param(k, str(v)) for k, v in (params or {}).items()],
                tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
                metrics=[Metric(k, float(v), now, step) for k, vs in (metrics or {}).items()
                         for step, v in enumerate(vs, start=1)])


def _parent(c, exp_id: str, name: str, kind: str, params: dict, tags: dict | None = None,
            age_s: int = 0) -> str:
    # Explicit start times make "the newest sweep" unambiguous however fast the runs are made.
    run = c.create_run(exp_id, run_name=name, start_time=int((time.time() - age_s) * 1000),
                       tags={"kind": kind, "method": "okdph", **(tags or {})})
    _log(c, run.info.run_id, params={"metric": METRIC, "mode": "max", "epochs": EPOCHS, **params})
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _child(c, exp_id: str, parent: str, knobs: dict, final: float, outcome: str = "completed",
           epochs: int = EPOCHS, extra: dict[str, float] | None = None) -> str:
    run = c.create_run(exp_id, run_name=f"okdph-{next(_RUN_NUMBERS)}",
                       tags={"mlflow.parentRunId": parent, "method": "okdph", "seed": knobs.get("seed", 0),
                             "trial_outcome": outcome, "epochs_run": epochs})
    ramp = [final - 10.0 * (epochs - e) for e in range(1, epochs + 1)]
    nets = {f"val/acc/{n}": [v + i - 1.5 for v in ramp] for i, n in enumerate(NETWORKS)}
    metrics = {METRIC: ramp, **nets, "train/loss/loss": [1.0 / e for e in range(1, epochs + 1)],
               "lr": [0.1 / e for e in range(1, epochs + 1)]}
    if epochs == EPOCHS:
        metrics["test/acc/students_mean"] = [final - 1.0]
    metrics.update({k: [v] for k, v in (extra or {}).items()})  # logged once, after the last epoch
    _log(c, run.info.run_id, params={"temperature": 4.0, "same_init": True, "lr": 0.1, **knobs},
         metrics=metrics)
    c.set_terminated(run.info.run_id, "FAILED" if outcome == "failed" else "FINISHED")
    return run.info.run_id


def make_ablation(uri: str, root: Path, name: str, design: str = "grid", defaults: dict | None = None,
                  log_defaults: bool = True) -> tuple[str, pd.DataFrame]:
    """An ablation of omega and fusion_interval over 3 seeds, plus one run stopped by ASHA and
    one failed run that the tables must leave out. ``design="grid"`` runs every combination of
    the two knobs' values, as ``--ablate`` does; ``"one_at_a_time"`` varies one knob with the
    other at its default (so the default configuration runs once per knob and seed).
    Returns the parent run id and what was logged for the completed runs."""
    c = _client(uri)
    exp_id = _experiment(c, "okdph", root)
    defaults = defaults or DEFAULTS
    params = {"ablate": "omega,fusion_interval", "seeds": len(SEEDS)}
    if log_defaults:
        params.update({f"default.{k}": v for k, v in defaults.items()})
    parent = _parent(c, exp_id, name, "ablation", params, age_s=120)
    if design == "grid":
        cells = [{"omega": o, "fusion_interval": f} for o in VALUES["omega"] for f in VALUES["fusion_interval"]]
    else:
        cells = [{**DEFAULTS, knob: v} for knob, values in VALUES.items() for v in values]
    rows = []
    for cell in cells:
        for seed in SEEDS:
            final = (90.0 + sum(EFFECT[(k, v)] for k, v in cell.items()) + 0.5 * seed
                     + (0.3 * len(rows)) % 0.7)  # a little noise that differs between repeats
            ece = 0.05 + 0.01 * (cell["omega"] == 0.5) + 0.002 * seed
            _child(c, exp_id, parent, {**cell, "seed": seed}, final, extra={EXTRA: ece})
            rows.append({**cell, "seed": seed, METRIC: final, EXTRA: ece})
    _child(c, exp_id, parent, {**DEFAULTS, "omega": 1.0, "seed": 0}, 10.0, "asha_stopped", epochs=1)
    _child(c, exp_id, parent, {**DEFAULTS, "omega": 0.5, "seed": 1}, 5.0, "failed", epochs=1)
    return parent, pd.DataFrame(rows)


def make_tpe(uri: str, root: Path, trials: int = 10) -> tuple[str, Path]:
    """A TPE sweep whose metric depends strongly on omega and hardly on fusion_unit, with its
    Optuna study stored as the sweep stores it."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    c = _client(uri)
    exp_id = _experiment(c, "okdph", root)
    name = "okdph-tpe"
    sweep_dir = root / "results" / name
    sweep_dir.mkdir(parents=True)
    space = {"omega": {"type": "uniform", "low": 0.3, "high": 1.0},
             "fusion_unit": {"type": "choice", "values": ["batch", "epoch"]}}
    parent = _parent(c, exp_id, name, "sweep", {f"swept.{k}": json.dumps(v) for k, v in space.items()},
                     tags={"sweep_dir": str(sweep_dir)}, age_s=60)
    dists = {"omega": FloatDistribution(0.3, 1.0), "fusion_unit": CategoricalDistribution(["batch", "epoch"])}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}", direction="maximize")
    rng = np.random.default_rng(0)
    for i in range(trials):
        knobs = {"omega": float(rng.uniform(0.3, 1.0)), "fusion_unit": ["batch", "epoch"][i % 2]}
        value = 60.0 + 40.0 * knobs["omega"] + (0.05 if knobs["fusion_unit"] == "epoch" else 0.0)
        study.add_trial(optuna.trial.create_trial(params=knobs, distributions=dists, value=value))
        _child(c, exp_id, parent, {**knobs, "fusion_interval": 1, "seed": 0}, value)
    return parent, sweep_dir


def expected_table(logged: pd.DataFrame, knob: str, defaults: dict) -> pd.DataFrame:
    """The ablation table computed straight from what was logged: the other knob at its
    default when that was run (else every value of it), repeats of one seed averaged, then
    mean/std/count over seeds."""
    other = next(k for k in defaults if k != knob)
    at_default = np.isclose(logged[other], defaults[other])
    sub = logged[at_default] if at_default.any() else logged
    per_seed = sub.groupby([knob, "seed"])[METRIC].mean()
    out = per_seed.groupby(level=knob).agg(["mean", "std", "count"])
    out["runs"] = sub.groupby(knob)[METRIC].count()
    has_default = np.isclose(out.index, defaults[knob])
    out["diff"] = out["mean"] - (out.loc[has_default, "mean"].iloc[0] if has_default.any() else np.nan)
    return out


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """An empty MLflow store, made once: creating the schema takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("template") / "mlruns.db"
    _client(sqlite_uri(path)).search_experiments()
    return path


def new_store(template: Path, folder: Path) -> str:
    shutil.copy(template, folder / "mlruns.db")
    return sqlite_uri(folder / "mlruns.db")


@pytest.fixture
def store(template, tmp_path) -> str:
    return new_store(template, tmp_path)


@pytest.fixture(scope="module")
def sweeps(template, tmp_path_factory) -> SimpleNamespace:
    """One store with three ablations (a grid as ``--ablate`` runs it; a one-knob-at-a-time
    design without ``default.*`` params; a grid whose fusion_interval default was not run)
    and a TPE sweep, the newest."""
    root = tmp_path_factory.mktemp("sweeps")
    uri = new_store(template, root)
    grid, logged = make_ablation(uri, root, "okdph-ablation")
    no_defaults, logged_no_defaults = make_ablation(uri, root, "okdph-nodefaults", "one_at_a_time",
                                                    log_defaults=False)
    off_grid, logged_off_grid = make_ablation(uri, root, "okdph-offgrid", defaults=OFF_GRID_DEFAULTS)
    tpe, _ = make_tpe(uri, root)
    return SimpleNamespace(uri=uri, root=root, ablation=grid, logged=logged, no_defaults=no_defaults,
                           logged_no_defaults=logged_no_defaults, off_grid=off_grid,
                           logged_off_grid=logged_off_grid, tpe=tpe)


@pytest.fixture(scope="module")
def ablation_report(sweeps, monkeypatch_module) -> tuple[Path, str]:
    out = sweeps.root / "ablation-report"
    # The command alias's own file, run in this process (a fresh interpreter would spend its
    # time importing torch and mlflow again).
    monkeypatch_module.setattr(sys, "argv", ["ablation.py", "--sweep", sweeps.ablation, "--tracking-uri",
                                             sweeps.uri, "--out", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exited:
        runpy.run_path(str(REPO / "analysis" / "ablation.py"), run_name="__main__")
    assert exited.value.code == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def tpe_report(sweeps) -> tuple[Path, str]:
    out = sweeps.root / "tpe-report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # The method name alone picks the newest sweep of its experiment: the TPE one.
        assert _main("okdph", "--tracking-uri", sweeps.uri, "--out", str(out)) == 0
    return out, printed.getvalue()


def _main(*args: str) -> int:
    from kd_platform.analysis.cli import main
    return main(list(args))


def _assert_pngs_linked(folder: Path, report: str) -> list[Path]:
    import matplotlib.image
    pngs = sorted(folder.glob("*.png"))
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
        h, w = matplotlib.image.imread(png).shape[:2]
        assert h > 100 and w > 100
        assert f"]({png.name})" in report, png.name
    for target in [part.split(")")[0] for part in report.split("](")[1:]]:
        assert (folder / target).is_file(), f"report links a missing file: {target}"
    return pngs


def _artifacts(uri: str, run_id: str) -> set[str]:
    return {Path(a.path).name for a in _client(uri).list_artifacts(run_id, "report")}


def _csv_tables(out: Path, knobs) -> dict[str, pd.DataFrame]:
    return {knob: pd.read_csv(out / f"ablation_{knob}.csv").set_index(knob) for knob in knobs}


def _library_tables(uri: str, parent: str) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """The ablation tables straight from the library (no report, no plots): tables, the notes
    on defaults, and each knob's ``AblationTable``."""
    from kd_platform.analysis import find_parent, load_sweep, open_client
    from kd_platform.analysis.tables import (
        ablation_defaults,
        ablation_table,
        usable_runs,
    )
    _, c = open_client(uri)
    sweep = load_sweep(c, find_parent(c, None, None, parent))
    runs = usable_runs(sweep).runs
    defaults, notes = ablation_defaults(sweep, runs)
    full = {k: ablation_table(runs, k, defaults, METRIC) for k in sweep.ablate}
    return {k: ab.table.set_index(k) for k, ab in full.items()}, notes, full


def _check_tables(tables: dict[str, pd.DataFrame], logged: pd.DataFrame, defaults: dict) -> None:
    assert set(tables) == set(defaults)
    for knob, got in tables.items():
        want = expected_table(logged, knob, defaults)
        assert list(got.index) == pytest.approx(list(want.index))
        np.testing.assert_allclose(got["mean"], want["mean"])
        np.testing.assert_allclose(got["std"], want["std"])
        np.testing.assert_array_equal(got["n_seeds"], want["count"])
        np.testing.assert_array_equal(got["n_runs"], want["runs"])
        np.testing.assert_allclose(got["diff_vs_default"], want["diff"], atol=1e-9)
        assert got["default"].tolist() == [bool(np.isclose(v, defaults[knob])) for v in got.index]
        assert set(STAT_COLUMNS) <= set(got.columns)
        assert ((got["ci95_low"] <= got["mean"]) & (got["mean"] <= got["ci95_high"])).all()


def test_ablation_tables_match_pandas(ablation_report, sweeps):
    out, printed = ablation_report
    tables = _csv_tables(out, DEFAULTS)
    _check_tables(tables, sweeps.logged, DEFAULTS)
    for knob, table in tables.items():
        assert f"== Ablation of {knob} (default {DEFAULTS[knob]})" in printed
        assert table["n_runs"].tolist() == [3, 3, 3] and table["n_seeds"].tolist() == [3, 3, 3]
        assert table.loc[DEFAULTS[knob], "diff_vs_default"] == 0
    report = (out / "report.md").read_text()
    assert "2 run(s) were excluded from the tables (1 asha_stopped, 1 failed)" in report
    assert "| 0.8 | yes | 3 | 3 |" in report
    assert "Differences in `val/acc/students_mean` to the default that survive the Holm correction at " \
           "α = 0.05 (2 tests): `omega=0.5`: -" in report
    assert "Other ablated knobs held at their defaults: `fusion_interval=1`." in report


def test_ablation_statistics_match_scipy(ablation_report, sweeps):
    """Welch p-values against the default, Holm over each table's two other values, and the
    bootstrap intervals, from the per-seed values that were logged."""
    from scipy import stats as sps

    from kd_platform.stats import bootstrap_diff_ci, bootstrap_mean_ci, holm
    out, _ = ablation_report
    for metric, suffix in ((METRIC, ""), (EXTRA, "__flat_hessian_trace_student1")):
        for knob, table in {k: pd.read_csv(out / f"ablation_{k}{suffix}.csv").set_index(k) for k in DEFAULTS}.items():
            other = next(k for k in DEFAULTS if k != knob)
            held = sweeps.logged[np.isclose(sweeps.logged[other], DEFAULTS[other])]
            values = {v: held.loc[np.isclose(held[knob], v), metric].to_numpy() for v in VALUES[knob]}
            base = values[DEFAULTS[knob]]
            others = [v for v in VALUES[knob] if v != DEFAULTS[knob]]
            p = [sps.ttest_ind(values[v], base, equal_var=False).pvalue for v in others]
            np.testing.assert_allclose(table.loc[others, "p_vs_default"], p, rtol=1e-9)
            np.testing.assert_allclose(table.loc[others, "p_holm"], holm(p), rtol=1e-9)
            for v in VALUES[knob]:
                # The CSV holds the full floats, so the intervals are the library's exactly.
                assert (table.loc[v, "ci95_low"], table.loc[v, "ci95_high"]) == pytest.approx(
                    bootstrap_mean_ci(values[v]), rel=1e-12)
                if v != DEFAULTS[knob]:
                    assert (table.loc[v, "diff_ci95_low"], table.loc[v, "diff_ci95_high"]) == pytest.approx(
                        bootstrap_diff_ci(values[v], base), rel=1e-12)
    omega = pd.read_csv(out / "ablation_omega.csv").set_index("omega")
    assert omega.loc[0.5, "p_holm"] < 0.05 and omega.loc[0.5, "diff_ci95_high"] < 0
    ece = pd.read_csv(out / "ablation_omega__flat_hessian_trace_student1.csv").set_index("omega")
    assert ece.loc[0.5, "diff_vs_default"] == pytest.approx(0.01)
    report = (out / "report.md").read_text()
    assert f"## Ablation tables of `{EXTRA}`" in report
    assert "**Too few seeds" not in report and "| too few seeds" not in report  # three seeds everywhere


def test_ablation_grid_cells_match_pandas(ablation_report, sweeps):
    out, _ = ablation_report
    got = pd.read_csv(out / "ablation_grid.csv")
    want = sweeps.logged.groupby(["omega", "fusion_interval"])[METRIC].agg(["mean", "std", "count"])
    assert len(got) == 9 and got["mean"].is_monotonic_decreasing  # best first
    for _, row in got.iterrows():
        cell = want.loc[(row["omega"], row["fusion_interval"])]
        assert row["mean"] == pytest.approx(cell["mean"]) and row["std"] == pytest.approx(cell["std"])
        assert row["n_seeds"] == row["n_runs"] == cell["count"] == 3
        assert row["ci95_low"] <= row["mean"] <= row["ci95_high"]
    base = got[got["default"]]
    assert base[["omega", "fusion_interval"]].values.tolist() == [[0.8, 1]]
    assert got["p_holm"].notna().sum() == 8 and base["diff_vs_default"].tolist() == [0]


def test_missing_defaults_are_inferred_from_the_runs(sweeps):
    tables, notes, _ = _library_tables(sweeps.uri, sweeps.no_defaults)
    _check_tables(tables, sweeps.logged_no_defaults, DEFAULTS)
    for knob, table in tables.items():
        # The default configuration ran once per ablated knob: six runs over three seeds.
        assert table.loc[DEFAULTS[knob], "n_runs"] == 6 and table.loc[DEFAULTS[knob], "n_seeds"] == 3
    assert any("has no `default.omega` param; the default of `omega` was taken as `0.8`" in n for n in notes)


def test_a_default_the_grid_lacks_is_averaged_over(sweeps):
    tables, _, full = _library_tables(sweeps.uri, sweeps.off_grid)
    _check_tables(tables, sweeps.logged_off_grid, OFF_GRID_DEFAULTS)
    assert tables["omega"]["n_runs"].tolist() == [9, 9, 9]  # every fusion_interval, three seeds each
    assert full["omega"].free == ["fusion_interval"] and full["fusion_interval"].held == {"omega": 0.8}
    assert tables["fusion_interval"]["diff_vs_default"].isna().all()


def test_ablation_plots_report_and_artifacts(ablation_report, sweeps):
    out, _ = ablation_report
    pngs = {p.name for p in _assert_pngs_linked(out, (out / "report.md").read_text())}
    assert {"ablation_omega.png", "ablation_fusion_interval.png", "effects.png", "learning_curves.png",
            "networks_best_run.png", "ablation_omega__flat_hessian_trace_student1.png"} <= pngs
    assert _artifacts(sweeps.uri, sweeps.ablation) == {p.name for p in out.iterdir()}


def test_runs_load_typed(sweeps):
    from kd_platform.analysis import find_parent, load_sweep, open_client
    _, c = open_client(sweeps.uri)
    sweep = load_sweep(c, find_parent(c, None, None, sweeps.ablation))
    df = sweep.runs
    assert len(df) == 29 and sweep.is_ablation and sweep.ablate == ["omega", "fusion_interval"]
    assert df["omega"].dtype == "float64" and df["fusion_interval"].dtype == "int64"
    assert df["same_init"].dtype == "bool" and df["seed"].dtype == "int64"
    # A metric named like a knob (the final learning rate) does not replace the knob.
    assert (df["lr"] == 0.1).all() and "metric.lr" in df.columns
    assert df["trial_outcome"].value_counts().to_dict() == {"completed": 27, "asha_stopped": 1, "failed": 1}


def test_tpe_best_trials_and_marginals(tpe_report, sweeps):
    out, printed = tpe_report
    assert "== Best 5 trials" in printed and "== Knob importance (fANOVA)" in printed
    c = _client(sweeps.uri)
    children = c.search_runs([c.get_experiment_by_name("okdph").experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{sweeps.tpe}'")
    runs = pd.DataFrame([{"run_id": r.info.run_id, METRIC: r.data.metrics[METRIC]} for r in children])
    best = pd.read_csv(out / "best_trials.csv")
    assert best["run_id"].tolist() == runs.nlargest(5, METRIC)["run_id"].tolist()
    np.testing.assert_allclose(best[METRIC], runs.nlargest(5, METRIC)[METRIC])
    unit = pd.read_csv(out / "marginal_fusion_unit.csv")
    assert unit["n_runs"].tolist() == [5, 5] and unit["fusion_unit"].tolist() == ["batch", "epoch"]
    omega = pd.read_csv(out / "marginal_omega.csv")
    assert omega["n_runs"].sum() == 10 and len(omega) == 4
    assert omega["mean"].is_monotonic_increasing  # the metric grows with omega


def test_tpe_importance_plots_and_artifacts(tpe_report, sweeps):
    out, _ = tpe_report
    importance = pd.read_csv(out / "importance.csv").set_index("knob")["importance"]
    assert set(importance.index) == {"omega", "fusion_unit"}
    assert importance.sum() == pytest.approx(1.0) and importance["omega"] > importance["fusion_unit"]
    report = (out / "report.md").read_text()
    assert "fANOVA (Optuna) over the 10 COMPLETE trials" in report
    pngs = {p.name for p in _assert_pngs_linked(out, report)}
    assert {"importance.png", "metric_vs_omega.png", "metric_vs_fusion_unit.png", "learning_curves.png",
            "networks_best_run.png"} <= pngs
    assert _artifacts(sweeps.uri, sweeps.tpe) == {p.name for p in out.iterdir()}


def test_importance_needs_enough_trials(tmp_path):
    import optuna

    from kd_platform.analysis.importance import MIN_TRIALS, fanova_importance
    assert "no `optuna.db`" in fanova_importance("s", tmp_path / "nowhere").note
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=MIN_TRIALS - 1)
    imp = fanova_importance("s", tmp_path)
    assert imp.values is None and f"at least {MIN_TRIALS} COMPLETE trials" in imp.note


@pytest.mark.parametrize("case", ["unknown method", "unknown experiment", "unknown run id", "no store",
                                  "not a sweep", "no sweep in experiment", "no target", "method mismatch",
                                  "unknown metric", "unreachable server", "out is a file"])
def test_bad_input(case, store, tmp_path, capsys):
    c = _client(store)
    exp_id = _experiment(c, "okdph", tmp_path)
    plain = c.create_run(exp_id).info.run_id
    other = _experiment(c, "elsewhere", tmp_path)  # a real sweep, but not in experiment okdph
    sweep = _parent(c, other, "okdph-elsewhere", "sweep", {})
    _child(c, other, sweep, {"omega": 0.5, "seed": 0}, 80.0)
    args = {"unknown method": ["nosuch"], "unknown experiment": ["okdph", "--experiment", "nosuch"],
            "unknown run id": ["--sweep", "0" * 32], "not a sweep": ["--sweep", plain],
            "no sweep in experiment": ["okdph"], "no target": [],
            "no store": ["okdph", "--tracking-uri", sqlite_uri(tmp_path / "none.db")],
            "method mismatch": ["kd", "--sweep", sweep],
            "unknown metric": ["--sweep", sweep, "--metric", "val/acc/nosuch"],
            "unreachable server": ["okdph", "--tracking-uri", "http://127.0.0.1:9"],
            "out is a file": ["okdph"]}[case]
    if "--tracking-uri" not in args:
        args += ["--tracking-uri", store]
    out = tmp_path / "report"
    if case == "out is a file":
        out = tmp_path / "afile"
        out.write_text("x")
    started = time.monotonic()
    assert _main(*args, "--out", str(out)) == 2
    assert time.monotonic() - started < 30  # an unreachable server fails in seconds, not after retries
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert (out.read_text() == "x" if case == "out is a file" else not out.exists())
    assert not (tmp_path / "none.db").exists()
    assert not _client(store).list_artifacts(sweep)


def test_command_alias_refuses_bad_input(tmp_path, template):
    uri = new_store(template, tmp_path)
    res = run_cli("analysis.ablation", "--sweep", "0" * 32, "--tracking-uri", uri,
                  "--out", str(tmp_path / "report"), timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == f"error: no MLflow run with id '{'0' * 32}' in this store"
    assert not (tmp_path / "report").exists()
