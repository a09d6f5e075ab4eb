"""How a run is launched: its resources, device and threads, and the choice between training
in this process and on Ray Train workers (a ``TorchTrainer``) with the per-worker loop.

Sweeps (``trial``) and single runs (``single``) both launch through here. Everything is
module-level so that Ray can pickle it by reference into its worker processes (which import
the standard ``platform`` module long before this package).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kd_platform import teachers
from kd_platform.launch import faults
from kd_platform.run import engine
from kd_platform.run.spec import RunSpec


@dataclass(frozen=True)
class Launch:
    """How a trial runs: Train workers, resources per worker, and where Train keeps its state."""
    workers: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    use_train: bool = False          # force a TorchTrainer even for one worker
    storage_path: str = ""           # absolute; Train's run state lives under it
    max_failures: int = 2
    system_metrics: bool = True      # sample CPU, memory, disk and GPU into the run's MLflow metrics

    def in_process(self) -> bool:
        return self.workers == 1 and not self.use_train


def quiet_ray_loggers() -> None:
    """One 'checkpoint created' line per trial and epoch would drown the live trial table."""
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(cpus: float) -> None:
    torch.set_num_threads(max(1, int(round(cpus))))


def device_for(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def checkpoint_reporter(report: Callable[..., None], attach: bool) -> engine.Reporter:
    """A reporter that writes the checkpoint into a fresh directory and hands it to ``report``
    (Ray copies it into the run's storage), or reports metrics only when ``attach`` is false."""
    from ray.tune import Checkpoint

    def reporter(metrics: dict[str, float], save: Callable[[Path], None]) -> None:
        if not attach:
            report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save(Path(d))
            report(metrics, checkpoint=Checkpoint.from_directory(d))
    return reporter


def node_id() -> str:
    """The Ray node this process runs on (hex), or "" outside Ray."""
    import ray
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def gpu_ids() -> str:
    """The GPUs Ray gave this process (comma-joined ids as Ray numbers them; with a fractional
    ``--gpus-per-trial`` several trials share one id), or "" when none."""
    import ray
    if not ray.is_initialized():
        return ""
    return ",".join(str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU") or [])


def with_placement(reporter: engine.Reporter, placement: dict[str, str]) -> engine.Reporter:
    """Adds where the run trains to every report: MLflow tags need it, and the driver's
    callback only ever sees reported results (a retried trial may land on another node)."""
    def report(metrics: dict[str, Any], save: Callable[[Path], None]) -> None:
        reporter({**metrics, **placement}, save)
    return report


def with_system_metrics(reporter: engine.Reporter, sampler: Any, world: int = 1) -> engine.Reporter:
    """Adds the system metrics sampled since the last epoch to every report (see
    ``tracking.system_metrics``); under DDP every rank calls it, as it gathers every node's."""
    from kd_platform.tracking.system_metrics import attach

    def report(metrics: dict[str, Any], save: Callable[[Path], None]) -> None:
        reporter(attach(metrics, sampler, world), save)
    return report


def _worker_placement(world: int) -> dict[str, str]:
    """Where every rank trains (one collective call: all ranks must make it): comma-joined
    sorted node ids, and each rank's GPU ids in rank order, ';'-separated."""
    here = (node_id(), gpu_ids())
    ranks: list[Any] = [here]
    if world > 1:
        import torch.distributed as dist
        ranks = [None] * world
        dist.all_gather_object(ranks, here)
    return {"train_worker_nodes": ",".join(sorted(str(n) for n, _ in ranks)),
            "train_worker_gpus": ";".join(str(g) for _, g in ranks)}


def train_from(checkpoint: Any, run: Callable[[Path | None], Any]) -> None:
    if checkpoint is None:
        run(None)
    else:
        with checkpoint.as_directory() as d:
            run(Path(d))


def fit_with_train(spec: RunSpec, launch: Launch, name: str, tune_callback: bool,
                   mlflow: dict[str, str] | None = None) -> Any:
    """Run ``spec`` on ``launch.workers`` Ray Train workers with DDP (gloo on CPU, nccl on GPU).

    Rank 0's report of every epoch goes to Tune (``tune_callback``, a sweep's trial) or to the
    MLflow run ``mlflow`` names (``{"uri", "run_id"}``, a plain run), from Train's controller."""
    from ray import train
    from ray.train.torch import TorchConfig, TorchTrainer
    callbacks: list[Any] = []
    if tune_callback:
        from ray.tune.integration.ray_train import TuneReportCallback
        callbacks.append(TuneReportCallback())
    if mlflow:
        from kd_platform.tracking.train_mlflow import MlflowFromController
        callbacks.append(MlflowFromController(mlflow["uri"], mlflow["run_id"]))
    use_gpu = launch.gpus > 0
    resources = {"CPU": launch.cpus, **({"GPU": launch.gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config={"spec": asdict(spec), "cpus": launch.cpus, "system_metrics": launch.system_metrics},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=train.ScalingConfig(num_workers=launch.workers, use_gpu=use_gpu,
                                           resources_per_worker=resources),
        run_config=train.RunConfig(
            name=name, storage_path=launch.storage_path, callbacks=callbacks,
            # Train V2's FailureConfig takes controller_failure_limit; the stubs mypy sees are v1's.
            failure_config=train.FailureConfig(max_failures=launch.max_failures,  # type: ignore[call-arg]
                                               controller_failure_limit=3),
            checkpoint_config=train.CheckpointConfig(num_to_keep=1)),
    )
    return trainer.fit()


def _report_committed(metrics: dict[str, Any], checkpoint: Any = None) -> None:
    """``ray.train.report`` that returns only once Train's controller has committed the checkpoint.

    A report reaches the controller at its next poll of the workers (every 2 s by default);
    a worker that dies before then loses that checkpoint, and the restarted worker group
    resumes one epoch further back (from scratch after the first epoch). Waiting costs at
    most one poll interval per epoch."""
    from ray import train
    train.report(metrics, checkpoint=checkpoint)
    if checkpoint is not None:
        train.get_all_reported_checkpoints(consistency_mode=train.CheckpointConsistencyMode.COMMITTED)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: every rank trains its shard; rank 0 writes checkpoints."""
    import ray.train.torch as rt
    from ray import train
    quiet_ray_loggers()
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(config["cpus"])
    spec = RunSpec.from_dict(config["spec"])
    injected = faults.hooks(spec.all_knobs())
    # Every rank must call report (it is a barrier); only rank 0 attaches the checkpoint.
    placement = {"node_id": node_id(), "gpu_ids": gpu_ids(), **_worker_placement(world)}
    from kd_platform.tracking.system_metrics import node_name, sampling
    device = rt.get_device()
    # One sampler per node, named, so that a run over several nodes logs each node's figures.
    with sampling(config.get("system_metrics", True) and ctx.get_local_rank() == 0, node_name(),
                  placement["gpu_ids"]) as sampler:
        reporter = with_system_metrics(with_placement(checkpoint_reporter(_report_committed, attach=rank == 0),
                                                      placement), sampler, world)
        train_from(train.get_checkpoint(),
                   lambda resume: engine.train(spec, reporter, device=device, resume_from=resume, rank=rank,
                                               world=world, teachers=teachers.prepare(spec, device), hooks=injected))
