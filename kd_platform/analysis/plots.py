"""PNG plots of a sweep, drawn on bare ``Figure`` objects (the Agg canvas) rather than
through ``pyplot``, so no display, backend switch or global figure state is involved."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

DPI = 110
DEFAULT_COLOUR, OTHER_COLOUR, POINT_COLOUR = "tab:orange", "tab:blue", "0.35"


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _jitter(n: int, width: float = 0.08, seed: int = 0) -> np.ndarray:
    # Seeded, so that the same runs always give the same picture.
    return np.random.default_rng(seed).uniform(-width, width, n)


def _interval(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """Each row's interval around its mean: the bootstrap CI where the table has one (no bar
    where it is missing), else ± std."""
    mean = table["mean"].to_numpy(dtype=float)
    if {"ci95_low", "ci95_high"} <= set(table.columns):
        low = table["ci95_low"].to_numpy(dtype=float)
        high = table["ci95_high"].to_numpy(dtype=float)
        return np.where(np.isnan(low), mean, low), np.where(np.isnan(high), mean, high), "95% bootstrap CI"
    std = table["std"].fillna(0).to_numpy(dtype=float)
    return mean - std, mean + std, "± std"


def ablation_plot(table: pd.DataFrame, runs: pd.DataFrame, knob: str, metric: str, path: Path,
                  alpha: float = 0.05) -> Path:
    """Mean per value with its 95% bootstrap interval as error bars and every run as a dot;
    the default value in another colour, and a star over each value whose difference to the
    default survives the Holm correction (``p_holm`` at most ``alpha``)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    labels = [str(v) for v in table[knob]]
    x = np.arange(len(table))
    mean = table["mean"].to_numpy(dtype=float)
    low, high, what = _interval(table)
    colours = [DEFAULT_COLOUR if d else OTHER_COLOUR for d in table["default"]]
    ax.bar(x, mean, color=colours, alpha=0.35, width=0.6)
    ax.errorbar(x, mean, yerr=np.vstack([mean - low, high - mean]), fmt="none", ecolor="black", capsize=5)
    for i, value in enumerate(table[knob]):
        ys = runs.loc[(runs[knob] == value).fillna(False).astype(bool), metric].dropna().to_numpy()
        ax.scatter(i + _jitter(len(ys), seed=i), ys, s=14, color=POINT_COLOUR, zorder=3)
    base = table.loc[table["default"], "mean"]
    if len(base):
        ax.axhline(base.iloc[0], color=DEFAULT_COLOUR, linestyle="--", linewidth=1, label="default mean")
    starred = False
    if "p_holm" in table.columns:
        top = np.fmax(high, mean)
        for i, p in enumerate(table["p_holm"].to_numpy(dtype=float)):
            if p <= alpha:
                ax.annotate("*", (i, top[i]), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=14)
                starred = True
        if starred:
            ax.plot([], [], " ", label=f"* differs from the default (Holm p ≤ {alpha:g})")
    if len(base) or starred:
        ax.legend(loc="best", fontsize=8)
    ax.set_xticks(x, labels)
    _tight_ylim(ax, pd.concat([runs[metric], pd.Series(low), pd.Series(high)]), top_pad=0.2 if starred else 0.1)
    ax.set_xlabel(knob)
    ax.set_ylabel(metric)
    ax.set_title(f"Ablation of {knob}: mean and {what} over seeds", fontsize=10)
    return _save(fig, path)


def knob_plot(runs: pd.DataFrame, knob: str, metric: str, categorical: bool, log_x: bool, path: Path,
              stopped: pd.DataFrame | None = None) -> Path:
    """The metric of every completed run against one knob (TPE sweeps), per-value means for
    categorical knobs; runs ASHA stopped are drawn hollow at their last value, since they show
    where the search gave up even though they are not comparable with the completed ones."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    stopped = stopped if stopped is not None else runs.iloc[:0]
    hollow: dict[str, Any] = {"s": 18, "facecolors": "none", "edgecolors": "0.5", "label": "stopped early (last epoch)"}
    if categorical:
        values = sorted(pd.concat([runs[knob], stopped[knob]]).dropna().unique(), key=lambda v: (str(type(v)), v))
        pos = {v: i for i, v in enumerate(values)}
        for value, i in pos.items():
            ys = runs.loc[runs[knob] == value, metric].to_numpy()
            ax.scatter(i + _jitter(len(ys), seed=i), ys, s=18, color=OTHER_COLOUR, zorder=3)
            if len(ys):
                ax.hlines(ys.mean(), i - 0.25, i + 0.25, color="black", linewidth=2)
        if len(stopped):
            xs = stopped[knob].map(pos).to_numpy(dtype=float)
            ax.scatter(xs + _jitter(len(xs), seed=99), stopped[metric], **hollow)
        ax.set_xticks(np.arange(len(values)), [str(v) for v in values])
        ax.set_xlim(-0.6, len(values) - 0.4)
    else:
        ax.scatter(runs[knob].astype(float), runs[metric], s=18, color=OTHER_COLOUR, label="completed")
        if len(stopped):
            ax.scatter(stopped[knob].astype(float), stopped[metric], **hollow)
        if log_x:
            ax.set_xscale("log")
    if len(stopped):
        ax.legend(fontsize=8, loc="best")
    _tight_ylim(ax, pd.concat([runs[metric], stopped[metric]]))
    ax.set_xlabel(knob)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {knob} ({len(runs)} completed runs)")
    return _save(fig, path)


def importance_plot(values: pd.Series, title: str, xlabel: str, path: Path) -> Path:
    fig = Figure(figsize=(6, max(2.6, 0.9 + 0.35 * len(values))))
    ax = fig.add_subplot()
    ordered = values.sort_values()
    ax.barh([str(k) for k in ordered.index], ordered.to_numpy(), color=OTHER_COLOUR)
    for y, v in enumerate(ordered.to_numpy()):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax.set_xlim(0, max(float(ordered.max()), 1e-12) * 1.2)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, path)


def curves_plot(curves: Mapping[str, pd.Series], metric: str, title: str, path: Path,
                highlight: str | None = None) -> Path:
    """One line per entry of ``curves`` (epoch -> value)."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for label, series in curves.items():
        style: dict[str, Any] = {"linewidth": 2.5, "color": "black"} if label == highlight else {}
        ax.plot(series.index, series.to_numpy(), marker="o", markersize=3, label=label, **style)
    epochs = sorted({int(e) for s in curves.values() for e in s.index})
    if epochs and len(epochs) <= 20:
        ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _tight_ylim(ax: Any, values: pd.Series, top_pad: float = 0.1) -> None:
    values = values.dropna()
    if values.empty:
        return
    lo, hi = float(values.min()), float(values.max())
    if hi > lo:
        ax.set_ylim(lo - (hi - lo) * 0.1, hi + (hi - lo) * top_pad)
    else:
        pad = max(abs(hi) * 0.01, 0.5)
        ax.set_ylim(lo - pad, hi + pad)
