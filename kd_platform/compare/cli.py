"""``python -m platform.compare METHOD [METHOD ...]``: a paper's results table, with seeds,
intervals and the published figures beside it. ``--report RUN_ID`` rebuilds the table of a
finished comparison from MLflow. Everything is validated before anything is started or written.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from kd_platform import cli
from kd_platform.compare.plan import (
    DEFAULT_PRESET,
    PRIMARY,
    Cell,
    Column,
    cell_key,
    cell_knobs,
    check_methods,
    check_sets,
    parse_pairs,
    plan_columns,
    seeds_of,
)
from kd_platform.console import OneLineParser, run_command
from kd_platform.errors import UsageError

DEFAULT_SEEDS = 5
EXPERIMENT = "compare"


def parser() -> OneLineParser:
    p = OneLineParser(prog="python -m platform.compare",
                      description="Train every method at its preset knobs on every pair, over several seeds, and "
                                  "print the table a paper needs: mean, std and 95%% interval per method, the "
                                  "published figure beside it, Welch tests against a baseline (Holm-corrected).")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = cli._catalogue()
    p.add_argument("methods", nargs="*", metavar="METHOD", help="methods to compare (listed below)")
    p.add_argument("--preset", help=f"the recipe every method trains with (default: {DEFAULT_PRESET}, or the "
                                    f"preset of each --pairs entry)")
    p.add_argument("--pairs", metavar="T:S,T2:S2",
                   help="teacher:student pairs, one column each (offline and single-network methods only)")
    p.add_argument("--seeds", type=cli._positive_int, help=f"seeds per cell (default {DEFAULT_SEEDS})")
    p.add_argument("--seed", type=cli._nonnegative_int, default=0, help="the first seed (default 0)")
    p.add_argument("--baseline", help="the method the others are tested against (default: ce if listed, else "
                                      "the first method)")
    p.add_argument("--tuned", nargs="?", const="newest", metavar="SWEEP_RUN_ID,...",
                   help="train at the confirmed best knobs of each method's newest finished sweep, or of these "
                        "sweeps' parent runs (methods without one keep their preset knobs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a knob for every method that has it (repeatable)")
    p.add_argument("--epochs", type=cli._positive_int, help="epochs per run (default: the preset's)")
    cli.add_run_flags(p, EXPERIMENT)
    p.add_argument("--max-concurrent", type=cli._positive_int,
                   help="runs at once (default: as many as the Ray cluster's CPUs and GPUs fit)")
    p.add_argument("--name", help="comparison name (default compare-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="DIR",
                   help="finish an interrupted comparison (default: the newest one in --out)")
    p.add_argument("--report", metavar="RUN_ID",
                   help="rebuild the table of a finished comparison from its MLflow parent run (nothing trains)")
    p.add_argument("--register", action="store_true",
                   help="register, per pair, the best network of the first-ranked method in MLflow's model "
                        "registry (a comparison registers nothing without it)")
    p.add_argument("--quiet", action="store_true", help="print the table only")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray Tune's live tables and the workers' logs")
    return p


def _baseline(args: argparse.Namespace, methods: list[str]) -> str:
    if args.baseline is None:
        return "ce" if "ce" in methods else methods[0]
    if args.baseline not in methods:
        raise UsageError(f"--baseline '{args.baseline}' is not among the methods compared ({', '.join(methods)})")
    return str(args.baseline)


def _tuned(args: argparse.Namespace, uri: str, methods: list[str]) -> dict[str, tuple[dict[str, str], str]]:
    """Per method, the confirmed best knobs of a finished sweep and its parent run id."""
    if args.tuned is None:
        return {}
    from kd_platform import tracking
    c = tracking.client(uri)
    found: dict[str, tuple[dict[str, str], str]] = {}
    if args.tuned == "newest":
        experiments = [e.experiment_id for e in c.search_experiments()]
        for m in methods:
            runs = c.search_runs(experiments, filter_string=f"tags.kind = 'sweep' and tags.method = '{m}' and "
                                                            f"attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"], max_results=20) if experiments else []
            best = next((r for r in runs if any(k.startswith("best.") for k in r.data.tags)), None)
            if best is None:
                raise UsageError(f"--tuned: no finished sweep of '{m}' in {uri} to take knobs from; sweep it "
                                 f"first, or name the sweeps to use (--tuned RUN_ID,...)")
            found[m] = (_best_tags(best), best.info.run_id)
        return found
    for run_id in [i.strip() for i in args.tuned.split(",") if i.strip()]:
        try:
            run = c.get_run(run_id)
        except Exception:  # MLflow raises its own exception types for unknown ids
            raise UsageError(f"--tuned: no MLflow run '{run_id}' in {uri}") from None
        method = run.data.tags.get("method", "")
        if run.data.tags.get("kind") != "sweep" or not _best_tags(run):
            raise UsageError(f"--tuned: run '{run_id}' is not a finished sweep (no best.* tags)")
        if method not in methods:
            raise UsageError(f"--tuned: run '{run_id}' is a sweep of '{method}', which is not compared here")
        if method in found:
            raise UsageError(f"--tuned: two sweeps given for '{method}'")
        found[method] = (_best_tags(run), run_id)
    if not found:
        raise UsageError("--tuned: no sweep run id given")
    return found


def _best_tags(run: Any) -> dict[str, str]:
    return {k[len("best."):]: v for k, v in run.data.tags.items() if k.startswith("best.")}


def _protocol(columns: list[Column], cells: list[Cell], seeds: list[int], baseline: str,
              sets: dict[str, Any]) -> list[str]:
    lines = []
    for col in columns:
        fixed = next(c.fixed for c in cells if c.column == col.label)
        vf = float(fixed.get("val_fraction", 0.1))
        chosen = (f"a held-out {vf:g} of the training set" if vf > 0 else
                  "the TEST set itself (val_fraction=0), so that figure is optimistic")
        lines.append(f"{col.label}: dataset {col.dataset}, preset {col.preset}, {fixed.get('epochs')} epochs, "
                     f"val_fraction {vf:g}; the best-val epoch is chosen on {chosen}")
    lines.append(f"Primary figure: {PRIMARY}, the students' mean test accuracy at the last epoch (no early "
                 f"stopping, no checkpoint picked); also the test accuracy at the epoch of the best validation "
                 f"accuracy, labelled 'best-val epoch'")
    lines.append(f"Seeds {', '.join(map(str, seeds))}: one run per method, column and seed; an offline pair's "
                 f"teacher is trained once per seed and shared by its methods")
    tuned = [f"{c.method} from {c.knobs_from}" for c in cells if c.knobs_from != "preset"]
    lines.append("Knobs: each method's preset knobs (with the preset's per-method exceptions)"
                 + (f"; tuned: {', '.join(sorted(set(tuned)))}" if tuned else "")
                 + (f"; --set {', '.join(f'{k}={v}' for k, v in sets.items())}" if sets else ""))
    lines.append(f"Statistics: Student-t 95% interval of the seeds' mean; Welch's t-test against {baseline}, "
                 f"Holm-corrected within each column (alpha 0.05); a rank is shared by methods that no "
                 f"Holm-corrected pairwise Welch test separates")
    return lines


def settings(argv: Sequence[str] | None) -> Any:
    """Parse and validate a comparison command line; touches nothing on disk."""
    from kd_platform.compare.runner import CompareSettings
    from kd_platform.sweep.disk import check_tune_state
    args = parser().parse_args(argv)
    cli._check_common(args)
    args.experiment = args.experiment or EXPERIMENT
    verbose = cli._verbosity(args)
    if args.report:
        return args
    if args.resume:
        given = [f for f, v in (("METHOD", args.methods), ("--preset", args.preset), ("--pairs", args.pairs),
                                ("--seeds", args.seeds), ("--set", args.set), ("--epochs", args.epochs),
                                ("--tuned", args.tuned), ("--baseline", args.baseline), ("--name", args.name),
                                ("--register", args.register))
                 if v]
        if given:
            raise UsageError(f"--resume continues a comparison as it was started; drop {given[0]}")
        path = _latest(args.out) if args.resume == "latest" else Path(args.resume)
        s = CompareSettings.from_dir(path.resolve())
        check_tune_state(s.experiment_path)
        s.verbose, s.log_models = verbose, args.log_models or s.log_models
        if args.no_system_metrics:
            from dataclasses import replace
            s.launch = replace(s.launch, system_metrics=False)
        return s
    if not args.methods:
        raise UsageError("name the methods to compare (e.g. okdph dml ce), or --resume, or --report RUN_ID")
    if args.register and args.log_models not in (None, "completed"):
        raise UsageError(f"--register needs the runs' models: it conflicts with --log-models {args.log_models}")
    methods = check_methods(args.methods)
    baseline = _baseline(args, methods)
    if args.name is not None:
        cli._check_name(args.name)
    sets = cli._parse_sets(args.set)
    check_sets(methods, sets)
    pairs = parse_pairs(args.pairs)
    if args.teacher_checkpoint and len(pairs) > 1:
        raise UsageError("--teacher-checkpoint is one teacher: compare one pair with it")
    columns = plan_columns(methods, args.preset, pairs, sets)
    seeds = seeds_of(args.seed, args.seeds or DEFAULT_SEEDS)
    uri = cli._checked_uri(args)
    tuned = _tuned(args, uri, methods)
    cells = []
    for col in columns:
        for m in methods:
            knobs, run_id = tuned.get(m, ({}, ""))
            fixed = cell_knobs(m, col, sets, args.epochs, knobs)
            if "data_dir" in fixed:  # Ray's workers run elsewhere: a relative path would point nowhere
                fixed["data_dir"] = str(Path(fixed["data_dir"]).expanduser().resolve())
            ns = argparse.Namespace(**{**vars(args), "method": m})
            assets = cli._teacher_assets(ns, fixed)
            cell = Cell(cell_key(m, col.label), m, col.label, fixed, assets,
                        f"sweep {run_id}" if run_id else "preset")
            for seed in seeds:
                cell.spec(seed)  # every knob checked for every seed before anything runs
            cells.append(cell)
    for col in columns:
        first = next(c for c in cells if c.column == col.label)
        cli._check_data(first.method, first.fixed, seeds[0])
    launch = cli._launch(args)
    name = args.name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    if (args.out / name).exists():
        raise UsageError(f"comparison directory '{args.out / name}' already exists (use --resume or another --name)")
    return CompareSettings(methods, columns, cells, seeds, baseline, uri, args.experiment, args.out.resolve(), name,
                           launch, args.address, args.max_concurrent, _protocol(columns, cells, seeds, baseline, sets),
                           verbose=verbose, log_models=args.log_models or "completed", register=args.register)


def _latest(out: Path) -> Path:
    from kd_platform.compare.runner import STATE_FILE
    return cli.latest_interrupted(out, STATE_FILE, lambda state: True, "comparison")


def _main(argv: Sequence[str] | None) -> int:
    from kd_platform.compare.runner import print_table, run_compare
    from kd_platform.sweep.tuner import SweepInterrupted
    s = settings(argv)
    if isinstance(s, argparse.Namespace):
        return _rebuild(s)
    if s.finished:
        from kd_platform.tracking import ui_url
        url = ui_url(s.tracking_uri, s.experiment_id or "", s.parent_run_id) or f"MLflow run {s.parent_run_id}"
        print(f"Comparison {s.name} is finished; nothing to resume. Its parent run: {url}")
        return 0
    try:
        outcome = run_compare(s)
    except SweepInterrupted:
        print(f"\nComparison {s.name} interrupted; its state is saved. Resume it with:\n"
              f"  python -m platform.compare --resume {s.run_dir}", flush=True)
        return 130
    print()
    print(f"Comparison {s.name}: {s.trials} runs ({outcome.failed} failed) in {outcome.wall_s:.0f}s")
    print_table(outcome.table, s.protocol)
    for line in outcome.registered:
        print(line)
    print(f"Report: {outcome.report} (also under 'comparison/' of the parent run; rebuilt by "
          f"python -m platform.compare --report {outcome.parent_run_id} --tracking-uri {s.tracking_uri})")
    print("Open the MLflow UI on it:")
    cli._print_ui(s.tracking_uri, outcome.experiment_id, outcome.parent_run_id, "comparison")
    return 0 if outcome.failed == 0 else 1


def _rebuild(args: argparse.Namespace) -> int:
    """``--report RUN_ID``: the table again, from the parent run's params and its child runs."""
    from kd_platform.compare.runner import KIND, REPORT_DIR, print_table, table_of_runs, write_report
    uri = cli._checked_uri(args)
    from kd_platform import tracking
    c = tracking.client(uri)
    try:
        parent = c.get_run(args.report)
    except Exception:  # MLflow raises its own exception types for unknown ids
        raise UsageError(f"--report: no MLflow run '{args.report}' in {uri}") from None
    if parent.data.tags.get("kind") != KIND:
        raise UsageError(f"--report: run '{args.report}' is not a comparison (kind={parent.data.tags.get('kind')})")
    params = parent.data.params
    columns = [Column(**json.loads(params[k])) for k in sorted(params, key=_numbered) if k.startswith("column.")]
    protocol = [params[k] for k in sorted(params, key=_numbered) if k.startswith("protocol.")]
    table = table_of_runs(c, parent.info.experiment_id, parent.info.run_id, columns, params["methods"].split(","),
                          params["baseline"])
    name = parent.info.run_name or parent.info.run_id
    path = write_report(table, protocol, args.out / name / REPORT_DIR, name)
    print_table(table, protocol)
    print(f"Report: {path}")
    return 0


def _numbered(key: str) -> tuple[str, int]:
    head, _, tail = key.rpartition(".")
    return head, int(tail) if tail.isdigit() else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)

