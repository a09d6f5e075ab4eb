"""``python -m analysis.flatness --run RUN_ID``: flatness evidence for one trained run.

It rebuilds the run's method from its logged knobs, loads the final checkpoint the run's
``checkpoint_dir`` tag names, measures every analysis network (``kd_platform.run.flatness``),
interpolates between the first two students (and, for OKDPH, through the mean HWM), draws
the loss surface around each network, and logs everything to that same MLflow run. Bad
input (a store, a run id, a missing tag or checkpoint, a network name) is found before
anything is computed or written.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from kd_platform.analysis.load import live_run, open_client
from kd_platform.console import OneLineParser, run_command
from kd_platform.errors import UsageError
from kd_platform.run.checkpoint import CHECKPOINT_TAG, STATE_FILE, load_checked

ARTIFACT_DIR = "flatness"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise UsageError(f"expected a positive integer, got '{text}'")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"expected a number >= 0, got '{text}'") from None
    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"expected a finite number >= 0, got '{text}'")
    return value


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m analysis.flatness",
                      description="Hessian trace, top eigenvalue, epsilon-sharpness, interpolation and loss "
                                  "surfaces of a trained run's networks, logged to that MLflow run.")
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the MLflow run (a platform.train run or a trial)")
    p.add_argument("--networks", help="comma-separated networks (default: every analysis network of the method)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    p.add_argument("--samples", type=_positive_int, help="training-subset size (default: the run's flatness_samples)")
    p.add_argument("--probes", type=_positive_int, help="Hutchinson probes (default: the run's flatness_probes)")
    p.add_argument("--rho", type=_non_negative_float, help="sharpness radius relative to the parameter norm "
                                                           "(default: the run's flatness_rho)")
    p.add_argument("--iters", type=_positive_int, default=20, help="power iterations (default 20)")
    p.add_argument("--grid", type=_positive_int, default=9, help="loss-surface grid side (default 9)")
    p.add_argument("--points", type=_positive_int, default=11,
                   help="evaluations per interpolation segment, ends included (default 11)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    return p


def _state_file(run: Any, scratch: Path) -> Path:
    """The run's checkpoint file, fetched into ``scratch`` when it lives on a remote filesystem."""
    location = run.data.tags.get(CHECKPOINT_TAG)
    if not location:
        raise UsageError(f"MLflow run '{run.info.run_id}' has no '{CHECKPOINT_TAG}' tag: it records no checkpoint")
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" in location:
        from ray.train import Checkpoint  # only for checkpoints on remote storage
        try:
            Checkpoint(location).to_directory(str(scratch))
        except Exception as exc:  # noqa: BLE001 - any failure to fetch is the same bad input
            raise UsageError(f"cannot fetch checkpoint '{location}' of run '{run.info.run_id}' "
                             f"({type(exc).__name__})") from None
        location = str(scratch)
    path = Path(location) / STATE_FILE
    if not path.is_file():
        raise UsageError(f"checkpoint '{path}' of run '{run.info.run_id}' does not exist")
    return path


def _spec(run: Any, fused: bool) -> Any:
    from kd_platform.run.engine import RunSpec
    params = dict(run.data.params)
    method = run.data.tags.get("method")
    if not method:
        raise UsageError(f"MLflow run '{run.info.run_id}' has no 'method' tag")
    seed = int(params.pop("seed", run.data.tags.get("seed", 0)))
    spec = RunSpec.from_flat(method, params, seed)
    return replace(spec, recipe={**spec.recipe, "fused": "true" if fused else "false"})


def _device(name: str) -> Any:
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}': no CUDA device here")
    return device


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    from mlflow.exceptions import MlflowException
    uri, c = open_client(args.tracking_uri)
    try:
        run = live_run(c, args.run)
    except MlflowException as exc:
        raise UsageError(f"MLflow store '{uri}': {exc.message}") from None
    device = _device(args.device)
    with tempfile.TemporaryDirectory(prefix="flatness-") as scratch:
        state = load_checked(_state_file(run, Path(scratch) / "checkpoint"))
        spec = _spec(run, bool((state.get("layout") or {}).get("fused", False)))
        return _measure(c, run, spec, state, args, device, Path(scratch))


