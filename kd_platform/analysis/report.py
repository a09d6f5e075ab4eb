"""The report of one sweep: tables (CSV), plots (PNG) and ``report.md`` linking them, written
into one folder and logged as artifacts (under ``report/``) of the sweep's parent run."""
from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kd_platform import stats
from kd_platform.analysis import markdown as md
from kd_platform.analysis import plots
from kd_platform.analysis.importance import fanova_importance
from kd_platform.analysis.load import Sweep, history
from kd_platform.analysis.noise import (
    Noise,
    collapsed_column,
    effects_sentence,
    effects_vs_noise,
    mark_collapsed,
    seed_noise,
)
from kd_platform.analysis.tables import (
    Usable,
    ablation_defaults,
    ablation_table,
    best_trials,
    extra_metric_columns,
    grid_table,
    is_categorical,
    marginal_effect,
    significant,
    usable_runs,
)
from kd_platform.errors import UsageError

ARTIFACT_DIR = "report"
REPORT_FILE = "report.md"
TOP = 5
NOT_NETWORKS = ("best_network",)  # summaries logged under val/acc/ that are not one network


@dataclass
class Report:
    folder: Path
    files: list[Path] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame, bool]] = field(default_factory=list)  # title, frame, show index
    lines: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.folder / REPORT_FILE

    def text(self, *paragraphs: str) -> None:
        for p in paragraphs:
            self.lines += [p, ""]

    def table(self, title: str, frame: pd.DataFrame, csv: str, shown: pd.DataFrame | None = None,
              index: bool = False) -> None:
        """``frame`` saved as CSV; ``shown`` (default ``frame``) in the report and on the terminal."""
        path = self.folder / csv
        frame.to_csv(path, index=index)
        self.files.append(path)
        shown = frame if shown is None else shown
        self.tables.append((title, shown, index))
        self.text(md.table(shown, index=index), f"CSV: [{csv}]({csv})")

    def image(self, alt: str, path: Path) -> None:
        self.files.append(path)
        self.text(f"![{alt}]({path.name})")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def analyse(c: Any, sweep: Sweep, folder: Path, log_artifacts: bool = True,
            extra_metrics: Sequence[str] | None = None) -> Report:
    """Write the report of ``sweep`` into ``folder`` and, unless told not to, log it to the parent run.

    An ablation gets a set of tables per metric: ``sweep.metric`` first, then each of
    ``extra_metrics`` that some completed run logged (``None``: every flatness ``flat/...``
    and calibration ``val/ece/...``, ``val/nll/...`` metric the runs have)."""
    folder.mkdir(parents=True, exist_ok=True)
    rep = Report(folder)
    usable = usable_runs(sweep)
    _header(rep, sweep, usable)
    if usable.runs.empty:
        rep.text("No completed run logged the metric, so there is nothing to tabulate or plot.")
    elif sweep.is_ablation:
        _ablation(rep, sweep, usable.runs, extra_metrics)
    else:
        confirm = _stage(usable.runs) == "confirm"
        _tpe(rep, sweep, usable.runs[~confirm], usable.runs[confirm])
    if not usable.runs.empty:
        ranked = usable.runs.sort_values(sweep.metric, ascending=sweep.mode == "min")
        _learning_curves(rep, c, sweep, ranked.head(TOP))
        _networks(rep, c, sweep, ranked.iloc[0])
    if sweep.notes:
        rep.text("## Notes", "\n".join(f"- {n}" for n in sweep.notes))
    rep.path.write_text("\n".join(rep.lines).rstrip() + "\n")
    rep.files.append(rep.path)
    if log_artifacts:
        for path in rep.files:
            c.log_artifact(sweep.run_id, str(path), ARTIFACT_DIR)
    return rep


def _stage(runs: pd.DataFrame) -> pd.Series:
    """Which stage of a TPE sweep each run belongs to (``search`` or ``confirm``)."""
    return runs["tag.stage"].fillna("search") if "tag.stage" in runs.columns else pd.Series("search", runs.index)


