"""Command lines: ``python -m platform.sweep METHOD`` and ``python -m platform.train METHOD``.

Parsing and validation happen here, before anything is started or written; bad input
becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from kd_platform.console import OneLineParser, run_command
from kd_platform.errors import UsageError, error_line

if TYPE_CHECKING:
    from kd_platform.run.spec import Assets


def _int_at_least(minimum: int, kind: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {kind} integer, not {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive")
_nonnegative_int = _int_at_least(0, "non-negative")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


def _parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def _catalogue() -> str:
    """The methods with their kind, and the presets: what ``--help`` shows after the flags."""
    from kd_platform.methods import get_method, method_names
    kinds: dict[str, list[str]] = {}
    for name in method_names():
        kinds.setdefault(str(get_method(name).kind), []).append(name)
    lines = ["methods:"] + [f"  {kind:<8} {', '.join(names)}" for kind, names in sorted(kinds.items())]
    return "\n".join(lines + _preset_lines())


def _preset_lines() -> list[str]:
    from kd_platform.sweep.presets import preset_names
    return ["presets (--preset):"] + [f"  {name}" for name in preset_names()]


def _common(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _catalogue()
    p.add_argument("method", help="method name (listed below)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a knob (repeatable)")
    p.add_argument("--space", type=Path, help="search space file (default: search_spaces/METHOD.yaml)")
    p.add_argument("--preset", help="a recipe from presets/ (dataset, architectures, epochs, optimiser, "
                                    "schedule, augmentation); --set still overrides it")
    p.add_argument("--epochs", type=_positive_int, help="epochs per run (default: the space file's)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of every generator (default 0)")
    add_run_flags(p, "the method's name")


def add_run_flags(p: argparse.ArgumentParser, experiment_default: str) -> None:
    """Where runs are logged, kept and placed: the flags every command that trains shares."""
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    p.add_argument("--experiment", help=f"MLflow experiment name (default: {experiment_default})")
    p.add_argument("--out", type=Path, default=Path("kd_results"), help="results directory (default kd_results)")
    p.add_argument("--workers-per-trial", type=_positive_int, default=1,
                   help="Ray Train DDP workers per run (1 runs in-process unless --use-train)")
    p.add_argument("--cpus-per-trial", type=_non_negative_float, default=1.0, help="CPUs per worker")
    p.add_argument("--gpus-per-trial", type=_non_negative_float, default=0.0,
                   help="GPUs per worker (fractions share a GPU)")
    p.add_argument("--use-train", action="store_true", help="run even one worker through a TorchTrainer")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port; default $RAY_ADDRESS)")
    p.add_argument("--storage-path", metavar="URI_OR_DIR",
                   help="where Ray keeps checkpoints and experiment state; on a cluster, storage every node "
                        "reaches (s3://bucket/prefix or a shared mount; default: --out)")
    p.add_argument("--teacher-checkpoint", type=Path, metavar="PATH",
                   help="offline methods: your own trained teacher (a state_dict saved with torch.save) "
                        "instead of one trained and cached by the platform")
    p.add_argument("--teacher-cache", type=Path, metavar="DIR",
                   help="offline methods: where trained teachers are kept and reused (default OUT/teachers)")
    p.add_argument("--log-models", choices=LOG_MODELS, metavar="{" + ",".join(LOG_MODELS) + "}",
                   help="MLflow models of the trained networks: none; best (only the network a sweep "
                        "registers); completed (every run trained to its last epoch; the default)")
    p.add_argument("--no-system-metrics", action="store_true",
                   help="do not log CPU, memory, disk and GPU use to the runs")


LOG_MODELS = ("none", "best", "completed")  # tracking.models.LOG_MODELS, without importing MLflow for --help


def _teacher_assets(args: argparse.Namespace, fixed: dict[str, Any], swept: Sequence[str] = ()) -> "Assets":
    """The teacher cache, store and checkpoint of an offline method (absolute, since Ray's
    processes change directory); a checkpoint that cannot be the method's teacher fails here,
    before any run exists."""
    from kd_platform.methods import get_method
    from kd_platform.run.spec import Assets, RunSpec
    from kd_platform.teachers import check_teacher_checkpoint
    if get_method(args.method).kind != "offline":
        if args.teacher_checkpoint or args.teacher_cache:
            raise UsageError(f"method '{args.method}' has no teacher; drop --teacher-checkpoint/--teacher-cache")
        return Assets()
    cache = (args.teacher_cache or args.out / "teachers").resolve()
    assets = {"teacher_cache": str(cache)}
    if args.storage_path:  # storage every node reaches: teachers trained on one node are fetched by the others
        from kd_platform.teachers.store import store_uri
        store = store_uri(_storage(args))
        if store != str(cache):
            assets["teacher_store"] = store
    if args.teacher_checkpoint:
        if "teacher_arch" in swept:
            raise UsageError("--teacher-checkpoint fixes the teacher, so teacher_arch cannot be swept")
        path = args.teacher_checkpoint.resolve()
        check_teacher_checkpoint(path, RunSpec.from_flat(args.method, fixed, args.seed))
        assets["teacher_checkpoint"] = str(path)
    elif "teacher_arch" not in swept:
        from kd_platform.models.torchvision_zoo import check_published_teacher
        check_published_teacher(RunSpec.from_flat(args.method, fixed, args.seed))
    return Assets(**assets)


def _load_space(args: argparse.Namespace) -> Any:
    """The search space with the preset and then ``--set`` pinned on top: together the whole
    description of a run."""
    from kd_platform.sweep.presets import preset_for_method, preset_methods
    from kd_platform.sweep.space import load_space
    space = load_space(args.method, args.space)
    if args.preset:
        methods = preset_methods(args.preset)
        if args.method not in methods:
            raise UsageError(f"--preset {args.preset} is a recipe for {', '.join(methods)}, not '{args.method}'")
        space.fix(preset_for_method(args.preset, args.method))
        space.extra["preset"] = args.preset
    space.fix(_parse_sets(args.set))
    data_dir = space.fixed.get("data_dir")
    if data_dir:  # Ray's workers run elsewhere: a relative path would point nowhere
        space.fixed["data_dir"] = str(Path(data_dir).expanduser().resolve())
    return space


def _checked_uri(args: argparse.Namespace) -> str:
    from kd_platform.tracking import check_reachable, resolve_tracking_uri
    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    experiment = args.experiment or getattr(args, "method", None)
    if isinstance(experiment, str):  # models and reports go there: refuse a store that cannot take them
        from kd_platform.tracking.models import check_artifact_location
        check_artifact_location(uri, experiment)
    return uri


def _check_data(method: str, fixed: dict[str, Any], seed: int, tunes: bool = False) -> int:
    """Open the dataset once here, so that a missing directory or a corrupt file is a one-line
    error now rather than a failed trial later (and a download happens once, not per trial).
    Returns the training steps per epoch (what an ablation's batch-unit knobs are measured in)."""
    import torch

    from kd_platform.data import build_data
    from kd_platform.run.engine import RunSpec, data_recipe
    recipe = data_recipe(RunSpec.from_flat(method, fixed, seed))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the trial logs the dataset's warnings; an error here stays one line
    try:
        data = build_data(recipe, seed, torch.device("cpu"))
    finally:
        root.setLevel(level)
    val = getattr(data, "splits", {}).get("val")
    if tunes and val is not None and len(val) == 0:  # a sweep would tune on an empty split: every trial 0.00
        raise UsageError(f"knob 'val_fraction': {recipe.val_fraction:g} of this dataset's training images leaves "
                         f"no validation image; raise it")
    return data.steps_per_epoch()


def _epochs(args: argparse.Namespace, space: Any) -> int:
    """``--epochs``, else the preset's or ``--set``'s, else the space file's default."""
    return args.epochs or int(space.fixed.get("epochs", space.epochs))


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az", "file")


def _check_name(name: str) -> str:
    """A sweep's name is one folder under --out: no separators, no '..', a sane length."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise UsageError(f"--name {shown!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
                         f"or digit (it names one folder under --out)")
    return name


def _check_dir(path: Path, flag: str) -> None:
    """``path`` is, or can be made, a directory this user writes to; checked before anything is created."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} '{path}' is a file, not a directory")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} '{path}': '{existing}' is not writable")


