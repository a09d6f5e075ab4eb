"""One run without Tune (``python -m platform.train``), logged to MLflow like a sweep's trial."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from . import engine, tracking
from .checkpoint import CHECKPOINT_TAG, checkpoint_location
from .evaluation import warning_tags
from .engine import RunSpec
from .teachers import record_teacher
from .trial import Launch, _device, _threads, fit_with_train

log = logging.getLogger(__name__)


def mlflow_reporter(uri: str, run_id: str, checkpoint_dir: Path | None) -> engine.Reporter:
    """Logs each epoch's metrics to ``run_id`` and keeps the latest checkpoint in ``checkpoint_dir``."""
    c = tracking.client(uri)

    def report(metrics: dict[str, float], save: Callable[[Path], None]) -> None:
        tracking.log_metrics(c, run_id, metrics, step=int(metrics["epoch"]))
        warnings = warning_tags(metrics)
        if warnings:
            tracking.set_tags(c, run_id, warnings)
        if checkpoint_dir is not None:
            save(checkpoint_dir)
        acc = metrics.get("val/acc/students_mean", float("nan"))
        log.info("epoch %d  loss %.4f  val/acc/students_mean %.2f  (%.1fs)", metrics["epoch"],
                 metrics.get("train/loss/loss", float("nan")), acc, metrics["time/epoch_s"])
    return report


def run_single(spec: RunSpec, launch: Launch, uri: str, experiment: str, out: Path,
               tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train ``spec`` once; returns the final metrics and the MLflow run id."""
    c = tracking.client(uri)
    experiment_id = tracking.ensure_experiment(uri, experiment)
    name = f"{spec.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = c.create_run(experiment_id, run_name=name, tags={
        "kind": "single", "method": spec.method, "seed": spec.seed, "git_commit": tracking.git_commit(),
        **tracking.package_versions(), **(tags or {})})
    run_id = run.info.run_id
    tracking.log_params(c, run_id, spec.all_knobs())
    try:
        tracking.log_dataset(c, run_id, tracking.describe_data(engine.data_recipe(spec), spec.seed))
        if launch.in_process():
            _threads(launch.cpus)
            checkpoint_dir = (out / name / "checkpoint").resolve()
            tracking.set_tags(c, run_id, {CHECKPOINT_TAG: str(checkpoint_dir)})
            final = engine.train(spec, mlflow_reporter(uri, run_id, checkpoint_dir),
                                 device=_device(launch.gpus))
        else:
            from dataclasses import replace
            result = fit_with_train(spec, replace(launch, storage_path=str(out)), name=name, tune_callback=False,
                                    mlflow={"uri": uri, "run_id": run_id})
            final = dict(result.metrics or {})
            location = checkpoint_location(result.checkpoint)
            if location:
                tracking.set_tags(c, run_id, {CHECKPOINT_TAG: location})
    except BaseException as exc:
        tracking.set_tags(c, run_id, {"error": f"{type(exc).__name__}: {exc}"})
        c.set_terminated(run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    record_teacher(c, run_id, spec, result=final)  # an offline run's teacher: tags and the file as an artifact
    c.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "experiment_id": experiment_id, "metrics": final}
