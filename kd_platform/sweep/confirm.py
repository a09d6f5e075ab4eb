"""The confirmation stage of a TPE sweep.

A search ranks configurations by one seed each, and on a small validation split the
seed-to-seed spread is as large as the differences between configurations. So after the
search, the top ``K`` configurations and the all-defaults one are trained again with ``S``
fresh seeds (never the search's own), to the full budget. A configuration is then reported
as a mean with a Student-t 95% interval, and the sweep names a winner only where Welch's
test, Holm-corrected across the comparisons, separates the best from every other confirmed
configuration (the runner-up and the defaults among them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from kd_platform import stats
from kd_platform.sweep.space import SearchSpace, all_specs

DEFAULT_TOP = 2
DEFAULT_SEEDS = 3
STAGE_TAG = "stage"
DEFAULTS = "defaults"


@dataclass
class Candidate:
    label: str                  # "top1", "top2", ... or "defaults"
    knobs: dict[str, Any]       # the swept knobs' values
    search_value: float | None = None  # the search trial's own (one-seed) figure
    search_run: str | None = None
    is_defaults: bool = False   # also the all-defaults configuration

    @property
    def name(self) -> str:
        return f"{self.label} (= defaults)" if self.is_defaults and self.label != DEFAULTS else self.label


@dataclass
class ConfirmPlan:
    candidates: list[Candidate]
    seeds: list[int]

    def points(self) -> list[dict[str, Any]]:
        """One Tune trial per (configuration, seed)."""
        return [{**c.knobs, "seed": s} for c in self.candidates for s in self.seeds]

    def candidate_of(self, config: dict[str, Any]) -> Candidate | None:
        knobs = {k: v for k, v in config.items() if k != "seed"}
        return next((c for c in self.candidates if _same(c.knobs, knobs)), None)

    def to_json(self) -> dict[str, Any]:
        return {"candidates": [asdict(c) for c in self.candidates], "seeds": self.seeds}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ConfirmPlan":
        return ConfirmPlan([Candidate(**c) for c in d["candidates"]], list(d["seeds"]))


@dataclass
class SearchTrial:
    config: dict[str, Any]
    value: float
    epochs: int
    run_id: str | None


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)


def _close(x: Any, y: Any) -> bool:
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
        return math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12)
    return str(x) == str(y)


def confirm_seeds(search_seed: int, n: int) -> list[int]:
    """Fresh seeds: the search trained every configuration with ``search_seed``."""
    return [search_seed + 1 + i for i in range(n)]


def plan_confirmation(trials: Iterable[SearchTrial], space: SearchSpace, epochs: int, top: int,
                      seeds: list[int]) -> ConfirmPlan:
    """The ``top`` best distinct configurations of the search, ranked first by how far they
    trained (ASHA stops the weak ones early) and then by their metric, and the defaults."""
    sign = 1.0 if space.mode == "max" else -1.0
    ranked = sorted((t for t in trials if math.isfinite(t.value)),
                    key=lambda t: (min(t.epochs, epochs), sign * t.value), reverse=True)
    picked: list[Candidate] = []
    for t in ranked:
        knobs = {k: t.config[k] for k in space.swept if k in t.config}
        if len(picked) < top and not any(_same(c.knobs, knobs) for c in picked):
            picked.append(Candidate(f"top{len(picked) + 1}", knobs, t.value, t.run_id))
    specs = all_specs(space.method)
    defaults = {k: specs[k].default for k in space.swept}
    match = next((c for c in picked if _same(c.knobs, defaults)), None)
    if match is not None:
        match.is_defaults = True
    else:
        picked.append(Candidate(DEFAULTS, defaults, is_defaults=True))
    return ConfirmPlan(picked, seeds)


@dataclass
class Confirmed:
    candidate: Candidate
    values: list[float]
    run_ids: list[str] = field(default_factory=list)
    collapsed: bool = False  # a run's students ended identical (val/diversity/identical)
    means: dict[str, float] = field(default_factory=dict)  # every reported figure, averaged over seeds

    @property
    def mean(self) -> float:
        return float(sum(self.values) / len(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        n = len(self.values)
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (n - 1)) if n > 1 else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return stats.t_interval(self.values)


@dataclass
class Verdict:
    rows: list[Confirmed]           # best first
    p_holm: list[float]             # rows[1:] against rows[0], Holm-corrected
    seed_std: float
    alpha: float = stats.ALPHA

    @property
    def winner(self) -> Confirmed | None:
        separated = [p < self.alpha for p in self.p_holm]  # NaN (too few seeds) separates nothing
        return self.rows[0] if self.p_holm and all(separated) else None

    @property
    def tied(self) -> list[Confirmed]:
        """The best and every configuration no test separates from it."""
        return self.rows[:1] + [r for r, p in zip(self.rows[1:], self.p_holm) if not p < self.alpha]

    def headline(self, metric: str) -> str:
        noise = f"seed std {self.seed_std:.2f} points" if math.isfinite(self.seed_std) else "seed std unknown"
        if not self.rows:
            return "No confirmation run finished; nothing is confirmed."
        if len(self.rows) == 1:
            return f"Only {self.rows[0].candidate.name} was confirmed ({noise}); there is nothing to compare it with."
        win = self.winner
        if win is not None:
            others = len(self.rows) - 1
            return (f"Winner: {win.candidate.name}, better than the {others} other confirmed configuration"
                    f"{'s' if others > 1 else ''} (Welch, Holm-corrected, alpha {self.alpha:g}; {noise}).")
        names = ", ".join(r.candidate.name for r in self.tied)
        return (f"The top {len(self.tied)} configurations are indistinguishable at this budget: {noise} "
                f"({names}; Welch, Holm-corrected, alpha {self.alpha:g}).")


def judge(rows: list[Confirmed], mode: str) -> Verdict:
    rows = sorted((r for r in rows if r.values), key=lambda r: r.mean, reverse=mode == "max")
    if not rows:
        return Verdict([], [], math.nan)
    raw = [stats.welch_p(rows[0].values, r.values, min_n=2) for r in rows[1:]]
    return Verdict(rows, [float(p) for p in stats.holm(raw)], stats.pooled_std([r.values for r in rows]))


def table_lines(verdict: Verdict, swept: Iterable[str]) -> list[str]:
    """The confirmed configurations, one line each: mean, 95% interval, seeds, knobs."""
    keys = list(swept)
    width = max((len(r.candidate.name) for r in verdict.rows), default=8)
    lines = []
    for r in verdict.rows:
        low, high = r.interval
        ci = f"[{low:6.2f}, {high:6.2f}]" if math.isfinite(low) else "[   n/a,    n/a]"
        knobs = " ".join(f"{k}={_short(r.candidate.knobs.get(k))}" for k in keys)
        flag = "  COLLAPSED: identical students" if r.collapsed else ""
        lines.append(f"  {r.candidate.name:<{width}}  {r.mean:6.2f} ± {r.std if r.std == r.std else 0:4.2f}  "
                     f"95% {ci}  n={len(r.values)}  {knobs}{flag}")
    return lines


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(verdict: Verdict, metric: str, swept: Iterable[str], seeds: list[int]) -> str:
    """The confirmation as a Markdown report for the parent run's artifacts."""
    keys = list(swept)
    head = ["configuration", f"{metric} mean", "std", "95% interval", "seeds", "search (one seed)", "p (Holm)",
            *keys, "note"]
    out = [f"# Confirmation of `{metric}`", "", verdict.headline(metric), "",
           f"Each configuration trained to the full budget with seeds {', '.join(map(str, seeds))}; "
           "the search trial's own value is not one of them.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ps = [math.nan, *verdict.p_holm]
    for r, p in zip(verdict.rows, ps):
        low, high = r.interval
        sv = r.candidate.search_value
        cells = [r.candidate.name, f"{r.mean:.2f}", f"{r.std:.2f}", f"[{low:.2f}, {high:.2f}]", str(len(r.values)),
                 "" if sv is None else f"{sv:.2f}", "" if math.isnan(p) else f"{p:.3g}",
                 *(_short(r.candidate.knobs.get(k)) for k in keys), "collapsed: identical students" if r.collapsed
                 else ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
