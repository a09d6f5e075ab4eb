"""MLflow for a ``platform.train`` run on Ray Train workers, written by Ray Train's controller.

The controller runs in the driver's process group on the driver's node (Ray Train pins it
there), so it reaches the MLflow store the driver reaches, 127.0.0.1 on a cluster's head
included, and a plain run has one MLflow writer whatever its worker count: the driver's
node. Workers only report to Train. A sweep's trials are logged by the sweep's own Tune
callback instead (``mlflow_callback``).
"""
from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from kd_platform.tracking.reporting import mlflow_reporter


class MlflowFromController(UserCallback):
    """Logs rank 0's report of every epoch to the MLflow run ``run_id`` of store ``uri``."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._report: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_report": None}  # a client is rebuilt where the controller runs

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        if self._report is None:
            self._report = mlflow_reporter(self.uri, self.run_id, None)
        self._report(metrics[0], lambda directory: None)  # Train has persisted the checkpoint already
