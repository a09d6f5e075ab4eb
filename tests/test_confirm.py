"""Findings, not noise: the confirmation stage's plan and statistics, degenerate and void
configurations, and the noise section of the report, each against an independent computation."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from kd_platform import stats
from kd_platform.errors import UsageError
from kd_platform.sweep.confirm import (
    Candidate,
    Confirmed,
    SearchTrial,
    confirm_seeds,
    judge,
    plan_confirmation,
)
from kd_platform.sweep.space import check_corners, load_space


def _holm(ps):
    """Holm's step-down by hand: sort, scale by m - i, running maximum, cap at 1."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(ps) - rank) * ps[i])
        out[i] = min(running, 1.0)
    return out


def test_t_interval_and_pooled_std_match_scipy_and_hand():
    x = [96.1, 97.9, 95.4, 98.2]
    low, high = stats.t_interval(x)
    ref = sps.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
    assert (low, high) == pytest.approx(ref)
    assert all(math.isnan(v) for v in stats.t_interval([97.0]))
    groups = [[1.0, 2.0, 4.0], [10.0, 10.5], [7.0]]
    ss = sum(np.var(g, ddof=1) * (len(g) - 1) for g in groups if len(g) > 1)
    assert stats.pooled_std(groups) == pytest.approx(math.sqrt(ss / (2 + 1)))


def _row(label, values):
    return Confirmed(Candidate(label, {"lr": label}), list(values))


def test_judge_names_a_winner_only_when_every_corrected_test_separates_it():
    rows = [_row("a", [90.0, 91.0, 90.5]), _row("b", [80.0, 81.0, 79.0]), _row("c", [70.0, 71.5, 69.0])]
    v = judge(rows, "max")
    raw = [sps.ttest_ind([90.0, 91.0, 90.5], other, equal_var=False).pvalue
           for other in ([80.0, 81.0, 79.0], [70.0, 71.5, 69.0])]
    assert v.p_holm == pytest.approx(_holm(raw))
    assert v.winner is not None and v.winner.candidate.label == "a"
    assert "Winner: a" in v.headline("val/acc")
    assert v.seed_std == pytest.approx(math.sqrt(np.mean([np.var(r.values, ddof=1) for r in rows])))


def test_judge_calls_overlapping_configurations_indistinguishable():
    rows = [_row("a", [95.0, 97.5, 96.0]), _row("b", [96.5, 94.9, 96.2]), _row("c", [60.0, 61.0, 59.5])]
    v = judge(rows, "max")
    assert v.winner is None
    assert [r.candidate.label for r in v.tied] == ["a", "b"]
    line = v.headline("val/acc")
    assert line.startswith("The top 2 configurations are indistinguishable at this budget: seed std")
    # "min" ranks the other way: the lowest mean comes first
    assert judge(rows, "min").rows[0].candidate.label == "c"


def test_one_seed_separates_nothing():
    v = judge([_row("a", [99.0]), _row("b", [10.0])], "max")
    assert v.winner is None and math.isnan(v.p_holm[0])


def test_the_plan_takes_distinct_full_budget_configurations_and_the_defaults():
    space = load_space("okdph")
    base = {k: d["values"][0] if d["type"] == "choice" else d["low"] for k, d in space.swept.items()}
    trials = [
        SearchTrial({**base, "omega": 0.9}, 99.0, 1, "stopped"),      # ASHA stopped it: ranks last
        SearchTrial({**base, "omega": 0.5}, 97.0, 4, "r1"),
        SearchTrial({**base, "omega": 0.5}, 96.0, 4, "dup"),          # the same configuration again
        SearchTrial({**base, "omega": 0.4}, 95.0, 4, "r2"),
    ]
    plan = plan_confirmation(trials, space, 4, 2, confirm_seeds(0, 3))
    assert [c.label for c in plan.candidates] == ["top1", "top2", "defaults"]
    assert [c.search_run for c in plan.candidates[:2]] == ["r1", "r2"]
    assert plan.seeds == [1, 2, 3]  # never the search's own seed 0
    defaults = plan.candidates[2].knobs
    assert defaults["omega"] == 0.8 and defaults["fusion_unit"] == "epoch"
    assert len(plan.points()) == 9 and all(set(p) == set(space.swept) | {"seed"} for p in plan.points())
    assert plan.candidate_of({**defaults, "seed": 2}).label == "defaults"