def _header(rep: Report, sweep: Sweep, usable: Usable) -> None:
    runs = sweep.runs
    outcomes = runs["trial_outcome"].value_counts()
    counts = ", ".join(f"{n} {k}" for k, n in outcomes.items())
    kind = "ablation" if sweep.is_ablation else "TPE sweep"
    rep.text(f"# Sweep analysis: {sweep.name}",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow experiment `{sweep.experiment_name}` "
             f"(id {sweep.experiment_id}), parent run `{sweep.run_id}` (status {sweep.parent.info.status}).")
    facts = pd.DataFrame([
        ("method", sweep.method or "?"), ("kind", kind),
        ("metric", f"`{sweep.metric}` ({'higher' if sweep.mode == 'max' else 'lower'} is better)"),
        ("child runs", f"{len(runs)} ({counts})"),
        ("in the tables", f"{len(usable.runs)} completed runs at their final epoch"),
    ], columns=["", "value"])
    rep.text(md.table(facts))
    if usable.excluded_total:
        why = ", ".join(f"{n} {k}" for k, n in usable.excluded.items())
        rep.text(f"{usable.excluded_total} run(s) were excluded from the tables ({why}): a run stopped by ASHA "
                 f"or failed ends before the final epoch, so its last value is not comparable.")
    if sweep.parent.info.status != "FINISHED":
        sweep.notes.append(f"The parent run is {sweep.parent.info.status}: the sweep may still be running or "
                           f"was interrupted; this report covers the runs logged so far.")


STATS_TEXT = (
    "Each cell holds, over its seeds, the mean with a {conf:.0%} percentile bootstrap interval "
    "({resamples:,} resamples, seeded, so the same runs give the same intervals), and against the "
    "default value (the row marked `yes`) the difference of means with its own bootstrap interval "
    "(both cells resampled independently), the two-sided Welch t-test p-value and `p_holm`, that "
    "p-value Holm-corrected across the table's non-default cells. A difference is significant "
    "when `p_holm` ≤ {alpha:g}: then the chance that any difference the table calls significant "
    "is a fluke stays below {alpha:g}. A cell (or a default) with fewer than {min_seeds} seeds gets "
    "no interval and no p-value: too few seeds for a conclusion. With few seeds a bootstrap interval "
    "is also too narrow (it never reaches beyond the values observed), so judge a difference by "
    "`p_holm` rather than by whether the intervals overlap.")


def _ablation(rep: Report, sweep: Sweep, runs: pd.DataFrame, extra_metrics: Sequence[str] | None = None) -> None:
    missing = [k for k in sweep.ablate if k not in runs.columns]
    if missing:
        sweep.notes.append(f"Ablated knob(s) {', '.join(missing)} are not params of the child runs; skipped.")
    defaults, notes = ablation_defaults(sweep, runs)
    sweep.notes.extend(notes)
    knobs = [k for k in sweep.ablate if k in runs.columns and k in defaults]
    rep.text("## Ablation tables",
             f"Ablated knobs: {', '.join(f'`{k}`' for k in sweep.ablate)}. A knob's table compares its values "
             f"with the other ablated knobs held at their defaults (or, for a knob whose default is not among "
             f"its ablated values, averaged over them). Runs of one value that share a seed are averaged "
             f"first, so every statistic is over seeds. `diff_vs_default` is the value's mean minus the "
             f"default's mean.",
             STATS_TEXT.format(conf=stats.CONFIDENCE, resamples=stats.N_RESAMPLES, alpha=stats.ALPHA,
                               min_seeds=stats.MIN_SEEDS))
    rep.text(seed_noise(runs, knobs, sweep.metric, "ablation runs").sentence(sweep.metric))
    spreads = _metric_tables(rep, sweep, runs, knobs, defaults, sweep.metric)
    if len(knobs) > 1:
        grid = grid_table(runs, knobs, sweep.metric, sweep.mode, defaults)
        shown = grid[knobs].assign(
            default=["yes" if d else "" for d in grid["default"]], runs=grid["n_runs"], seeds=grid["n_seeds"],
            **_shown_stats(grid, sweep.metric))
        rep.text("## Grid cells", "Every combination of the ablated knobs' values that was run, best first, "
                                  "with the statistics of the tables above; the reference is the cell with "
                                  "every ablated knob at its default, and the Holm correction runs over all "
                                  "other cells. Interactions between knobs show here.")
        rep.table("Grid cells (best first)", grid, "ablation_grid.csv", shown)
        rep.text(_verdict(grid, knobs, sweep.metric))
    if spreads:
        rep.text("## Effect sizes",
                 "How far apart each knob's value means lie (largest minus smallest mean in its table): "
                 "a simple measure of how much the knob matters around the default configuration.")
        rep.image("effect size per knob", plots.importance_plot(
            pd.Series(spreads, dtype="float64"), "Spread of the value means per ablated knob",
            f"max − min of mean {sweep.metric}", rep.folder / "effects.png"))
    extras, absent = extra_metric_columns(runs, extra_metrics, sweep.metric)
    if absent:
        sweep.notes.append(f"No completed run logged the extra metric(s) {', '.join(f'`{m}`' for m in absent)}; "
                           f"they have no tables.")
    for metric in extras:
        rep.text(f"## Ablation tables of `{metric}`",
                 f"The same tables for `{metric}`, over the completed runs that logged it; each value is the "
                 f"run's last logged one.")
        _metric_tables(rep, sweep, runs, knobs, defaults, metric)