def _check_common(args: argparse.Namespace) -> None:
    """Flags every command checks against what they will meet, before any run or folder exists."""
    _check_dir(args.out, "--out")
    if getattr(args, "teacher_cache", None):
        _check_dir(args.teacher_cache, "--teacher-cache")
    if args.experiment is not None and not args.experiment.strip():
        raise UsageError("--experiment must not be empty (leave it out for the method's name)")
    storage = getattr(args, "storage_path", None)
    if storage and "://" in storage:
        scheme = storage.split("://", 1)[0].lower()
        if scheme not in STORAGE_SCHEMES:
            raise UsageError(f"--storage-path {storage}: unknown storage scheme '{scheme}://'; use a directory or "
                             f"one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
    elif storage:
        _check_dir(Path(storage), "--storage-path")


def _storage(args: argparse.Namespace) -> str:
    if args.storage_path:
        return args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())
    return str(args.out.resolve())


def _launch(args: argparse.Namespace) -> Any:
    from kd_platform.launch.launcher import Launch
    if args.cpus_per_trial <= 0:
        raise UsageError("--cpus-per-trial must be positive")
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        _check_local_fit(args)
    return Launch(workers=args.workers_per_trial, cpus=args.cpus_per_trial, gpus=args.gpus_per_trial,
                  use_train=args.use_train, storage_path=_storage(args), system_metrics=not args.no_system_metrics)


