"""A comparison's table: per method and column, the seeds' mean, std and Student-t 95% interval,
the published figure beside it, Welch's test against the baseline (Holm-corrected within the
column), and a rank that only separates methods a test separates.

The rank of a method is 1 plus the number of methods of its column with a higher mean that
Welch's test, Holm-corrected across every pair of methods in the column, tells apart from it:
methods no test separates share a rank. Intervals are Student-t, not bootstrap: with three to
five seeds a bootstrap's percentiles are too narrow.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from kd_platform import stats
from kd_platform.compare.plan import PRIMARY, Column
from kd_platform.compare.references import Published, published
from kd_platform.run.engine import AT_BEST_VAL
from kd_platform.run.evaluation import collapsed

EXTRAS = {"students_best": "test/acc/students_best", "ensemble": "test/acc/ensemble", "hwm": "test/acc/hwm",
          "teacher": "test/acc/teacher"}
"""Figures shown beside the primary one where a method has them: the best student, the ensemble
or the mean HWM of an online method, and an offline method's teacher."""
BEST_VAL = f"{AT_BEST_VAL}/acc/students_mean"


@dataclass
class Record:
    """One finished cell run: what the table is built from."""
    method: str
    column: str
    seed: int
    metrics: dict[str, float]
    run_id: str = ""


@dataclass
class Row:
    method: str
    column: str
    values: list[float]                              # PRIMARY per seed
    seeds: list[int]
    best_val: list[float] = field(default_factory=list)
    extras: dict[str, float] = field(default_factory=dict)  # seed means of EXTRAS
    reference: Published | None = None
    p_raw: float = math.nan
    p_holm: float = math.nan
    diff_to_baseline: float = math.nan
    rank: int | None = None
    is_baseline: bool = False
    collapsed: int = 0  # seeds whose students ended identical (one network, not an ensemble)
    run_ids: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return stats.t_interval(self.values)

    @property
    def best_val_mean(self) -> float:
        return float(np.mean(self.best_val)) if self.best_val else math.nan

    @property
    def diff(self) -> float:
        return self.mean - self.reference.top1 if self.reference else math.nan

    @property
    def reference_inside(self) -> bool | None:
        low, high = self.interval
        if self.reference is None or not math.isfinite(low):
            return None
        return low <= self.reference.top1 <= high


@dataclass
class Table:
    rows: list[Row]          # columns in order, methods in the order given
    columns: list[str]
    baseline: str
    alpha: float = stats.ALPHA

    def column(self, label: str) -> list[Row]:
        return [r for r in self.rows if r.column == label]

    @property
    def min_seeds(self) -> int:
        return min((r.n for r in self.rows), default=0)

    def verdicts(self) -> list[str]:
        """What the table does and does not show, in plain words."""
        lines = []
        if self.min_seeds < stats.MIN_SEEDS:
            lines.append(f"Too few seeds for a conclusion: some rows have {self.min_seeds} "
                         f"(at least {stats.MIN_SEEDS} are needed for an interval worth reading); "
                         f"rerun with --seeds 5.")
        for label in self.columns:
            rows = [r for r in self.column(label) if not r.is_baseline]
            better = [r.method for r in rows if r.p_holm < self.alpha and r.diff_to_baseline > 0]
            worse = [r.method for r in rows if r.p_holm < self.alpha and r.diff_to_baseline < 0]
            same = [r.method for r in rows if not r.p_holm < self.alpha]
            parts = []
            if better:
                parts.append(f"better than {self.baseline}: {', '.join(better)}")
            if worse:
                parts.append(f"worse than {self.baseline}: {', '.join(worse)}")
            if same:
                parts.append(f"not separated from {self.baseline}: {', '.join(same)}")
            if parts:
                lines.append(f"{label}: " + "; ".join(parts) + f" (Welch, Holm-corrected, alpha {self.alpha:g}).")
        return lines


def build_table(records: Sequence[Record], columns: Sequence[Column], methods: Sequence[str],
                baseline: str, refs: Mapping[tuple[str, str, str], Published]) -> Table:
    """Rows in the order of ``columns`` and ``methods``; a cell without a finished seed keeps an
    empty row."""
    rows = []
    for column in columns:
        label = column.label
        for m in methods:
            mine = sorted((r for r in records if r.column == label and r.method == m and PRIMARY in r.metrics),
                          key=lambda r: r.seed)
            row = Row(m, label, [r.metrics[PRIMARY] for r in mine], [r.seed for r in mine],
                      [r.metrics[BEST_VAL] for r in mine if BEST_VAL in r.metrics], is_baseline=m == baseline,
                      collapsed=sum(1 for r in mine if collapsed(r.metrics)), run_ids=[r.run_id for r in mine])
            for name, key in EXTRAS.items():
                found = [r.metrics[key] for r in mine if key in r.metrics]
                if found:
                    row.extras[name] = float(np.mean(found))
            row.reference = published(dict(refs), column.dataset, column.lookup_pairs(m), m)
            rows.append(row)
    table = Table(rows, [c.label for c in columns], baseline)
    for column in columns:
        _test_column(table.column(column.label), baseline, table.alpha)
    return table