def _metric_tables(rep: Report, sweep: Sweep, runs: pd.DataFrame, knobs: list[str], defaults: dict[str, Any],
                   metric: str) -> dict[str, float]:
    """One table, verdict and plot per ablated knob for ``metric``; returns each knob's spread of means."""
    primary = metric == sweep.metric
    suffix = "" if primary else f"__{safe_name(metric)}"
    spreads = {}
    for knob in knobs:
        ab = ablation_table(runs, knob, defaults, metric)
        table = ab.table
        if table.empty:
            sweep.notes.append(f"No completed run with `{metric}` is left for `{knob}` with the other knobs at "
                               f"their defaults.")
            continue
        heading = f"### `{knob}` (default `{defaults[knob]}`)" + ("" if primary else f": `{metric}`")
        rep.text(heading, _held_text(ab.held, ab.free, defaults))
        if not table["default"].any():
            rep.text(f"The default `{defaults[knob]}` is not among the values of `{knob}` that were run, "
                     f"so there are no differences to it.")
        shown = pd.DataFrame({knob: table[knob], "default": ["yes" if d else "" for d in table["default"]],
                              "runs": table["n_runs"], "seeds": table["n_seeds"], **_shown_stats(table, metric)})
        collapsed = collapsed_column(table, ab.runs, [knob])
        if collapsed:
            shown["collapsed"] = collapsed
        rep.table(f"Ablation of {knob} (default {defaults[knob]}): {metric}", table,
                  f"ablation_{safe_name(knob)}{suffix}.csv", shown)
        rep.text(_verdict(table, [knob], metric))
        rep.image(f"{metric} per value of {knob}",
                  plots.ablation_plot(table, ab.runs, knob, metric,
                                      rep.folder / f"ablation_{safe_name(knob)}{suffix}.png"))
        spreads[knob] = float(table["mean"].max() - table["mean"].min())
    return spreads


def _shown_stats(table: pd.DataFrame, metric: str) -> dict[str, list[str]]:
    """The statistics columns of a table as the report prints them."""
    ci = f"{stats.CONFIDENCE:.0%} CI"
    return {
        f"{metric} mean [{ci}]": [md.mean_ci(m, lo, hi) for m, lo, hi in
                                  zip(table["mean"], table["ci95_low"], table["ci95_high"])],
        "std": [md.fmt(float(v)) for v in table["std"]],
        f"diff_vs_default [{ci}]": ["0" if default else md.mean_ci(d, lo, hi, signed=True)
                                    for default, d, lo, hi in zip(table["default"], table["diff_vs_default"],
                                                                  table["diff_ci95_low"], table["diff_ci95_high"])],
        "p_vs_default": [md.p_value(p) for p in table["p_vs_default"]],
        "p_holm": [md.p_value(p) for p in table["p_holm"]],
        "conclusion": _conclusions(table),
    }


def _conclusions(table: pd.DataFrame, alpha: float = stats.ALPHA, min_seeds: int = stats.MIN_SEEDS) -> list[str]:
    base = table.loc[table["default"], "n_seeds"]
    base_seeds = int(base.iloc[0]) if len(base) else None
    out = []
    for _, row in table.iterrows():
        if row["n_seeds"] < min_seeds or (base_seeds is not None and base_seeds < min_seeds):
            out.append("too few seeds for a conclusion")
        elif row["default"] or base_seeds is None:
            out.append("")
        elif pd.isna(row["p_holm"]):
            out.append("no test (no spread over seeds)")
        elif row["p_holm"] <= alpha:
            out.append(f"{'higher' if row['diff_vs_default'] > 0 else 'lower'} than the default "
                       f"(p_holm ≤ {alpha:g})")
        else:
            out.append("no significant difference")
    return out


def _cell_name(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"`{k}={md.fmt(row[k])}`" for k in keys)


