"""Seed noise, measured in the sweep itself, and the knob effects that rise above it.

The noise is the seed-to-seed standard deviation of one configuration's metric: pooled over
the confirmation stage's configurations (a TPE sweep) or the ablation's cells. A knob's
marginal effect (the range of its value or bin means over the search trials) counts as
larger than the noise only where it exceeds the 95% half-width of a difference of two such
means, ``1.96 * sigma * sqrt(1/n_a + 1/n_b)``. Knob importance is a share of the variance
among the search trials, seed noise included, so it is shown beside this, never alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kd_platform import stats
from kd_platform.analysis.tables import marginal_effect

Z95 = 1.96
COLLAPSED_TAG = "tag.identical_peers"


@dataclass
class Noise:
    std: float          # pooled seed-to-seed standard deviation, in the metric's units
    configurations: int  # groups with two or more seeds that it pools
    runs: int
    source: str          # "confirmation runs" or "ablation seeds"

    @property
    def known(self) -> bool:
        return math.isfinite(self.std)

    def sentence(self, metric: str) -> str:
        if not self.known:
            return (f"**Seed noise unknown**: no configuration of this sweep was trained with two or more seeds, "
                    f"so no difference of `{metric}` below can be told from seed luck. A TPE sweep measures it "
                    f"in its confirmation stage (leave `--no-confirm` off); an ablation with `--seeds 3` or more.")
        return (f"**Seed noise**: `{metric}` moves by a standard deviation of **{self.std:.2f} points** between "
                f"seeds of one configuration (pooled over {self.configurations} configurations, {self.runs} "
                f"{self.source}). A difference smaller than that is not a finding.")


def seed_noise(runs: pd.DataFrame, keys: list[str], metric: str, source: str) -> Noise:
    """The pooled seed std of ``metric`` over the groups of ``runs`` that share ``keys``."""
    keys = [k for k in keys if k in runs.columns]
    if runs.empty or metric not in runs.columns:
        return Noise(math.nan, 0, 0, source)
    grouped = runs.groupby(keys, dropna=False)[metric] if keys else [(None, runs[metric])]
    groups = [np.asarray(g.dropna(), dtype=float) for _, g in grouped]
    groups = [g for g in groups if len(g) > 1]
    return Noise(stats.pooled_std(groups), len(groups), int(sum(len(g) for g in groups)), source)


def effects_vs_noise(runs: pd.DataFrame, swept: dict[str, dict[str, Any]], knobs: list[str], metric: str,
                     noise: Noise, importance: pd.Series | None) -> pd.DataFrame:
    """One row per knob: its marginal effect over the search trials, the noise threshold that
    effect must pass, whether it does, and the knob's importance beside them."""
    rows = []
    for knob in knobs:
        table = marginal_effect(runs, knob, metric, swept.get(knob))
        table = table[table["n_runs"] > 0]
        if len(table) < 2:
            effect, threshold = 0.0, math.nan
        else:
            hi, lo = table.loc[table["mean"].idxmax()], table.loc[table["mean"].idxmin()]
            effect = float(hi["mean"] - lo["mean"])
            threshold = Z95 * noise.std * math.sqrt(1 / hi["n_runs"] + 1 / lo["n_runs"]) if noise.known else math.nan
        exceeds = "yes" if math.isfinite(threshold) and effect > threshold else (
            "unknown" if not math.isfinite(threshold) else "no")
        share = float(importance[knob]) if importance is not None and knob in importance.index else math.nan
        rows.append({"knob": knob, "marginal_effect": effect, "noise_threshold": threshold,
                     "exceeds_noise": exceeds, "importance": share})
    return pd.DataFrame(rows)


def effects_sentence(table: pd.DataFrame, noise: Noise) -> str:
    if not noise.known or table.empty:
        return "Without a measured seed noise, neither the marginal effects nor the importances are findings."
    real = table.loc[table["exceeds_noise"] == "yes", "knob"].tolist()
    if not real:
        return ("**No knob's marginal effect exceeds the seed noise** at this budget: the importances below rank "
                "noise, and no knob can be said to matter from this sweep.")
    return ("Marginal effects larger than the seed noise: " + ", ".join(f"`{k}`" for k in real)
            + ". They are marginal trends over TPE's samples, not controlled comparisons: confirm one with "
              "`--ablate`.")


def mark_collapsed(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (rows indexed like ``runs`` or holding ``run_id``) with a ``collapsed`` column
    where a run's students ended identical: one network, not the method it names."""
    if COLLAPSED_TAG not in runs.columns or "run_id" not in frame.columns:
        return frame
    flagged = set(runs.loc[runs[COLLAPSED_TAG].astype(str) == "true", "run_id"])
    if not flagged:
        return frame
    return frame.assign(collapsed=["identical students" if r in flagged else "" for r in frame["run_id"]])


def collapsed_column(table: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> list[str] | None:
    """Per row of ``table`` (one value of ``keys``), how many of its runs' students ended
    identical; None when no run collapsed, so that tables stay as they were."""
    if COLLAPSED_TAG not in runs.columns:
        return None
    flagged = runs[runs[COLLAPSED_TAG].astype(str) == "true"]
    if flagged.empty:
        return None
    counts = flagged.groupby(keys, dropna=False).size()
    out = []
    for _, row in table.iterrows():
        key = tuple(row[k] for k in keys) if len(keys) > 1 else row[keys[0]]
        n = int(counts.get(key, 0))
        out.append(f"{n} run{'s' if n != 1 else ''}: identical students" if n else "")
    return out