def _check_local_fit(args: argparse.Namespace) -> None:
    """On the local cluster this command starts, a trial asking for more CPUs or GPUs than the
    machine has could never be scheduled and would wait forever: reject it now."""
    workers = args.workers_per_trial
    cpus = os.cpu_count() or 1
    need = args.cpus_per_trial * workers
    if need > cpus + 1e-9:
        per = f" x --workers-per-trial {workers}" if workers > 1 else ""
        raise UsageError(f"--cpus-per-trial: a trial needs {need:g} CPUs ({args.cpus_per_trial:g}{per}) but "
                         f"this machine has {cpus}; lower it or use --address to join a larger cluster")
    if args.gpus_per_trial > 0:
        import torch
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise UsageError("--gpus-per-trial > 0 but this machine has no CUDA GPU "
                             "(use --address to join a GPU cluster)")
        g = args.gpus_per_trial
        # Ray puts whole requests on one GPU: floor(1/g) fractional workers share a GPU.
        need_gpus = math.ceil(workers / math.floor(1 / g + 1e-9)) if g < 1 else g * workers
        if need_gpus > gpus + 1e-9:
            raise UsageError(f"--gpus-per-trial: a trial needs {need_gpus:g} GPUs ({g:g} x --workers-per-trial "
                             f"{workers}) "
                             f"but this machine has {gpus}; lower it or use --address to join a larger cluster")


def sweep_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m platform.sweep",
                description="Sweep a distillation method's knobs with Ray Tune (Optuna TPE + ASHA), logged to MLflow.")
    _common(p)
    p.epilog += "\n\npython -m platform.sweep --list prints every method's swept knobs and their ranges."
    p.add_argument("--samples", type=_positive_int, help="trials to run (default: the space file's)")
    p.add_argument("--max-concurrent", type=_positive_int,
                   help="trials at once (default: as many as the Ray cluster's CPUs and GPUs fit)")
    p.add_argument("--name", help="sweep name (default METHOD-YYYYmmdd-HHMMSS)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="SWEEP_DIR",
                   help="finish an interrupted sweep (default: the newest one of METHOD in --out)")
    p.add_argument("--ablate", metavar="K1,K2",
                   help="ablation: a grid over these knobs' listed values, the other knobs pinned")
    p.add_argument("--seeds", type=_positive_int, help="ablation: repeat every cell with this many seeds")
    p.add_argument("--from-sweep", metavar="RUN_ID",
                   help="ablation: pin the other knobs to the best trial of this earlier sweep's parent run")
    from kd_platform.sweep.confirm import DEFAULT_SEEDS, DEFAULT_TOP
    p.add_argument("--confirm-top", type=_nonnegative_int, metavar="K",
                   help=f"after a TPE search, train its K best configurations and the defaults again with fresh "
                        f"seeds, to the full budget (default {DEFAULT_TOP}; 0 = --no-confirm)")
    p.add_argument("--confirm-seeds", type=_positive_int, metavar="S",
                   help=f"seeds per confirmed configuration (default {DEFAULT_SEEDS})")
    p.add_argument("--no-confirm", action="store_true",
                   help="report the search's best trial (one seed) without confirming it")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the analysis report (python -m analysis.ablation writes it later)")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    p.add_argument("-v", "--verbose", action="store_true", help="Ray Tune's live tables and the workers' logs")
    return p