def test_a_search_best_that_is_the_defaults_is_confirmed_once():
    space = load_space("okdph")
    defaults = plan_confirmation([], space, 4, 2, [1]).candidates[0].knobs
    plan = plan_confirmation([SearchTrial(dict(defaults), 97.0, 4, "r")], space, 4, 2, [1, 2])
    assert len(plan.candidates) == 1 and plan.candidates[0].name == "top1 (= defaults)"


# --- degenerate and void configurations ------------------------------------------------------------

def test_the_default_okdph_space_samples_no_degenerate_corner():
    check_corners(load_space("okdph"))


def test_a_space_that_samples_identical_students_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("swept:\n  hwm_grad: {type: choice, values: ['true', 'false']}\n"
                    "  omega: {type: uniform, low: 0.3, high: 0.9}\n")
    with pytest.raises(UsageError, match="degenerate.*hwm_grad=false.*identical"):
        check_corners(load_space("okdph", path))
    path.write_text("fixed: {same_init: false}\nswept:\n  hwm_grad: {type: choice, values: ['true', 'false']}\n")
    check_corners(load_space("okdph", path))  # different starts: the students can differ


def test_okdph_degenerate_covers_equal_mixing_too():
    from kd_platform.run.spec import RunSpec
    with pytest.raises(UsageError, match="hwm_mix=mean"):
        RunSpec.from_flat("okdph", {"hwm_mix": "mean"}, 0)
    RunSpec.from_flat("okdph", {"hwm_mix": "mean", "views": "per_network"}, 0)
    with pytest.raises(UsageError, match="omega=1"):
        RunSpec.from_flat("okdph", {"omega": 1.0}, 0)
    RunSpec.from_flat("okdph", {"omega": 1.0, "same_init": False}, 0)
    RunSpec.from_flat("okdph", {"variant": "code"}, 0)  # the released code: per-network views


def test_void_knobs_of_okdph_against_the_fusion_rule():
    """fusion fires after unit ``count`` when ``count % interval == 0``: within E epochs only for
    interval <= E; with a batch unit, within E * steps steps."""
    from kd_platform.sweep.space import resolve
    for epochs, interval, unit, steps in [(2, 5, "epoch", None), (2, 2, "epoch", None), (3, 40, "batch", 10),
                                          (3, 30, "batch", 10), (3, 0, "epoch", None)]:
        recipe, cfg = resolve("okdph", {"epochs": epochs, "fusion_interval": interval, "fusion_unit": unit})
        from kd_platform.methods import get_method
        void = get_method("okdph").void_knobs(cfg, recipe, steps)
        units = epochs if unit == "epoch" else epochs * steps
        fires = any(c % interval == 0 for c in range(1, units + 1)) if interval else False
        assert ("fusion_interval" in void) == (interval > 0 and not fires), (epochs, interval, unit)
        assert ("gamma" in void) == (not fires)


@pytest.mark.parametrize("method, flat, knob", [
    ("kd", {"alpha": 0.0}, "temperature"), ("kdcl", {"alpha": 0.0}, "temperature"),
    ("dkd", {"alpha": 0.0, "beta": 0.0}, "warmup"), ("dist", {"w": 0.0}, "gamma"),
    ("cmkd", {"w_kd": 0.0}, "rank_eps"), ("cmkd", {"weighting": "difficulty"}, "spearman_share"),
    ("sam", {"rho": 0.0}, "adaptive"), ("okdph", {"beta": 0.0}, "temperature")])
