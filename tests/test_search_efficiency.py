"""bench/search_efficiency.py: its accounting by hand, its curves cache, and its strategies
through real Ray Tune, Optuna and ASHA on a tiny table."""
from __future__ import annotations

import collections
import importlib.util
import json
import math
import sys

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("search_efficiency", REPO / "bench" / "search_efficiency.py")
se = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = se  # dataclasses and Ray's pickling look modules up by name
spec.loader.exec_module(se)

# gamma's three listed values, 2 epochs each. 0.0 ends 0.4 points below the best (within 0.5),
# 1.0 peaks above the best and then falls (a sweep reports a trial's last value).
CURVES = {0.0: [50.0, 89.6], 0.5: [70.0, 90.0], 1.0: [95.0, 30.0]}


@pytest.fixture
def tiny():
    bench = se.make_bench(["gamma"], epochs=2)
    return bench, {se.config_key({"gamma": g}): c for g, c in CURVES.items()}


def test_accounting_by_hand(tiny):
    bench, curves = tiny
    assert [c["gamma"] for c in bench.grid] == [0.0, 0.5, 1.0]
    reports = se.grid_reports(bench.grid, curves)
    assert [v for _, v in reports] == [50.0, 89.6, 70.0, 90.0, 95.0, 30.0]
    # After each epoch of budget: the best trial's latest value; 1.0's 95 counts until it falls to 30.
    assert se.best_trace(reports) == [50.0, 89.6, 89.6, 90.0, 95.0, 90.0]
    assert se.epochs_to_reach(se.best_trace(reports), 90.0 - se.WITHIN) == 2   # 89.6 >= 89.5
    assert se.epochs_to_reach([50.0, 89.4, 90.0], 89.5) == 3                     # 89.4 is 0.6 short
    assert se.epochs_to_reach([50.0, 89.4], 89.5) is None
    row = se.summarise("grid", [reports[:3]], 3, 89.5)
    assert (row.best, row.reach, row.trials) == ([89.6], [2], [2])


def test_snap_to_the_listed_values():
    values = {"omega": [0.3, 0.5, 0.8, 1.0], "fusion_unit": ["batch", "epoch"]}
    assert se.snap({"omega": 0.64, "fusion_unit": "epoch"}, values) == {"omega": 0.5, "fusion_unit": "epoch"}
    assert se.snap({"omega": 0.66, "fusion_unit": "batch"}, values) == {"omega": 0.8, "fusion_unit": "batch"}


def test_curves_are_trained_once_through_the_engine(tmp_path, one_thread):
    bench = se.make_bench(["gamma"], epochs=1)
    cache = tmp_path / "curves.json"
    said = []
    curves = se.load_curves(bench, cache, workers=1, say=said.append)
    assert set(curves) == {se.config_key(c) for c in bench.grid}
    assert all(len(c) == 1 and 0 <= c[0] <= 100 for c in curves.values())
    assert said and "training 3 of 3" in said[0]
    again = []
    assert se.load_curves(bench, cache, workers=1, say=again.append) == curves and again == []
    assert json.loads(cache.read_text())["fingerprint"] == bench.fingerprint()


@pytest.mark.parametrize("strategy", ["TPE + ASHA", "TPE, no early stopping"])
def test_strategy_through_real_tune(strategy, tiny, ray_local, tmp_path):
    bench, curves = tiny
    se.quiet_tune()
    run = se.run_strategy(bench, curves, strategy, budget=4, search_seed=0, storage=str(tmp_path))
    # The driver's log and Tune's own results count the same epochs per trial.
    assert collections.Counter(t for t, _ in run.reports) == run.tune_epochs
    assert len(run.within(4)) == 4 <= len(run.reports)
    by_trial = collections.defaultdict(list)
    for trial, value in run.reports:
        by_trial[trial].append(value)
    for trial, values in by_trial.items():  # each trial reported a prefix of its configuration's curve
        assert values == CURVES[run.configs[trial]["gamma"]][:len(values)]
    if strategy == "TPE, no early stopping":
        assert all(len(v) == 2 for v in by_trial.values())
    row = se.summarise(strategy, [run.within(4)], 4, 90.0 - se.WITHIN)
    assert row.best == [se.best_trace(run.within(4))[-1]] and row.budget == 4


def test_rank_agreement_by_hand():
    assert se.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert se.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ranks [0.5, 0.5, 2] against [0, 1, 2]: covariance 1.5, variances 1.5 and 2
    assert se.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    curves = {"a": [1.0, 9.0], "b": [2.0, 8.0], "c": [3.0, 7.0]}
    assert se.early_rank_agreement(curves) == [pytest.approx(-1.0)]