def _latest_sweep(out: Path, method: str) -> Path:
    """The newest interrupted TPE sweep of ``method`` in ``out`` (an ablation is resumed by its directory)."""
    from kd_platform.sweep.tuner import STATE_FILE
    return latest_interrupted(out, STATE_FILE,
                              lambda state: state.get("method") == method and not state.get("ablation"),
                              f"sweep of '{method}'")


def latest_interrupted(out: Path, state_file: str, wanted: Callable[[dict], bool], what: str) -> Path:
    """The newest directory in ``out`` whose ``state_file`` says it is unfinished and is ``wanted``;
    printed, since ``--resume`` alone did not name it."""
    import json

    def interrupted(path: Path) -> bool:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(state, dict) and not state.get("finished") and wanted(state)

    found = sorted((p.parent for p in out.glob(f"*/{state_file}") if interrupted(p)), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UsageError(f"--resume: no interrupted {what} in '{out}'")
    print(f"Resuming {found[-1]} (the newest interrupted {what} in {out})", flush=True)
    return found[-1]


def sweep_settings(argv: Sequence[str] | None) -> Any:
    """Parse and validate a sweep command line into settings; touches nothing on disk."""
    from kd_platform.sweep.tuner import SweepSettings
    args = sweep_parser().parse_args(argv)
    _check_common(args)
    if args.name is not None:
        _check_name(args.name)
    if args.resume:
        conflicting = [f for f, v in (("--confirm-top", args.confirm_top is not None),
                                      ("--confirm-seeds", args.confirm_seeds), ("--no-confirm", args.no_confirm),
                                      ("--set", args.set), ("--space", args.space), ("--samples", args.samples),
                                      ("--epochs", args.epochs), ("--name", args.name), ("--preset", args.preset),
                                      ("--teacher-checkpoint", args.teacher_checkpoint),
                                      ("--teacher-cache", args.teacher_cache)) if v]
        if conflicting:
            raise UsageError(f"--resume continues a sweep as it was started; drop {conflicting[0]}")
        path = _latest_sweep(args.out, args.method) if args.resume == "latest" else Path(args.resume)
        s = SweepSettings.from_sweep_dir(path.resolve())
        if s.method != args.method:
            raise UsageError(f"--resume: '{path}' is a sweep of '{s.method}', not '{args.method}'")
        from kd_platform.sweep.disk import check_tune_state
        for experiment in (s.experiment_path, f"{s.experiment_path}-confirm"):
            check_tune_state(experiment)
        s.verbose, s.report = _verbosity(args), not args.no_report
        s.log_models = args.log_models or s.log_models
        if args.no_system_metrics:
            from dataclasses import replace
            s.launch = replace(s.launch, system_metrics=False)
        return s
    space = _load_space(args)
    if "val_fraction" in space.swept or float(space.fixed.get("val_fraction", 0.1)) <= 0:
        raise UsageError("a sweep tunes on the validation split: keep val_fraction > 0 fixed "
                         "(val_fraction=0 is for a final 'python -m platform.train' run)")
    assets = _teacher_assets(args, space.fixed, list(space.swept))
    uri = _checked_uri(args)
    steps = _check_data(args.method, space.fixed, args.seed, tunes=True)
    epochs = _epochs(args, space)
    from kd_platform.run.spec import RunSpec
    RunSpec.from_flat(args.method, {**space.fixed, "epochs": epochs}, args.seed)  # --epochs within the knob's range
    ablation = _ablation(args, space, uri, epochs, steps)
    if ablation is None:
        from kd_platform.sweep.space import check_corners
        check_corners(space, epochs)
    samples = ablation.trials if ablation else (args.samples or space.samples)
    launch = _launch(args)
    name = args.name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (args.out / name).exists():
        raise UsageError(f"sweep directory '{args.out / name}' already exists (use --resume or another --name)")
    top, seeds = _confirmation(args)
    # No --max-concurrent: run_sweep fits as many trials as the Ray cluster's CPUs and GPUs hold.
    return SweepSettings(args.method, space, samples, epochs, args.max_concurrent, args.seed, uri,
                         args.experiment or args.method, args.out.resolve(), name, launch, address=args.address,
                         verbose=_verbosity(args), report=not args.no_report, ablation=ablation, assets=assets,
                         confirm_top=0 if ablation else top, confirm_seeds=seeds,
                         log_models=args.log_models or "completed")


def _verbosity(args: argparse.Namespace) -> int:
    if args.quiet and args.verbose:
        raise UsageError("--quiet conflicts with --verbose")
    return 0 if args.quiet else (2 if args.verbose else 1)


def _confirmation(args: argparse.Namespace) -> tuple[int, int]:
    """``(K, S)`` of the confirmation stage; ``K = 0`` turns it off."""
    from kd_platform.sweep.confirm import DEFAULT_SEEDS, DEFAULT_TOP
    given = [f for f, v in (("--confirm-top", args.confirm_top is not None),
                            ("--confirm-seeds", args.confirm_seeds)) if v]
    if args.ablate and (given or args.no_confirm):
        raise UsageError(f"{(given or ['--no-confirm'])[0]} applies to a TPE sweep; an ablation already repeats "
                         f"its cells over --seeds")
    if args.no_confirm and given:
        raise UsageError(f"--no-confirm conflicts with {given[0]}")
    top = 0 if args.no_confirm else (DEFAULT_TOP if args.confirm_top is None else args.confirm_top)
    return top, args.confirm_seeds or DEFAULT_SEEDS


def _ablation(args: argparse.Namespace, space: Any, uri: str, epochs: int, steps_per_epoch: int) -> Any:
    from kd_platform.sweep.ablate import best_of_sweep, plan_ablation
    if not args.ablate:
        for flag, value in (("--seeds", args.seeds), ("--from-sweep", args.from_sweep)):
            if value:
                raise UsageError(f"{flag} only applies to an ablation (--ablate K1,K2)")
        return None
    if args.samples:
        raise UsageError("--samples conflicts with --ablate: an ablation runs every cell of its grid")
    best = best_of_sweep(uri, args.from_sweep) if args.from_sweep else None
    return plan_ablation(space, args.ablate, args.seeds or 1, args.seed, best, args.from_sweep, epochs, steps_per_epoch)


def _sweep(argv: Sequence[str] | None) -> int:
    from kd_platform.sweep.tuner import run_sweep
    if list(sys.argv[1:] if argv is None else argv) == ["--list"]:
        print(_listing())
        return 0
    s = sweep_settings(argv)
    if s.finished:
        # Nothing is opened for writing: the store, the parent run and the directory stay as they are.
        from kd_platform.tracking import ui_url
        url = ui_url(s.tracking_uri, s.experiment_id or "", s.parent_run_id) or f"MLflow run {s.parent_run_id}"
        print(f"Sweep {s.name} is finished; nothing to resume. Its parent run: {url}")
        return 0
    from kd_platform.sweep.tuner import SweepInterrupted
    try:
        outcome = run_sweep(s)
    except SweepInterrupted:
        print(f"\nSweep {s.name} interrupted; its running trials' runs are closed as KILLED and its state is saved. "
              f"Resume it with:\n  python -m platform.sweep {s.method} --resume {s.sweep_dir}", flush=True)
        return 130
    print()
    search_s = outcome.wall_s - outcome.confirm_wall_s
    print(f"Sweep {s.name}: {outcome.trials} trials ({outcome.stopped_early} stopped early by ASHA, "
          f"{outcome.failed} failed) in {search_s:.0f}s")
    if s.ablation:
        print(f"Ablation of {', '.join(s.ablation.knobs)} over {len(s.ablation.seeds)} seed(s); tables with "
              f"python -m analysis.ablation --sweep {outcome.parent_run_id} --tracking-uri {s.tracking_uri}")
    if outcome.verdict is not None:
        _print_confirmation(s, outcome)
    elif outcome.best_metric is None:
        print("No trial finished; see the FAILED runs in MLflow for the errors.")
        return 1
    else:
        collapsed = "  COLLAPSED: identical students" if (s.search or {}).get("best_collapsed") else ""
        print(f"Best trial: {s.space.metric} = {outcome.best_metric:.2f} (one seed, unconfirmed; "
              f"MLflow run {outcome.best_run_id}){collapsed}")
        for key, value in sorted(outcome.best_config.items()):
            print(f"  {key} = {value}")
    for line in outcome.warnings:
        print(f"Warning, {line}")
    if s.report:
        _report(s, outcome)
    print("Open the MLflow UI on it:")
    _print_ui(s.tracking_uri, outcome.experiment_id, outcome.parent_run_id, "ablation" if s.ablation else "sweep")
    return 0 if outcome.best_metric is not None else 1


def _report(s: Any, outcome: Any) -> None:
    """The analysis report, logged to the parent run so that the MLflow UI shows it; its failure
    is one line and never the sweep's."""
    try:
        from kd_platform.analysis.load import load_sweep, open_client
        from kd_platform.analysis.report import ARTIFACT_DIR, analyse
        _, c = open_client(s.tracking_uri)
        sweep = load_sweep(c, c.get_run(outcome.parent_run_id), None)
        rep = analyse(c, sweep, s.sweep_dir / "report")
        print(f"Report: {rep.path} (also under '{ARTIFACT_DIR}/' of the parent run)")
    except Exception as exc:  # the sweep's results stand without it
        print(f"Report not written ({error_line(exc)}); "
              f"python -m analysis.ablation --sweep {outcome.parent_run_id} --tracking-uri {s.tracking_uri} "
              f"tries again")


def _listing() -> str:
    """``--list``: every method with its kind and its search space's swept knobs, then the presets."""
    from kd_platform.methods import get_method, method_names
    from kd_platform.sweep.space import load_space
    lines = ["methods, and the knobs their search spaces sweep (search_spaces/METHOD.yaml):"]
    for name in method_names():
        knobs = ", ".join(f"{k} {_range(d)}" for k, d in load_space(name).swept.items())
        lines.append(f"  {name:<6} {str(get_method(name).kind):<8} {knobs}")
    return "\n".join(lines + _preset_lines())


def _range(dist: dict[str, Any]) -> str:
    if dist["type"] == "choice":
        return "{" + ", ".join(map(str, dist["values"])) + "}"
    return f"[{dist['low']:g}, {dist['high']:g}]" + (" log" if dist["type"] == "loguniform" else "")


def _print_confirmation(s: Any, outcome: Any) -> None:
    from kd_platform.sweep.confirm import table_lines
    v, plan, metric = outcome.verdict, s.confirm_plan, s.space.metric
    search = s.search or {}
    if search.get("best_value") is not None:
        print(f"Search best (one seed, not a finding): {metric} = {search['best_value']:.2f}")
    print(f"Confirmation: {len(plan.candidates)} configurations x {len(plan.seeds)} fresh seeds "
          f"({', '.join(map(str, plan.seeds))}), full budget, in {outcome.confirm_wall_s:.0f}s; "
          f"{metric}, mean ± std and 95% interval:")
    for line in table_lines(v, s.space.swept):
        print(line)
    print(v.headline(metric))
    if outcome.registered:
        print(outcome.registered)


def _print_ui(uri: str, experiment_id: str, run_id: str, what: str) -> None:
    """How to open the UI on the store (a sqlite store needs ``mlflow ui``), then the URLs of the
    experiment's runs and of the run itself, both in MLflow's model-training view."""
    from kd_platform.tracking import ui_command, ui_url
    if uri.startswith("sqlite:") or not ui_url(uri, experiment_id):
        print(f"  {ui_command(uri)}")
    if ui_url(uri, experiment_id):
        print(f"  {'experiment':<11} {ui_url(uri, experiment_id)}")
        print(f"  {what + ' run':<11} {ui_url(uri, experiment_id, run_id)}")


def train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m platform.train",
                description="Train one run of a method (no sweep) and log it to MLflow.")
    _common(p)
    return p


