"""The statistics of the ablation tables: bootstrap intervals and Welch p-values checked
against scipy, the Holm correction against hand-computed values, and ablation tables and
reports built from constructed runs (no MLflow store, no Ray)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from kd_platform import stats
from kd_platform.analysis.load import Sweep
from kd_platform.analysis.tables import ablation_table, extra_metric_columns, grid_table

METRIC = "val/acc/students_mean"
EXTRA = "flat/hessian_trace/student1"  # an extra metric the runs log, as flatness=final would
SAMPLES = {
    "three": [90.1, 90.9, 91.0],
    "five": [1.0, 2.5, 2.0, 4.0, 3.1],
    "skewed": [0.1, 0.2, 0.2, 0.3, 0.4, 0.5, 0.9, 1.5, 3.0, 7.0, 0.05, 0.6],
}


def _scipy_interval(data: tuple, statistic) -> tuple[float, float]:
    res = sps.bootstrap(data, statistic, n_resamples=10_000, method="percentile", confidence_level=0.95,
                        vectorized=True, rng=np.random.default_rng(12345))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_bootstrap_mean_interval_matches_scipy(name):
    x = np.array(SAMPLES[name])
    got = stats.bootstrap_mean_ci(x)
    want = _scipy_interval((x,), lambda a, axis: a.mean(axis=axis))
    tolerance = 0.02 * (x.max() - x.min())  # two independent resamplings of the same size
    assert got == pytest.approx(want, abs=tolerance)
    assert got[0] <= x.mean() <= got[1]


def test_bootstrap_difference_interval_matches_scipy():
    x, y = np.array(SAMPLES["five"]), np.array(SAMPLES["three"]) - 88.0
    got = stats.bootstrap_diff_ci(x, y)
    # paired=False: scipy resamples each sample on its own, as the table does.
    want = _scipy_interval((x, y), lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis))
    span = np.ptp(np.concatenate([x, y]))
    assert got == pytest.approx(want, abs=0.02 * span)
    assert got[0] <= x.mean() - y.mean() <= got[1]


def test_bootstrap_is_deterministic_for_a_seed():
    x, y = SAMPLES["skewed"], SAMPLES["five"]
    assert stats.bootstrap_mean_ci(x, seed=7) == stats.bootstrap_mean_ci(list(x), seed=7)
    assert stats.bootstrap_diff_ci(x, y, seed=7) == stats.bootstrap_diff_ci(x, y, seed=7)
    assert stats.bootstrap_mean_ci(x, seed=7) != stats.bootstrap_mean_ci(x, seed=8)
    assert stats.bootstrap_mean_ci(x) == stats.bootstrap_mean_ci(x, seed=stats.SEED)


def test_too_few_values_give_nan():
    for n in (0, 1, 2):
        x = [1.0, 2.0][:n]
        assert np.isnan(stats.bootstrap_mean_ci(x)).all()
        assert np.isnan(stats.bootstrap_diff_ci(x, [1.0, 2.0, 3.0])).all()
        assert np.isnan(stats.bootstrap_diff_ci([1.0, 2.0, 3.0], x)).all()
        assert np.isnan(stats.welch_p(x, [1.0, 2.0, 3.0]))
    # NaN values do not count as seeds.
    assert np.isnan(stats.bootstrap_mean_ci([1.0, np.nan, 2.0])).all()
    assert not np.isnan(stats.bootstrap_mean_ci([1.0, 2.0], min_n=2)).any()


@pytest.mark.parametrize("x, y", [(SAMPLES["three"], [88.0, 88.7, 87.9]), (SAMPLES["five"], SAMPLES["three"]),
                                  (SAMPLES["skewed"], SAMPLES["five"]), ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
                                  ([5.0, 5.0, 5.0], [1.0, 2.0, 4.0])])
@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy, on the constant sample
def test_welch_matches_scipy(x, y):
    want = sps.ttest_ind(x, y, equal_var=False).pvalue
    assert stats.welch_p(x, y) == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert stats.welch_p(y, x) == pytest.approx(want, rel=1e-12, abs=1e-300)


def test_welch_without_any_spread_is_nan():
    assert np.isnan(stats.welch_p([2.0, 2.0, 2.0], [3.0, 3.0, 3.0]))


def test_holm_hand_computed():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> 0.06 (step-down maximum).
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    # 0.02*3 = 0.06, 0.3*2 = 0.6, 0.6*1 = 0.6.
    np.testing.assert_allclose(stats.holm([0.3, 0.6, 0.02]), [0.6, 0.6, 0.06])
    # Capped at 1: 0.6*2 = 1.2 -> 1, and 0.7 -> max(1, 0.7) = 1.
    np.testing.assert_allclose(stats.holm([0.7, 0.6]), [1.0, 1.0])
    # Monotone: 0.4*2 = 0.8 > 0.5*1, so the larger raw p-value gets 0.8 too.
    np.testing.assert_allclose(stats.holm([0.5, 0.4]), [0.8, 0.8])
    # NaN (no test) stays NaN and does not count: m = 2.
    got = stats.holm([np.nan, 0.01, 0.04])
    assert np.isnan(got[0]) and got[1:] == pytest.approx([0.02, 0.04])
    assert np.isnan(stats.holm([np.nan])).all() and stats.holm([]).size == 0
    assert stats.holm([0.03]) == pytest.approx([0.03])


def test_holm_properties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 1, rng.integers(1, 12)) ** 3
        adj = stats.holm(p)
        order = np.argsort(p)
        assert (np.diff(adj[order]) >= -1e-15).all()  # same order as the raw p-values
        assert (adj >= p - 1e-15).all() and (adj <= 1.0).all()
        assert adj.min() == pytest.approx(min(1.0, len(p) * p.min()))


def make_runs(seeds: dict[float, list[int]], effect: dict[float, float], noise: float = 0.4) -> pd.DataFrame:
    """One row per run of an ablation of ``omega`` (default 0.8), with ``fusion_interval`` held
    at its default 1 except for one decoy run that the table must leave out."""
    rows = []
    for omega, cell_seeds in seeds.items():
        for seed in cell_seeds:
            jitter = noise * (seed - 1) + 0.05 * (seed % 2)
            rows.append({"omega": omega, "fusion_interval": 1, "seed": seed,
                         METRIC: 90.0 + effect[omega] + jitter,
                         EXTRA: 0.05 + 0.001 * seed if omega != 1.0 else np.nan})
    rows.append({"omega": 0.8, "fusion_interval": 5, "seed": 0, METRIC: 10.0, EXTRA: 0.9})
    df = pd.DataFrame(rows)
    df.insert(0, "run_id", [f"run{i}" for i in range(len(df))])
    df["run_name"] = df["run_id"]
    df["trial_outcome"] = "completed"
    df["epochs_run"] = 3
    return df


DEFAULTS = {"omega": 0.8, "fusion_interval": 1}
EFFECT = {0.5: -5.0, 0.8: 0.0, 1.0: 0.1}


def test_ablation_table_statistics():
    runs = make_runs({v: [0, 1, 2] for v in EFFECT}, EFFECT)
    ab = ablation_table(runs, "omega", DEFAULTS, METRIC)
    t = ab.table.set_index("omega")
    for column in ["n_runs", "mean", "std", "n_seeds", "ci95_low", "ci95_high", "diff_vs_default",
                   "diff_ci95_low", "diff_ci95_high", "p_vs_default", "p_holm"]:
        assert column in t.columns
    held = runs[runs["fusion_interval"] == 1]
    values = {v: held.loc[held["omega"] == v, METRIC].to_numpy() for v in EFFECT}
    np.testing.assert_allclose(t["mean"], [values[v].mean() for v in t.index])
    np.testing.assert_allclose(t["std"], [values[v].std(ddof=1) for v in t.index])
    assert t["n_seeds"].tolist() == [3, 3, 3] and t["n_runs"].tolist() == [3, 3, 3]
    assert (t["ci95_low"] <= t["mean"]).all() and (t["mean"] <= t["ci95_high"]).all()
    assert (t["ci95_low"] < t["ci95_high"]).all()
    np.testing.assert_allclose(t["diff_vs_default"], t["mean"] - t.loc[0.8, "mean"])
    assert t.loc[0.8, "diff_vs_default"] == 0 and np.isnan(t.loc[0.8, ["p_vs_default", "p_holm",
                                                                         "diff_ci95_low"]].astype(float)).all()
    for v in (0.5, 1.0):
        assert t.loc[v, "diff_ci95_low"] <= t.loc[v, "diff_vs_default"] <= t.loc[v, "diff_ci95_high"]
        assert t.loc[v, "p_vs_default"] == pytest.approx(
            sps.ttest_ind(values[v], values[0.8], equal_var=False).pvalue, rel=1e-12)
    np.testing.assert_allclose(t.loc[[0.5, 1.0], "p_holm"], stats.holm(t.loc[[0.5, 1.0], "p_vs_default"]))
    assert t.loc[0.5, "p_holm"] < 0.01 and t.loc[0.5, "diff_ci95_high"] < 0  # clearly worse
    assert t.loc[1.0, "p_holm"] > 0.5 and t.loc[1.0, "diff_ci95_low"] < 0 < t.loc[1.0, "diff_ci95_high"]
    assert ab.significant().index.tolist() == [0] and not ab.too_few_seeds().any()
    # Deterministic: the same runs give the same table.
    pd.testing.assert_frame_equal(ab.table, ablation_table(runs, "omega", DEFAULTS, METRIC).table)


def test_ablation_table_of_an_extra_metric():
    runs = make_runs({v: [0, 1, 2] for v in EFFECT}, EFFECT)
    assert extra_metric_columns(runs, primary=METRIC) == ([EXTRA], [])
    assert extra_metric_columns(runs, [EXTRA, "flat/top_eig/student9"], METRIC) == (
        [EXTRA], ["flat/top_eig/student9"])
    t = ablation_table(runs, "omega", DEFAULTS, EXTRA).table.set_index("omega")
    assert t.index.tolist() == [0.5, 0.8]  # no run of omega=1.0 logged it
    assert t.loc[0.5, "mean"] == pytest.approx(0.051) and t.loc[0.5, "diff_vs_default"] == pytest.approx(0)
    assert t.loc[0.5, "ci95_low"] <= 0.051 <= t.loc[0.5, "ci95_high"]


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_seeds_give_nan(n):
    runs = make_runs({v: list(range(n)) for v in EFFECT}, EFFECT)
    ab = ablation_table(runs, "omega", DEFAULTS, METRIC)
    t = ab.table
    assert t["n_seeds"].tolist() == [n] * 3 and ab.too_few_seeds().all()
    for column in ["ci95_low", "ci95_high", "diff_ci95_low", "diff_ci95_high", "p_vs_default", "p_holm"]:
        assert t[column].isna().all(), column
    assert t["mean"].notna().all() and t["diff_vs_default"].notna().all()


def test_grid_table_compares_with_the_all_default_cell():
    runs = make_runs({v: [0, 1, 2] for v in EFFECT}, EFFECT)
    runs = runs[runs["fusion_interval"] == 1]
    extra = runs.assign(fusion_interval=5, **{METRIC: runs[METRIC] + 0.2})
    grid = grid_table(pd.concat([runs, extra], ignore_index=True), ["omega", "fusion_interval"], METRIC, "max",
                      DEFAULTS)
    assert len(grid) == 6 and grid["mean"].is_monotonic_decreasing
    base = grid[grid["default"]]
    assert len(base) == 1 and base[["omega", "fusion_interval"]].values.tolist() == [[0.8, 1]]
    assert grid["p_holm"].notna().sum() == 5
    tested = grid["p_vs_default"].notna()
    assert (grid.loc[tested, "p_holm"] >= grid.loc[tested, "p_vs_default"]).all()


def _fake_sweep(runs: pd.DataFrame, params: dict) -> Sweep:
    parent = SimpleNamespace(info=SimpleNamespace(run_id="p" * 32, experiment_id="1", run_name="okdph-ablation",
                                                  status="FINISHED"),
                             data=SimpleNamespace(params={"ablate": "omega,fusion_interval", **params}, tags={}))
    return Sweep(parent, "okdph", runs, ["omega", "fusion_interval"], METRIC, "max")


class _NoHistory:
    def get_metric_history(self, run_id, key):
        return []


def _report(tmp_path: Path, seeds: dict, extra_metrics=None) -> tuple[str, Path, Sweep]:
    from kd_platform.analysis.report import analyse
    sweep = _fake_sweep(make_runs(seeds, EFFECT), {"default.omega": "0.8", "default.fusion_interval": "1"})
    out = tmp_path / "report"
    rep = analyse(_NoHistory(), sweep, out, log_artifacts=False, extra_metrics=extra_metrics)
    return rep.path.read_text(), out, sweep


def test_report_names_the_differences_that_survive_holm(tmp_path):
    text, out, _ = _report(tmp_path, {v: [0, 1, 2] for v in EFFECT})
    omega = text.split("### `omega`")[1].split("### `fusion_interval`")[0]
    assert "**Too few seeds" not in omega and "| too few seeds" not in omega
    # The decoy run is the one seed of fusion_interval=5, in that knob's table and in the grid.
    assert "**Too few seeds for a conclusion** (fewer than 3) for `fusion_interval=5` (1 seed)" in text
    assert "for `omega=0.8`, `fusion_interval=5` (1 seed)" in text
    assert "Differences in `val/acc/students_mean` to the default that survive the Holm correction at " \
           "α = 0.05 (2 tests): `omega=0.5`: -5" in text
    assert "| lower than the default (p_holm ≤ 0.05) |" in text and "| no significant difference |" in text
    assert "mean [95% CI]" in text and "diff_vs_default [95% CI]" in text and "p_holm" in text
    # The extra metric found in the runs gets its own table, CSV and plot.
    assert f"## Ablation tables of `{EXTRA}`" in text
    csv = pd.read_csv(out / "ablation_omega__flat_hessian_trace_student1.csv")
    assert csv["omega"].tolist() == [0.5, 0.8] and "p_holm" in csv.columns
    assert (out / "ablation_omega__flat_hessian_trace_student1.png").is_file()
    table = pd.read_csv(out / "ablation_omega.csv")
    assert list(table.columns) == ["omega", "default", "n_runs", "mean", "std", "n_seeds", "ci95_low", "ci95_high",
                                   "diff_vs_default", "diff_ci95_low", "diff_ci95_high", "p_vs_default", "p_holm"]


def test_report_says_too_few_seeds(tmp_path):
    text, out, _ = _report(tmp_path, {0.5: [0, 1], 0.8: [0, 1], 1.0: [0, 1]})
    assert "**Too few seeds for a conclusion**: every cell of this table has fewer than 3 seeds" in text
    assert "| too few seeds for a conclusion |" in text
    assert "survive the Holm correction" not in text
    assert pd.read_csv(out / "ablation_omega.csv")["p_holm"].isna().all()


def test_report_says_which_cells_have_too_few_seeds(tmp_path):
    text, _, sweep = _report(tmp_path, {0.5: [0, 1, 2], 0.8: [0, 1, 2], 1.0: [0]}, extra_metrics=[
        "flat/top_eig/student9"])
    assert "**Too few seeds for a conclusion** (fewer than 3) for `omega=1` (1 seed)" in text
    assert "survive the Holm correction at α = 0.05 (1 test): `omega=0.5`" in text
    assert "## Ablation tables of" not in text  # the extra metric asked for is not in the runs
    assert any("`flat/top_eig/student9`" in n for n in sweep.notes)