def _measure(c: Any, run: Any, spec: Any, state: dict, args: argparse.Namespace, device: Any, scratch: Path) -> int:
    from kd_platform.data import build_data
    from kd_platform.models import build_model
    from kd_platform.run import flatness
    from kd_platform.run.engine import build_method, data_recipe
    recipe, _ = spec.resolved()
    data = build_data(data_recipe(spec), spec.seed, device)

    def untrained_teacher(arch: str) -> Any:  # its trained weights come with the checkpoint
        from kd_platform.methods.base import freeze
        return freeze(build_model(arch, data.num_classes, data.in_channels).to(device))
    method = build_method(spec, data, device, untrained_teacher)
    method.load_state_dict(state["method"])
    method.eval()
    nets = method.analysis_networks()
    if not nets:
        raise UsageError(f"method '{spec.method}' names no plain networks to analyse")
    if args.networks:
        wanted = [n.strip() for n in args.networks.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in nets]
        if unknown or not wanted:
            raise UsageError(f"--networks: unknown network '{unknown[0] if unknown else args.networks}' of "
                             f"method '{spec.method}'; known: {', '.join(nets)}")
        chosen = {n: nets[n] for n in wanted}
    else:
        chosen = nets
    samples = args.samples or recipe.flatness_samples
    probes = args.probes or recipe.flatness_probes
    rho = recipe.flatness_rho if args.rho is None else args.rho
    batches = flatness.train_subset(data, samples, spec.seed)
    copies = {name: _private(net) for name, net in chosen.items()}

    measures = flatness.measure_networks(copies, batches, probes, rho, spec.seed, args.iters)
    metrics = flatness.metric_names(measures)
    curves = _curves(flatness, method, nets, batches, args.points)
    for curve in curves:
        metrics[f"flat/barrier/{curve.name}"] = curve.barrier
    out = scratch / ARTIFACT_DIR
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if curves:
        files.append(flatness.plot_interpolation(curves, out / "interpolation.png"))
    surfaces = {}
    for name, net in copies.items():
        surf = flatness.surface(net, batches, args.grid, seed=spec.seed)
        surfaces[name] = surf
        files.append(flatness.plot_surface(surf, name, out / f"surface_{name}.png"))
    (out / "flatness.json").write_text(json.dumps({
        "measures": measures,
        "interpolation": {cv.name: {"t": cv.t, "loss": cv.loss, "accuracy": cv.accuracy} for cv in curves},
        "surfaces": {n: {"alphas": s.alphas, "betas": s.betas, "loss": s.loss} for n, s in surfaces.items()}},
        indent=1))
    files.append(out / "flatness.json")

    from kd_platform import tracking
    run_id = run.info.run_id
    step = int(state.get("epoch", 0))
    tracking.log_metrics(c, run_id, metrics, step=step)
    tracking.set_tags(c, run_id, {"flatness.samples": sum(len(y) for _, y in batches),
                                  "flatness.seed": spec.seed, "flatness.probes": probes, "flatness.rho": rho,
                                  "flatness.networks": ",".join(chosen), "flatness.epoch": step})
    for f in files:
        c.log_artifact(run_id, str(f), artifact_path=ARTIFACT_DIR)
    for name, values in measures.items():
        print(f"{name:>10}: loss {values['loss']:.4f}  acc {values['accuracy']:.2f}%  "
              f"trace {values['hessian_trace']:.4g} (+/- {values['hessian_trace_se']:.2g})  "
              f"top eig {values['top_eig']:.4g}  sharpness {values['sharpness']:.4g}")
    for curve in curves:
        print(f"barrier {curve.name}: {curve.barrier:.4f}")
    print(f"Logged {len(metrics)} metrics and {len(files)} files under '{ARTIFACT_DIR}/' to MLflow run {run_id}.")
    return 0


def _private(net: Any) -> Any:
    import copy
    return copy.deepcopy(net).float()


def _curves(flatness: Any, method: Any, nets: dict, batches: list, points: int) -> list:
    """student1 -> student2 and, when the method has a hybrid (OKDPH's mean HWM), through it."""
    students = [s for s in method.students if s in nets]
    if len(students) < 2:
        return []
    a, b = students[:2]
    curves = [flatness.interpolate([nets[a], nets[b]], [a, b], batches, points)]
    if "hwm" in nets:
        curves.append(flatness.interpolate([nets[a], nets["hwm"], nets[b]], [a, "hwm", b], batches, points))
    return curves


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)