def _train(argv: Sequence[str] | None) -> int:
    from kd_platform.launch.single import run_single
    from kd_platform.run.engine import RunSpec
    args = train_parser().parse_args(argv)
    _check_common(args)
    space = _load_space(args)
    flat = {**space.fixed, "epochs": _epochs(args, space)}
    spec = RunSpec.from_flat(args.method, flat, args.seed, _teacher_assets(args, flat))
    uri = _checked_uri(args)
    _check_data(args.method, flat, args.seed)
    launch = _launch(args)
    result = run_single(spec, launch, uri, args.experiment or args.method, args.out.resolve(),
                        tags={"preset": args.preset} if args.preset else None,
                        log_models=args.log_models or "completed")
    m = result["metrics"]
    print(f"val/acc/students_mean = {m.get('val/acc/students_mean', float('nan')):.2f}   "
          f"test/acc/students_mean = {m.get('test/acc/students_mean', float('nan')):.2f}")
    print(f"MLflow run {result['run_id']}; open the UI on it:")
    _print_ui(uri, result["experiment_id"], result["run_id"], "train")
    return 0


def sweep_main(argv: Sequence[str] | None = None) -> int:
    return run_command(_sweep, argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    return run_command(_train, argv)


def sweep_entry() -> None:
    sys.exit(sweep_main())


def train_entry() -> None:
    sys.exit(train_main())
