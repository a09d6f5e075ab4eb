"""Tables of a sweep: ablation tables (per knob value, over seeds: mean, std, a bootstrap
interval of the mean, and the difference to the default value with its interval, Welch's
p-value and the Holm-corrected one; see ``stats``), the best trials, and each swept knob's
marginal effect.

Only runs that trained every epoch (``trial_outcome == completed``) enter: the final value
of a run that ASHA stopped or that failed comes from an earlier epoch and is not
comparable with the others.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kd_platform import stats
from kd_platform.analysis.load import Sweep, coerce_like

MAX_BINS = 4
CATEGORICAL_MAX_VALUES = 6  # an int knob with few distinct values reads better per value than binned
# Metrics tabulated besides the primary one when runs logged them: flatness and calibration.
EXTRA_METRIC_PREFIXES = ("flat/hessian_trace/", "flat/top_eig/", "flat/sharpness/", "flat/barrier/")
"""Extra metrics tabulated without being asked for: the flatness measures (lower is flatter).
Calibration and diversity exist for every network and epoch, so they are tabulated when named
(``--extra-metric``)."""


@dataclass
class Usable:
    """The runs that enter the tables, and why the others do not."""
    runs: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def excluded_total(self) -> int:
        return sum(self.excluded.values())


def usable_runs(sweep: Sweep) -> Usable:
    df = sweep.runs
    completed = df["trial_outcome"] == "completed"
    excluded = df.loc[~completed, "trial_outcome"].value_counts().to_dict()
    keep = completed & df[sweep.metric].notna()
    if int((completed & ~keep).sum()):
        excluded["completed without the metric"] = int((completed & ~keep).sum())
    if "epochs" in df.columns and pd.api.types.is_numeric_dtype(df["epochs_run"].dtype):
        short = keep & (df["epochs_run"] < df["epochs"]).fillna(False).astype(bool)
        if int(short.sum()):
            excluded["completed short of the final epoch"] = int(short.sum())
        keep &= ~short
    return Usable(df[keep].copy(), {str(k): int(v) for k, v in sorted(excluded.items())})


def matches(column: pd.Series, value: Any) -> pd.Series:
    """Element-wise ``column == value``, tolerant of float round-off from the params' text."""
    if pd.api.types.is_float_dtype(column.dtype) and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
        return pd.Series(np.isclose(column.astype(float), float(value)), index=column.index)
    return (column == value).fillna(False).astype(bool)


def hold_at_defaults(runs: pd.DataFrame, defaults: dict[str, Any]) -> tuple[pd.Series, dict[str, Any], list[str]]:
    """Which runs have the given knobs at their defaults: a knob whose default some run has is
    held there; one whose default no run has (the ablation grid does not contain it) is left
    free, so that the comparison averages over its values instead of finding no run at all.
    Returns the mask, the knobs held and the knobs left free."""
    mask = pd.Series(True, index=runs.index)
    held, free = {}, []
    for knob, value in defaults.items():
        at_default = matches(runs[knob], value)
        if at_default.any():
            mask &= at_default
            held[knob] = value
        else:
            free.append(knob)
    return mask, held, free


def ablation_defaults(sweep: Sweep, runs: pd.DataFrame) -> tuple[dict[str, Any], list[str]]:
    """Each ablated knob's default: the parent's ``default.<knob>`` param; when that is
    missing, the most common value among runs whose other ablated knobs (those with a known
    default) are at their defaults. In a one-knob-at-a-time design that is the default;
    in a full grid every value is equally common and the tie is reported."""
    known, notes = {}, []
    for knob in sweep.ablate:
        if knob in sweep.defaults and knob in runs.columns:
            known[knob] = coerce_like(sweep.runs[knob], sweep.defaults[knob])
    out = dict(known)
    for knob in sweep.ablate:
        if knob in out or knob not in runs.columns:
            continue
        mask, _, _ = hold_at_defaults(runs, {k: v for k, v in known.items() if k != knob})
        counts = runs.loc[mask, knob].value_counts()
        if counts.empty:
            continue
        top = counts[counts == counts.max()].index
        out[knob] = min(top, key=str)
        tie = " (a tie; the first in sort order was taken)" if len(top) > 1 else ""
        notes.append(f"The parent run has no `default.{knob}` param; the default of `{knob}` was taken as "
                     f"`{out[knob]}`, its most common value among runs with the other ablated knobs at "
                     f"their defaults{tie}.")
    return out, notes


