"""Reporters that write a run's epochs to MLflow from the process that trains it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from kd_platform import tracking
from kd_platform.run import engine
from kd_platform.run.evaluation import warning_tags
from kd_platform.tracking.system_metrics import log_samples

log = logging.getLogger(__name__)


def mlflow_reporter(uri: str, run_id: str, checkpoint_dir: Path | None) -> engine.Reporter:
    """Logs each epoch's metrics to ``run_id`` and keeps the latest checkpoint in ``checkpoint_dir``."""
    c = tracking.client(uri)
    system_step = 0

    def report(metrics: dict[str, float], save: Callable[[Path], None]) -> None:
        nonlocal system_step
        tracking.log_metrics(c, run_id, metrics, step=int(metrics["epoch"]))
        system_step = log_samples(c, run_id, metrics, system_step)
        warnings = warning_tags(metrics)
        if warnings:
            tracking.set_tags(c, run_id, warnings)
        if checkpoint_dir is not None:
            save(checkpoint_dir)
        acc = metrics.get("val/acc/students_mean", float("nan"))
        log.info("epoch %d  loss %.4f  val/acc/students_mean %.2f  (%.1fs)", metrics["epoch"],
                 metrics.get("train/loss/loss", float("nan")), acc, metrics["time/epoch_s"])
    return report
