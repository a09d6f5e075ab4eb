"""System metrics of a run (CPU, memory, disk, network, and GPU where present), sampled where
the run trains and logged to its MLflow run as MLflow's own ``system/...`` metrics.

MLflow's ``SystemMetricsMonitor`` writes to the store from the process it samples. A trial here
trains on whichever node Ray places it, and on a cluster the store is often reachable only from
the head (a server on its loopback), while the sweep's callback in the driver is the run's one
writer. So the sampling uses MLflow's monitors, and the samples travel with the epoch's report:
``Sampler`` collects on a thread, ``attach`` drains it into the reported metrics (under
``SYSTEM_KEY``, gathered from every node of a DDP run), and ``metrics_of`` turns them back into
MLflow metrics in whatever process writes the run (the sweep's callback, a plain run's reporter).
A store that is away holds them with the epoch's other writes.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)

SYSTEM_KEY = "system_samples"
"""Reported metric holding the samples since the last report, as JSON: ``[[node, ms, {name: value}], ...]``."""
PREFIX = "system/"
SAMPLE_S = 5.0
SAMPLES_PER_POINT = 6
"""A point every 30 s (the mean of 6 samples 5 s apart), and one at every epoch's end: a run of
minutes gets a few points per epoch, a run of hours a few hundred per metric."""
_GPU_KEY = re.compile(r"gpu_(\d+)_")


def _monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        import torch
        if torch.cuda.is_available():
            try:
                import pynvml  # noqa: F401  (MLflow's GPU monitor needs it imported)
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
                monitors.append(GPUMonitor())
            except Exception as exc:  # noqa: BLE001 - the run goes on without GPU figures
                log.warning("no GPU system metrics (%s); pip install nvidia-ml-py adds them", exc)
    except ImportError:
        pass
    return monitors


class Sampler:
    """Samples this node every ``SAMPLE_S`` seconds on a daemon thread; ``drain`` returns the
    points since the last call (the partial one included, or a sample taken then and there)."""

    def __init__(self, node: str = "", gpus: str = "", sample_s: float = SAMPLE_S,
                 per_point: int = SAMPLES_PER_POINT) -> None:
        self.node, self.sample_s, self.per_point = node, sample_s, per_point
        self.gpus = {g for g in gpus.split(",") if g.strip()}
        self.monitors = _monitors()
        self.points: list[list[Any]] = []
        self.samples = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._collect()  # psutil measures CPU use between two calls: the first only sets the start
        threading.Thread(target=self._loop, name="kd-system-metrics", daemon=True).start()

    def _collect(self) -> None:
        for m in self.monitors:
            try:
                m.collect_metrics()
            except Exception as exc:  # noqa: BLE001 - a sensor that fails is left out, not the run
                log.debug("system metric sample failed: %s", exc)
        self.samples += 1

    def _point(self) -> None:
        values: dict[str, float] = {}
        for m in self.monitors:
            values.update(m.aggregate_metrics())
            m.clear_metrics()
        if self.gpus:  # a packed trial shares a node's GPUs: its own only, as Ray numbers them
            values = {k: v for k, v in values.items()
                      if not (g := _GPU_KEY.match(k)) or g.group(1) in self.gpus}
        if values:
            self.points.append([self.node, int(time.time() * 1000), values])
        self.samples = 0

    def _loop(self) -> None:
        while not self.stop.wait(self.sample_s):
            with self.lock:
                self._collect()
                if self.samples >= self.per_point:
                    self._point()

    def drain(self) -> list[list[Any]]:
        with self.lock:
            if self.samples == 0:
                self._collect()
            self._point()
            points, self.points = self.points, []
        return points

    def close(self) -> None:
        self.stop.set()


def start(enabled: bool, node: str = "", gpus: str = "") -> Sampler | None:
    """A ``Sampler`` of this node, or None when turned off or when it cannot start (the run
    trains all the same)."""
    if not enabled:
        return None
    try:
        return Sampler(node, gpus)
    except Exception as exc:  # noqa: BLE001 - psutil missing or a sensor that cannot open
        log.warning("system metrics off for this run: %s", exc)
        return None


@contextmanager
def sampling(enabled: bool, node: str = "", gpus: str = "") -> Iterator[Sampler | None]:
    """:func:`start`'s sampler for the duration of a run, stopped however the run ends."""
    sampler = start(enabled, node, gpus)
    try:
        yield sampler
    finally:
        if sampler is not None:
            sampler.close()


def attach(metrics: dict[str, Any], sampler: Sampler | None, world: int = 1) -> dict[str, Any]:
    """``metrics`` with the samples since the last report. Under DDP every rank must call it at
    the same report (it gathers each node's samples to every rank); ranks without a sampler add none."""
    points = sampler.drain() if sampler is not None else []
    if world > 1:
        import torch.distributed as dist
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, points)
        points = [p for rank in gathered for p in rank or []]
    return {**metrics, SYSTEM_KEY: json.dumps(points)} if points else metrics


def node_name() -> str:
    """How a node is named in its metrics' keys (``system/<node>/...``) when a run spans nodes."""
    return socket.gethostname().split(".")[0] or "node"


def log_samples(c: Any, run_id: str, result: dict[str, Any], first_step: int) -> int:
    """Log the samples ``result`` carries to ``run_id`` (see :func:`metrics_of`); the next step."""
    system, step = metrics_of(result, first_step)
    if system:
        c.log_batch(run_id, metrics=system)
    return step


def metrics_of(result: dict[str, Any], first_step: int = 0) -> tuple[list[Any], int]:
    """The MLflow metrics of the samples ``result`` carries (``system/<name>``, or
    ``system/<node>/<name>`` for a run that names its nodes), each at its own time, with steps
    counting on from ``first_step`` per node; and the next step."""
    from mlflow.entities import Metric
    raw = result.get(SYSTEM_KEY)
    if not raw:
        return [], first_step
    try:
        points = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return [], first_step
    out: list[Any] = []
    steps: dict[str, int] = {}
    for node, ms, values in points:
        step = steps.get(node, first_step)
        steps[node] = step + 1
        prefix = PREFIX + (f"{node}/" if node else "")
        out += [Metric(prefix + k, float(v), int(ms), step) for k, v in values.items()]
    return out, max(steps.values(), default=first_step)
