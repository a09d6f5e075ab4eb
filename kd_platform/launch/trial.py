"""What runs inside one Tune trial: the engine in the trial's process, or a ``TorchTrainer``
whose workers run it (see ``launch``)."""
from __future__ import annotations

from typing import Any

from kd_platform import teachers
from kd_platform.launch import faults
from kd_platform.launch.launcher import (
    Launch,
    checkpoint_reporter,
    device_for,
    fit_with_train,
    gpu_ids,
    node_id,
    quiet_ray_loggers,
    set_threads,
    train_from,
    with_placement,
    with_system_metrics,
)
from kd_platform.run import engine
from kd_platform.run.spec import Assets, RunSpec


def run_trial(config: dict[str, Any], *, method: str, fixed: dict[str, Any], seed: int, launch: Launch,
              assets: Assets | None = None) -> None:
    """Tune's trainable: the swept ``config`` on top of the ``fixed`` knobs."""
    from ray import tune
    quiet_ray_loggers()
    config = dict(config)
    seed = int(config.pop("seed", seed))  # an ablation repeats each cell over seeds
    spec = RunSpec.from_flat(method, {**fixed, **config}, seed, assets)
    injected = faults.hooks(spec.all_knobs())
    if launch.in_process():
        set_threads(launch.cpus)
        device = device_for(launch.gpus)
        from kd_platform.tracking.system_metrics import sampling
        with sampling(launch.system_metrics, gpus=gpu_ids()) as sampler:
            reporter = with_system_metrics(with_placement(checkpoint_reporter(tune.report, attach=True),
                                                          {"node_id": node_id(), "gpu_ids": gpu_ids()}), sampler)
            train_from(tune.get_checkpoint(),
                       lambda resume: engine.train(spec, reporter, device=device, resume_from=resume,
                                                   teachers=teachers.prepare(spec, device), hooks=injected))
    else:
        fit_with_train(spec, launch, name=f"train-{tune.get_context().get_trial_id()}", tune_callback=True)