def test_kd_only_knobs_are_void_when_their_term_is_off(method, flat, knob):
    from kd_platform.methods import get_method
    from kd_platform.sweep.space import resolve
    recipe, cfg = resolve(method, flat)
    assert knob in get_method(method).void_knobs(cfg, recipe)
    on = {k: (1.0 if isinstance(v, float) else "fixed") for k, v in flat.items()}
    recipe, cfg = resolve(method, on)
    assert knob not in get_method(method).void_knobs(cfg, recipe)


def test_ablation_plans_refuse_void_values_and_degenerate_cells():
    from kd_platform.sweep.ablate import plan_ablation
    space = load_space("okdph")
    with pytest.raises(UsageError, match=r"--ablate fusion_interval: values 0 and 5 train identically"):
        plan_ablation(space, "fusion_interval", 1, 0, epochs=2)
    plan_ablation(space, "fusion_interval", 1, 0, epochs=5)  # 5 fires at the end of epoch 5
    plan_ablation(space, "fusion_interval,fusion_unit", 1, 0, epochs=2)  # with batches they differ
    space.fix({"beta": 0})
    with pytest.raises(UsageError, match="--ablate temperature: no value of it changes this run"):
        plan_ablation(space, "temperature", 1, 0, epochs=2)
    hwm = load_space("okdph")
    hwm.swept["hwm_grad"] = {"type": "choice", "values": ["true", "false"]}
    with pytest.raises(UsageError, match="the cell hwm_grad=false is degenerate"):
        plan_ablation(hwm, "hwm_grad", 1, 0, epochs=2)


# --- noise in the report -----------------------------------------------------------------------------

def test_effects_against_the_noise_by_hand():
    from kd_platform.analysis.noise import effects_sentence, effects_vs_noise, seed_noise
    confirm = pd.DataFrame({"lr": [0.1, 0.1, 0.1, 0.2, 0.2, 0.2], "m": [90.0, 92.0, 91.0, 80.0, 83.0, 80.5]})
    noise = seed_noise(confirm, ["lr"], "m", "confirmation runs")
    assert noise.std == pytest.approx(math.sqrt((np.var([90, 92, 91], ddof=1) + np.var([80, 83, 80.5], ddof=1)) / 2))
    search = pd.DataFrame({"lr": [0.1, 0.1, 0.2, 0.2], "t": ["a", "b", "a", "b"], "m": [91.0, 90.0, 81.0, 82.0]})
    dists = {"lr": {"type": "choice", "values": [0.1, 0.2]}, "t": {"type": "choice", "values": ["a", "b"]}}
    table = effects_vs_noise(search, dists, ["lr", "t"], "m", noise, pd.Series({"lr": 0.9, "t": 0.1}))
    lr, t = table.set_index("knob").loc["lr"], table.set_index("knob").loc["t"]
    assert lr["marginal_effect"] == pytest.approx(9.0)
    assert lr["noise_threshold"] == pytest.approx(1.96 * noise.std * math.sqrt(1 / 2 + 1 / 2))
    assert lr["exceeds_noise"] == "yes" and t["exceeds_noise"] == "no" and lr["importance"] == 0.9
    assert "`lr`" in effects_sentence(table, noise) and "`t`" not in effects_sentence(table, noise)
    unknown = seed_noise(confirm.iloc[[0, 3]], ["lr"], "m", "confirmation runs")
    assert not unknown.known and "Seed noise unknown" in unknown.sentence("m")


def test_collapsed_runs_are_counted_in_an_ablation_table():
    from kd_platform.analysis.noise import collapsed_column
    runs = pd.DataFrame({"gamma": [0.0, 0.0, 1.0, 1.0], "tag.identical_peers": [None, None, "true", "true"]})
    table = pd.DataFrame({"gamma": [0.0, 1.0]})
    assert collapsed_column(table, runs, ["gamma"]) == ["", "2 runs: identical students"]
    assert collapsed_column(table, runs.assign(**{"tag.identical_peers": None}), ["gamma"]) is None