def _verdict(table: pd.DataFrame, keys: list[str], metric: str, alpha: float = stats.ALPHA,
             min_seeds: int = stats.MIN_SEEDS) -> str:
    """In words: which cells have too few seeds, and which differences survive the Holm correction."""
    parts = []
    few = table[table["n_seeds"] < min_seeds]
    base = table[table["default"]]
    if len(few) == len(table):
        parts.append(f"**Too few seeds for a conclusion**: every cell of this table has fewer than {min_seeds} "
                     f"seeds, so it gives means only, without intervals or p-values.")
    elif len(few):
        cells = "; ".join(f"{_cell_name(r, keys)} ({int(r['n_seeds'])} seed{'s' if r['n_seeds'] != 1 else ''})"
                          for _, r in few.iterrows())
        parts.append(f"**Too few seeds for a conclusion** (fewer than {min_seeds}) for {cells}: "
                     f"{'their' if len(few) > 1 else 'its'} interval and p-value are left empty.")
        if len(base) and (base["n_seeds"] < min_seeds).any():
            parts.append("That includes the default, so no difference in this table is tested.")
    tested = int(table["p_vs_default"].notna().sum())
    tests = f"{tested} test{'s' if tested != 1 else ''}"
    if tested:
        sig = significant(table, alpha)
        if len(sig):
            cells = "; ".join(
                f"{_cell_name(r, keys)}: "
                f"{md.mean_ci(r['diff_vs_default'], r['diff_ci95_low'], r['diff_ci95_high'], True)}"
                f" (p_holm = {md.p_value(r['p_holm'])})" for _, r in sig.iterrows())
            parts.append(f"Differences in `{metric}` to the default that survive the Holm correction at "
                         f"α = {alpha:g} ({tests}): {cells}.")
        else:
            parts.append(f"No difference in `{metric}` to the default survives the Holm correction at "
                         f"α = {alpha:g} ({tests}).")
    elif len(base) and len(table) > 1:
        parts.append("No difference to the default could be tested.")
    return " ".join(parts) or "No cell could be compared with the default."


def _held_text(held: dict[str, Any], free: list[str], defaults: dict[str, Any]) -> str:
    parts = []
    if held:
        parts.append("Other ablated knobs held at their defaults: "
                     + ", ".join(f"`{k}={v}`" for k, v in held.items()) + ".")
    if free:
        parts.append("Averaged over the values of " + ", ".join(
            f"`{k}` (its default `{defaults[k]}` was not run)" for k in free) + ".")
    return " ".join(parts) or "No other ablated knob."


def _tpe(rep: Report, sweep: Sweep, runs: pd.DataFrame, confirm: pd.DataFrame) -> None:
    swept = sweep.swept
    knobs = [k for k in swept if k in runs.columns] or [
        k for k in sweep.knobs if not k.startswith("asset.") and sweep.runs[k].nunique(dropna=False) > 1]
    noise = _confirmation(rep, sweep, confirm, knobs)
    rep.text("## Best search trials", f"The {TOP} completed search runs with the best final `{sweep.metric}`, "
                                      f"one seed each: a ranking of seed luck as much as of configurations "
                                      f"wherever the noise above is as large as their differences.")
    best = best_trials(runs, sweep.metric, sweep.mode, knobs, TOP)
    rep.table(f"Best {TOP} trials", mark_collapsed(best, runs), "best_trials.csv", index=True)
    imp = fanova_importance(sweep.name, sweep.sweep_dir)
    effects = effects_vs_noise(runs, swept, knobs, sweep.metric, noise, imp.values)
    rep.text("## Effects against the noise", effects_sentence(effects, noise),
             "`marginal_effect` is the largest minus the smallest mean of a knob's values or bins (tables "
             "below); `noise_threshold` is the 95% half-width of a difference of those two means under the "
             "measured seed noise; `importance` (fANOVA) is the knob's share of the variance among the search "
             "trials, seed noise included, so a large share whose effect does not exceed the noise is no finding.")
    rep.table("Knob effects against the seed noise", effects, "effects_vs_noise.csv")
    rep.text("## Marginal effects",
             "Mean of the metric per value (categorical knobs) or per quantile bin (numeric knobs) over the "
             "completed search runs. In a TPE sweep the other knobs vary at the same time, so these are marginal "
             "trends, not controlled comparisons; TPE also samples good regions more often. The plots add the "
             "runs ASHA stopped, hollow, at the value of their last epoch.")
    all_runs = sweep.runs
    stopped = all_runs[(all_runs["trial_outcome"] == "asha_stopped") & all_runs[sweep.metric].notna()]
    for knob in knobs:
        dist = swept.get(knob) or {}
        categorical = is_categorical(runs[knob], dist)
        rep.text(f"### `{knob}`")
        rep.table(f"Marginal effect of {knob}: {sweep.metric}", marginal_effect(runs, knob, sweep.metric, dist),
                  f"marginal_{safe_name(knob)}.csv")
        log_x = dist.get("type") == "loguniform" or bool(dist.get("log"))
        rep.image(f"{sweep.metric} vs {knob}", plots.knob_plot(
            runs, knob, sweep.metric, categorical, log_x, rep.folder / f"metric_vs_{safe_name(knob)}.png",
            stopped))
    _importance(rep, sweep, imp)