def _test_column(rows: list[Row], baseline: str, alpha: float) -> None:
    base = next((r for r in rows if r.method == baseline), None)
    others = [r for r in rows if r is not base]
    if base is not None:
        for r in others:
            r.p_raw = stats.welch_p(r.values, base.values, min_n=2)
            r.diff_to_baseline = r.mean - base.mean
        for r, p in zip(others, stats.holm([r.p_raw for r in others])):
            r.p_holm = float(p)
    ranked = [r for r in rows if r.n >= 2]
    pairs = list(itertools.combinations(ranked, 2))
    adjusted = stats.holm([stats.welch_p(a.values, b.values, min_n=2) for a, b in pairs])
    beaten_by: dict[str, int] = {r.method: 0 for r in ranked}
    for (a, b), p in zip(pairs, adjusted):
        if p < alpha:
            low = a if a.mean < b.mean else b
            beaten_by[low.method] += 1
    for r in ranked:
        r.rank = 1 + beaten_by[r.method]


def frame(table: Table) -> pd.DataFrame:
    """The table as one row per method and column (the CSV)."""
    out = []
    for r in table.rows:
        low, high = r.interval
        out.append({"column": r.column, "method": r.method, "n": r.n, "seeds": " ".join(map(str, r.seeds)),
                    "mean": r.mean, "std": r.std, "ci_low": low, "ci_high": high,
                    "best_val_epoch_mean": r.best_val_mean,
                    **{f"{k}_mean": r.extras.get(k, math.nan) for k in EXTRAS},
                    "published": r.reference.top1 if r.reference else math.nan,
                    "published_source": r.reference.note() if r.reference else "",
                    "diff_to_published": r.diff,
                    "published_inside_ci": "" if r.reference_inside is None else r.reference_inside,
                    "p_vs_baseline": r.p_raw, "p_holm": r.p_holm, "rank": r.rank if r.rank else math.nan,
                    "collapsed_seeds": r.collapsed, "values": " ".join(f"{v:.4f}" for v in r.values)})
    return pd.DataFrame(out)


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _p(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else ""


def _ci(r: Row) -> str:
    low, high = r.interval
    return f"[{_f(low)}, {_f(high)}]" if math.isfinite(low) else "n/a"


def _published(r: Row) -> str:
    if r.reference is None:
        return ""
    star = "" if r.reference.verified else "*"
    inside = {True: "inside", False: "outside", None: ""}[r.reference_inside]
    return f"{r.reference.top1:.2f}{star} ({r.diff:+.2f}{', ' + inside if inside else ''})"


def _extras(r: Row) -> str:
    flag = [f"COLLAPSED in {r.collapsed}/{r.n} seeds: identical students"] if r.collapsed else []
    return ", ".join([f"{k} {v:.2f}" for k, v in r.extras.items()] + flag)


def terminal_lines(table: Table) -> list[str]:
    lines = []
    width = max((len(r.method) for r in table.rows), default=6)
    for label in table.columns:
        lines.append(f"  {label}")
        for r in table.column(label):
            rank = f"#{r.rank}" if r.rank else "  "
            p = "baseline" if r.is_baseline else (f"p={_p(r.p_holm)}" if _p(r.p_holm) else "")
            pub = _published(r)
            lines.append(f"    {rank:<3} {r.method:<{width}}  {_f(r.mean)} ± {_f(r.std)}  95% {_ci(r):<16} n={r.n}  "
                         f"best-val epoch {_f(r.best_val_mean)}  {p:<9}"
                         + (f"  published {pub}" if pub else "") + (f"  [{_extras(r)}]" if r.extras else ""))
    return lines


def markdown(table: Table, protocol: Sequence[str], title: str) -> str:
    head = ["rank", "method", "last epoch: mean ± std", "95% interval", "n", "test acc at best-val epoch",
            f"p vs {table.baseline} (Holm)", "published (diff; vs interval)", "also"]
    out = [f"# {title}", "", "Protocol:", "", *[f"- {line}" for line in protocol], ""]
    for label in table.columns:
        out += [f"## {label}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in table.column(label):
            cells = [str(r.rank or ""), r.method, f"{_f(r.mean)} ± {_f(r.std)}", _ci(r), str(r.n),
                     _f(r.best_val_mean), "baseline" if r.is_baseline else _p(r.p_holm), _published(r), _extras(r)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    notes = [r.reference for r in table.rows if r.reference]
    if notes:
        out += ["Published figures (* unverified: not read in the paper's own table):", ""]
        seen = set()
        for r in table.rows:
            if r.reference and (r.method, r.reference.note()) not in seen:
                seen.add((r.method, r.reference.note()))
                out.append(f"- {r.method} {r.reference.top1:.2f}: {r.reference.note()}")
        out.append("")
    out += [*table.verdicts(), ""]
    return "\n".join(out)


def plot(table: Table, path: Path) -> Path:
    """One panel per column: each method's mean with its 95% interval, every seed as a dot and
    the published figure as a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(table.columns), figsize=(1.2 + 1.3 * len(table.rows) / max(1, len(table.columns))
                                                              * len(table.columns), 3.6), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, label in zip(axes[0], table.columns):
        rows = table.column(label)
        for x, r in enumerate(rows):
            low, high = r.interval
            if r.values:
                ax.scatter(x + rng.uniform(-0.12, 0.12, r.n), r.values, s=12, color="0.55", zorder=2)
                err: Any = [[r.mean - low], [high - r.mean]] if math.isfinite(low) else None
                ax.errorbar([x], [r.mean], yerr=err, fmt="o", color="C0", capsize=4, zorder=3)
            if r.reference:
                ax.scatter([x], [r.reference.top1], marker="*", s=90, color="C3", zorder=4)
        ax.set_xticks(range(len(rows)), [r.method for r in rows], rotation=30)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("test accuracy (%), last epoch")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