@dataclass
class AblationTable:
    table: pd.DataFrame       # one row per value: n_runs, mean, std, n_seeds, intervals, tests (STAT_COLUMNS)
    runs: pd.DataFrame        # the runs behind it (those with the metric)
    held: dict[str, Any]      # other ablated knobs held at their defaults
    free: list[str]           # other ablated knobs averaged over (their default is not in the grid)
    metric: str = ""          # the metric the table is about

    def too_few_seeds(self, min_seeds: int = stats.MIN_SEEDS) -> pd.Series:
        """Which cells have fewer seeds than a conclusion needs."""
        return self.table["n_seeds"] < min_seeds

    def significant(self, alpha: float = stats.ALPHA) -> pd.DataFrame:
        """The non-default cells whose difference to the default survives the Holm correction."""
        return significant(self.table, alpha)


def significant(table: pd.DataFrame, alpha: float = stats.ALPHA) -> pd.DataFrame:
    return table[(table["p_holm"] <= alpha).fillna(False).astype(bool)]


def _seed_values(runs: pd.DataFrame, keys: list[str], metric: str) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Mean, std and count over seeds per ``keys`` group, and each group's per-seed values.
    Runs of one group that share a seed (cells of a knob left free, or the default
    configuration run once per ablated knob) are averaged first, so the statistics are over
    seeds, not over repeats within a seed. Runs without the metric do not count."""
    runs = runs[runs[metric].notna()]
    per_seed = runs.groupby([*keys, "seed"], dropna=False)[metric].mean().reset_index()
    grouped = per_seed.groupby(keys, sort=True)
    table = grouped[metric].agg(mean="mean", std="std", n_seeds="count")
    table.insert(0, "n_runs", runs.groupby(keys)[metric].count())
    values = [group[metric].to_numpy(dtype=float) for _, group in grouped]
    return table.reset_index(), values


def compare_cells(table: pd.DataFrame, values: list[np.ndarray], is_default: pd.Series, *,
                  confidence: float = stats.CONFIDENCE, n_resamples: int = stats.N_RESAMPLES,
                  seed: int = stats.SEED, min_seeds: int = stats.MIN_SEEDS) -> pd.DataFrame:
    """``table`` (one row per cell, ``values`` its per-seed values) with each cell's bootstrap
    interval of the mean and, against the cell where ``is_default`` holds, the difference of
    means with its bootstrap interval, Welch's two-sided p-value and the Holm-adjusted p-value
    across the table's non-default cells. Cells (or a default) with fewer than ``min_seeds``
    seeds get NaN intervals and p-values; the default's own comparison is NaN but its
    difference is 0. Every cell's bootstrap uses the same ``seed``, so a cell's interval does
    not depend on which other cells the table holds."""
    opts: dict[str, Any] = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed, "min_n": min_seeds}
    out = table.copy()
    cis = [stats.bootstrap_mean_ci(v, **opts) for v in values]
    out["ci95_low"] = [lo for lo, _ in cis]
    out["ci95_high"] = [hi for _, hi in cis]
    flags = np.asarray(is_default, dtype=bool)
    base = int(np.flatnonzero(flags)[0]) if flags.any() else None
    n = len(out)
    diff, dlo, dhi, p = (np.full(n, np.nan) for _ in range(4))
    if base is not None:
        diff = out["mean"].to_numpy(dtype=float) - float(out["mean"].iloc[base])
        for i, v in enumerate(values):
            if flags[i]:
                continue
            dlo[i], dhi[i] = stats.bootstrap_diff_ci(v, values[base], **opts)
            p[i] = stats.welch_p(v, values[base], min_n=min_seeds)
    out["diff_vs_default"] = diff
    out["diff_ci95_low"] = dlo
    out["diff_ci95_high"] = dhi
    out["p_vs_default"] = p
    out["p_holm"] = stats.holm(p)
    return out


STAT_COLUMNS = ["n_runs", "mean", "std", "n_seeds", "ci95_low", "ci95_high", "diff_vs_default",
                "diff_ci95_low", "diff_ci95_high", "p_vs_default", "p_holm"]


def ablation_table(runs: pd.DataFrame, knob: str, defaults: dict[str, Any], metric: str,
                   **options: Any) -> AblationTable:
    """The table of one ablated knob for one metric: its values compared with the other
    ablated knobs held at their defaults (see ``hold_at_defaults``), each value's mean with
    its bootstrap interval and its difference to the default value (see ``compare_cells``;
    ``options`` are that function's: confidence, n_resamples, seed, min_seeds)."""
    mask, held, free = hold_at_defaults(runs, {k: v for k, v in defaults.items() if k != knob})
    sub = runs[mask & runs[metric].notna()]
    table, values = _seed_values(sub, [knob], metric)
    default = defaults.get(knob)
    is_default = matches(table[knob], default) if default is not None else pd.Series(False, index=table.index)
    table.insert(1, "default", is_default.to_numpy())
    table = compare_cells(table, values, table["default"], **options)
    return AblationTable(table, sub, held, free, metric)


def grid_table(runs: pd.DataFrame, knobs: list[str], metric: str, mode: str,
               defaults: dict[str, Any] | None = None, **options: Any) -> pd.DataFrame:
    """Every cell of the ablation grid (one combination of the ablated knobs' values), best first:
    where two knobs interact, the per-knob tables cannot show it. With ``defaults``, the cell
    with every knob at its default is the one the others are compared with (``compare_cells``)."""
    runs = runs[runs[metric].notna()]
    table, values = _seed_values(runs, knobs, metric)
    is_default = pd.Series(bool(defaults) and all(k in defaults for k in knobs), index=table.index)
    for knob in knobs:
        if defaults and knob in defaults:
            is_default &= matches(table[knob], defaults[knob])
    table.insert(len(knobs), "default", is_default.to_numpy())
    table = compare_cells(table, values, table["default"], **options)
    return table.sort_values("mean", ascending=mode == "min", ignore_index=True, kind="stable")


def extra_metric_columns(runs: pd.DataFrame, extra_metrics: Sequence[str] | None = None,
                         primary: str | None = None) -> tuple[list[str], list[str]]:
    """The extra metrics to tabulate besides the primary one, and those asked for that no run
    has. ``None`` picks every column of ``runs`` named like a flatness measure
    (:data:`EXTRA_METRIC_PREFIXES`) that some run logged."""
    if extra_metrics is None:
        found = [c for c in runs.columns if isinstance(c, str) and c.startswith(EXTRA_METRIC_PREFIXES)
                 and c != primary and runs[c].notna().any()]
        return sorted(found), []
    present = [m for m in dict.fromkeys(extra_metrics)
               if m != primary and m in runs.columns and runs[m].notna().any()]
    return present, [m for m in dict.fromkeys(extra_metrics) if m != primary and m not in present]


PARAMS_PREFIX, SIZE_PREFIX = "model/params/", "model/size_mb/"  # logged with each run's models (tracking.models)


def with_model_sizes(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``runs`` with, per network that was logged as a model, its test accuracy beside its size
    (parameters, MB on disk) and the accuracy per million parameters; and those columns."""
    out, cols = runs.copy(), []
    for params in sorted(c for c in runs.columns if isinstance(c, str) and c.startswith(PARAMS_PREFIX)):
        net = params[len(PARAMS_PREFIX):]
        acc, per = f"test/acc/{net}", f"test/acc_per_mparam/{net}"
        if acc in out.columns:
            out[per] = out[acc] / (out[params] / 1e6)
        cols += [c for c in (acc, params, SIZE_PREFIX + net, per) if c in out.columns]
    return out, cols


def best_trials(runs: pd.DataFrame, metric: str, mode: str, knobs: list[str], n: int = 5) -> pd.DataFrame:
    """The ``n`` best runs with their knobs and, where they logged models, each network's size."""
    ranked, sizes = with_model_sizes(runs.sort_values(metric, ascending=mode == "min").head(n))
    cols = ["run_id", metric, *[k for k in knobs if k in ranked.columns], "seed", "epochs_run", *sizes]
    out = ranked[cols].reset_index(drop=True)
    out.index = out.index + 1
    out.index.name = "rank"
    return out


def is_categorical(column: pd.Series, dist: dict[str, Any] | None) -> bool:
    if dist and dist.get("type") == "choice":
        return True
    if pd.api.types.is_bool_dtype(column.dtype) or not pd.api.types.is_numeric_dtype(column.dtype):
        return True
    return pd.api.types.is_integer_dtype(column.dtype) and column.nunique() <= CATEGORICAL_MAX_VALUES


def marginal_effect(runs: pd.DataFrame, knob: str, metric: str, dist: dict[str, Any] | None) -> pd.DataFrame:
    """Mean of the metric per value (categorical knobs) or per quantile bin (numeric ones).

    In a TPE sweep the other knobs vary too, so this is a marginal, not a controlled,
    comparison; quantile bins keep every bin populated whatever TPE concentrated on.
    """
    binned = not is_categorical(runs[knob], dist)
    if not binned:
        groups = runs[knob]
    else:
        values = runs[knob].astype(float)
        bins = max(1, min(MAX_BINS, len(runs) // 2))
        if bins > 1 and values.nunique() > 1:
            groups = pd.qcut(values, q=bins, duplicates="drop", precision=3)
        else:
            groups = pd.Series(f"[{values.min():.3g}, {values.max():.3g}]", index=runs.index)
    table = runs.groupby(groups.rename(knob), observed=True, sort=True)[metric].agg(
        n_runs="count", mean="mean", std="std")
    if binned:
        table.index = table.index.astype(str)  # interval labels, kept in the bins' numeric order
    return table.reset_index()