def _confirmation(rep: Report, sweep: Sweep, confirm: pd.DataFrame, knobs: list[str]) -> Noise:
    """The confirmation stage's table and the seed noise it measures."""
    noise = seed_noise(confirm, knobs, sweep.metric, "confirmation runs")
    rep.text("## Confirmation and seed noise")
    summary = sweep.tags.get("confirm.summary")
    if summary:
        rep.text(summary)
    rep.text(noise.sentence(sweep.metric))
    if confirm.empty:
        return noise
    rows = []
    for values, group in confirm.groupby([k for k in knobs if k in confirm.columns], dropna=False):
        vals = group[sweep.metric].astype(float).to_numpy()
        low, high = stats.t_interval(vals)
        collapsed = bool(mark_collapsed(group[["run_id"]], group).get("collapsed", pd.Series([""])).astype(bool).any())
        rows.append({**dict(zip(knobs, values if isinstance(values, tuple) else (values,))),
                     "mean": vals.mean(), "std": vals.std(ddof=1) if len(vals) > 1 else float("nan"),
                     "ci_low": low, "ci_high": high, "seeds": len(vals),
                     "collapsed": "identical students" if collapsed else ""})
    table = pd.DataFrame(rows).sort_values("mean", ascending=sweep.mode == "min")
    rep.table("Confirmed configurations (mean over fresh seeds, Student-t 95% interval)", table,
              "confirmation.csv")
    return noise


def _importance(rep: Report, sweep: Sweep, imp: Any) -> None:
    rep.text("## Knob importance")
    objective = sweep.params.get("metric")
    caveat = ""
    if objective and objective != sweep.metric:
        caveat = f" The study's objective is the sweep's metric `{objective}`, not `{sweep.metric}`."
    rep.text(imp.note + caveat)
    if imp.values is None:
        return
    frame = imp.values.rename("importance").to_frame()
    rep.table("Knob importance (fANOVA)", frame, "importance.csv", index=True)
    rep.image("knob importance", plots.importance_plot(
        imp.values, f"Knob importance (fANOVA, {imp.trials} trials)", "share of variance",
        rep.folder / "importance.png"))


def _label(row: pd.Series, metric: str, rank: int) -> str:
    return f"#{rank} {row['run_name'] or row['run_id'][:8]} ({row[metric]:.4g})"


def _learning_curves(rep: Report, c: Any, sweep: Sweep, top: pd.DataFrame) -> None:
    curves = {_label(row, sweep.metric, i + 1): history(c, row["run_id"], sweep.metric)
              for i, (_, row) in enumerate(top.iterrows())}
    curves = {k: v for k, v in curves.items() if len(v)}
    if not curves:
        return
    rep.text("## Learning curves", f"`{sweep.metric}` per epoch of the {len(curves)} best completed runs.")
    rep.image("learning curves", plots.curves_plot(curves, sweep.metric, f"Best {len(curves)} runs",
                                                    rep.folder / "learning_curves.png"))


def _networks(rep: Report, c: Any, sweep: Sweep, best: pd.Series) -> None:
    """Every evaluated network of the best run, for methods that train several networks together."""
    nets = [col.split("/", 2)[2] for col in sweep.runs.columns
            if col.startswith("val/acc/") and col.split("/", 2)[2] not in NOT_NETWORKS and pd.notna(best.get(col))]
    if not _is_online(sweep.method, nets):
        return
    curves = {net: history(c, best["run_id"], f"val/acc/{net}") for net in nets}
    frame = pd.DataFrame({"network": nets,
                          "val_acc_final": [best.get(f"val/acc/{n}") for n in nets],
                          "test_acc": [best.get(f"test/acc/{n}") for n in nets]})
    rep.text("## Networks of the best run",
             f"Validation accuracy of every network of run `{best['run_id']}` per epoch (students, their mean, "
             f"and the method's teacher-like networks such as the HWM or the ensemble); test accuracy is "
             f"measured once, after the last epoch.")
    rep.table("Networks of the best run", frame, "networks_best_run.csv")
    rep.image("per-network accuracy of the best run", plots.curves_plot(
        curves, "val/acc (%)", f"Networks of the best run ({best['run_name'] or best['run_id'][:8]})",
        rep.folder / "networks_best_run.png", highlight="students_mean"))


def _is_online(method: str | None, nets: list[str]) -> bool:
    if method:
        try:
            from kd_platform.methods import get_method
            return get_method(method).kind == "online"
        except UsageError:
            pass
    return len([n for n in nets if n != "students_mean"]) > 1  # unknown method: several networks
