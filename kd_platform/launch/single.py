"""One run without Tune (``python -m platform.train``), logged to MLflow like a sweep's trial."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from kd_platform import teachers, tracking
from kd_platform.launch import faults
from kd_platform.launch.launcher import Launch, device_for, fit_with_train, set_threads, with_system_metrics
from kd_platform.run import engine
from kd_platform.run.checkpoint import CHECKPOINT_TAG, checkpoint_location
from kd_platform.run.spec import RunSpec
from kd_platform.tracking.reporting import mlflow_reporter
from kd_platform.tracking.teacher_artifacts import record_teacher

log = logging.getLogger(__name__)


def run_single(spec: RunSpec, launch: Launch, uri: str, experiment: str, out: Path,
               tags: dict[str, str] | None = None, log_models: str = "completed") -> dict[str, Any]:
    """Train ``spec`` once; returns the final metrics and the MLflow run id. With ``log_models``
    "completed" its networks are logged as MLflow models (a single run registers none)."""
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
            set_threads(launch.cpus)
            checkpoint_dir = (out / name / "checkpoint").resolve()
            tracking.set_tags(c, run_id, {CHECKPOINT_TAG: str(checkpoint_dir)})
            device = device_for(launch.gpus)
            from kd_platform.tracking.system_metrics import sampling
            with sampling(launch.system_metrics) as sampler:
                final = engine.train(spec, with_system_metrics(mlflow_reporter(uri, run_id, checkpoint_dir), sampler),
                                     device=device, teachers=teachers.prepare(spec, device),
                                     hooks=faults.hooks(spec.all_knobs()))
            location: str | None = str(checkpoint_dir)
        else:
            from dataclasses import replace

            import ray
            if not ray.is_initialized():
                # Each rank's report and Train's controller notes stay in Ray's log files: a DDP run
                # prints what a one-worker run prints.
                ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING,
                         log_to_driver=False)
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
    if log_models == "completed" and location:
        from kd_platform.tracking.models import log_run_models
        log_run_models(c, uri, run_id, spec, location)
    c.set_terminated(run_id, status="FINISHED")
    return {"run_id": run_id, "experiment_id": experiment_id, "metrics": final}
