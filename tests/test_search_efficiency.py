"""bench/search_efficiency.py: its accounting by hand, its curves cache, its strategies through
real Ray Tune, Optuna and ASHA on a tiny table, and its ceiling and confirmed judging against
hand computations."""
from __future__ import annotations

import collections
import importlib.util
import itertools
import json
import math
import sys
import warnings

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
    # A second training seed adds its own curves beside the first's, only for the configurations asked.
    second = se.dataclasses.replace(bench, seed=1)
    assert second.fingerprint() != bench.fingerprint()
    said = []
    other = se.load_curves(second, cache, workers=1, say=said.append, configs=bench.grid[:1])
    assert list(other) == [se.config_key(bench.grid[0])] and "training 1 of 1" in said[0] and "seed 1" in said[0]
    stored = json.loads(cache.read_text())["benches"]
    assert {k: v["seed"] for k, v in stored.items()} == {bench.fingerprint(): 0, second.fingerprint(): 1}
    again = []
    assert se.load_curves(bench, cache, workers=1, say=again.append) == curves and again == []


def test_cache_of_the_single_seed_layout_is_kept(tmp_path):
    bench = se.make_bench(["gamma"], epochs=2)
    curves = {se.config_key(c): [50.0, 60.0 + i] for i, c in enumerate(bench.grid)}
    cache = tmp_path / "curves.json"
    cache.write_text(json.dumps({"fingerprint": bench.fingerprint(), "curves": curves}))
    said = []
    assert se.load_curves(bench, cache, workers=1, say=said.append) == curves and said == []


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
    keys = {t: se.config_key(se.snap(c, bench.values)) for t, c in run.configs.items()}
    row = se.summarise(strategy, [run.within(4)], 4, 90.0 - se.WITHIN, [keys])
    assert row.best == [se.best_trace(run.within(4))[-1]] and row.budget == 4
    latest = dict(run.within(4))  # a dict keeps each trial's last report
    assert row.picks == [keys[max(latest, key=latest.get)]]
    assert curves[row.picks[0]][len(by_trial[max(latest, key=latest.get)]) - 1] == row.best[0]


def test_rank_agreement_by_hand():
    assert se.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert se.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ranks [0.5, 0.5, 2] against [0, 1, 2]: covariance 1.5, variances 1.5 and 2
    assert se.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    curves = {"a": [1.0, 9.0], "b": [2.0, 8.0], "c": [3.0, 7.0]}
    assert se.early_rank_agreement(curves) == [pytest.approx(-1.0)]


def test_strategies_parsed_though_a_name_holds_a_comma():
    assert se.parse_strategies(",".join(se.STRATEGIES)) == list(se.STRATEGIES)
    assert se.parse_strategies("TPE, no early stopping,random + ASHA") == ["TPE, no early stopping", "random + ASHA"]
    with pytest.raises(ValueError, match="TPE"):
        se.parse_strategies("TPE,grid")


def footrule_rho(xs, ys):
    """Spearman's coefficient for data without ties, by the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1))."""
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(len(v)), key=v.__getitem__))}  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    n = len(xs)
    return 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def test_ceiling_by_hand():
    # Five configurations; the second seed swaps the middle two: sum d^2 = 2, rho = 1 - 12/120 = 0.9.
    first, second = [90.0, 91.0, 92.0, 93.0, 94.0], [80.0, 82.0, 81.0, 83.0, 84.0]
    c = se.ceiling(first, second)
    assert c.n == 5 and c.rho == pytest.approx(0.9) == pytest.approx(se.spearman(first, second))
    half = 1.959964 * math.sqrt(1.06 / 2)
    assert (c.low, c.high) == (pytest.approx(math.tanh(math.atanh(0.9) - half)),
                               pytest.approx(math.tanh(math.atanh(0.9) + half)))
    assert c.low < se.CEILING < c.high and c.verdict == "unsure"
    assert c.mean_change == pytest.approx((10 + 9 + 11 + 10 + 10) / 5)
    assert "unsure" in se.conclusion(c)


@pytest.mark.parametrize("scrambled,verdict", [(False, "high"), (True, "low")])
def test_ceiling_verdicts(scrambled, verdict):
    # 24 configurations; the second seed keeps the ranking or permutes it (i -> 7i + 15 mod 24, rho -0.22).
    first = [float(i) for i in range(24)]
    second = [float((i * 7 + 15) % 24 if scrambled else i) for i in range(24)]
    c = se.ceiling(first, second)
    assert c.rho == pytest.approx(footrule_rho(first, second))
    assert c.verdict == verdict
    if verdict == "low":
        assert c.high < se.CEILING and "cannot rank strategies" in se.conclusion(c)
    else:
        assert c.low > 0.99 and se.conclusion(c) is None


def test_ceiling_of_constant_accuracies_ranks_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that a constant input has no correlation
        c = se.ceiling([90.0, 91.0, 92.0, 93.0], [80.0] * 4)
    assert math.isnan(c.rho) and c.verdict == "low"


def test_ceiling_sample_is_fixed_and_in_grid_order():
    grid = [{"a": a, "b": b} for a, b in itertools.product(range(10), range(24))]
    sample = se.ceiling_sample(grid, 24)
    assert len(sample) == 24 == len({se.config_key(c) for c in sample})
    assert sample == se.ceiling_sample(grid, 24)
    assert [grid.index(c) for c in sample] == sorted(grid.index(c) for c in sample)
    assert se.ceiling_sample(grid[:5], 24) == grid[:5]


def test_confirmed_judging_by_hand():
    # Seed 0 calls "b" best, but over both seeds "c" is; "d" has no second seed, so it is no reference.
    finals = {0: {"a": 90.0, "b": 99.0, "c": 97.0, "d": 99.5}, 1: {"a": 92.0, "b": 93.0, "c": 98.0}}
    assert se.confirmed("b", finals) == pytest.approx(96.0)
    assert se.reference(finals) == ("c", pytest.approx(97.5))
    # Two searches by trial id: t2 ends best in the first; the second's tie goes to the first to report.
    runs = [[("t1", 80.0), ("t2", 90.0), ("t1", 95.0), ("t2", 99.0)], [("u1", 97.0), ("u2", 97.0)]]
    configs = [{"t1": "a", "t2": "b"}, {"u1": "c", "u2": "a"}]
    row = se.summarise("s", runs, 4, 0.0, configs)
    assert row.picks == ["b", "c"]
    row.confirmed = [se.confirmed(k, finals) for k in row.picks]
    assert row.confirmed == [pytest.approx(96.0), pytest.approx(97.5)]
    row.held_out = [finals[1][k] for k in row.picks]
    assert row.cells()[4:6] == ["96.75 [96.00-97.50]", "95.50 [93.00-98.00]"]
    # The grid's trials are named by their configurations.
    assert se.summarise("grid", [[("a", 90.0), ("b", 99.0)]], 2, 0.0).picks == ["b"]
