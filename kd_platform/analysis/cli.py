"""``python -m analysis.ablation``: the report of one sweep, from its MLflow runs.

Everything that can be wrong with the input (store, experiment, run id, metric) is found
while loading, before the report folder exists, so bad input writes nothing.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kd_platform.analysis import markdown as md
from kd_platform.analysis.load import check_out_dir, find_parent, load_sweep, open_client
from kd_platform.console import OneLineParser, run_command
from kd_platform.errors import UsageError
from kd_platform.tracking import ui_url

REPORTS_DIR = Path("reports")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis.ablation",
                description="Tables, knob importance and plots of a sweep or ablation, from its MLflow runs; "
                            "written to a folder and logged to the sweep's parent run.")
    p.add_argument("method", nargs="?", help="analyse the newest sweep of this method's experiment")
    p.add_argument("--sweep", metavar="PARENT_RUN_ID", help="the sweep's MLflow parent run id")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    p.add_argument("--experiment", help="MLflow experiment to search (default: the method's name)")
    p.add_argument("--out", type=Path, help="report folder (default reports/<sweep name>/)")
    p.add_argument("--metric", help="metric to analyse (default: the sweep's metric, else val/acc/students_mean); "
                                    "another metric than the sweep's is lower-is-better if its name holds 'loss'")
    p.add_argument("--extra-metric", action="append", dest="extra_metrics", metavar="METRIC",
                   help="also tabulate this metric per knob, e.g. val/ece/student1 or val/diversity/kl "
                        "(repeatable; default: the flatness measures flat/hessian_trace, top_eig, sharpness and "
                        "barrier the runs logged)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    if not (args.method or args.sweep or args.experiment):
        raise UsageError("name a method (e.g. okdph), --experiment NAME or --sweep PARENT_RUN_ID")
    if args.out is not None:
        check_out_dir(args.out)
    from mlflow.exceptions import MlflowException
    uri, c = open_client(args.tracking_uri)
    try:
        parent = find_parent(c, args.method, args.experiment, args.sweep)
        sweep = load_sweep(c, parent, args.metric)
    except MlflowException as exc:
        raise UsageError(f"MLflow store '{uri}': {exc.message}") from None
    if args.method and args.sweep and sweep.method and sweep.method != args.method:
        raise UsageError(f"run '{args.sweep}' is a sweep of '{sweep.method}', not '{args.method}'")
    # Imports matplotlib: only once the input is known to be good.
    from kd_platform.analysis.report import ARTIFACT_DIR, analyse
    folder = args.out or REPORTS_DIR / sweep.name
    rep = analyse(c, sweep, folder, extra_metrics=args.extra_metrics)
    for title, frame, index in rep.tables:
        print(f"\n== {title}")
        print(md.terminal(frame, index=index))
    print(f"\nReport: {rep.path} ({len(rep.files)} files)")
    print(f"Logged to MLflow run {sweep.run_id} under '{ARTIFACT_DIR}/' (experiment {sweep.experiment_name}).")
    url = ui_url(uri, sweep.experiment_id, sweep.run_id, page=f"artifacts/{ARTIFACT_DIR}")
    if url:
        print(f"In the MLflow UI: {url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)
