"""``swa``: stochastic weight averaging (Izmailov et al., UAI 2018). One network trained with
cross entropy (``ce``'s, label smoothing included) by the run's SGD, and the running average
of its weights over the last part of the run.

- Phase: the first ``swa_start`` epochs train as the recipe says; every epoch after them is an
  SWA epoch (``swa_start`` counts like a milestone: ``swa_start=225`` of 300 epochs makes
  epochs 226..300 SWA epochs). Empty (the default) means 75% of the run's epochs, rounded down.
- Learning rate in SWA epochs: ``swa_lr``, reached at once (``swa_anneal_epochs=0``, the
  default) or blended from the schedule's lr at the start of the phase over
  ``swa_anneal_epochs`` epochs (``swa_anneal``: cos or linear), as ``torch.optim.swa_utils.SWALR``
  anneals. The engine's scheduler keeps stepping every epoch and owns the optimiser's lr: SWA
  puts its lr in place for each of its optimiser steps and gives the schedule's value back
  right after, so the schedule (whose cosine form is recursive in the lr it finds) is not
  disturbed, a resumed run continues the same way, and the ``lr`` metric the engine logs
  stays the schedule's, not the lr SWA applied.
- Average: ``torch.optim.swa_utils.AveragedModel`` of the parameters, updated with the
  network at the end of every SWA epoch (equal weights for every snapshot).
- BatchNorm: before every evaluation once averaging has begun, the averaged network's running
  statistics are recomputed from scratch over that epoch's training data
  (``swa_utils.update_bn``: a cumulative average over the batches); with several workers the
  statistics are then averaged over the workers, so every worker evaluates the same network.
  That costs one forward pass over the training data per SWA epoch.

Evaluated: ``net`` (the SGD network) and ``swa``, the network SWA hands you at that epoch:
the average once averaging has begun, the SGD network itself before (there is nothing to
average yet). ``swa`` is the student, so the primary metric is the averaged network's accuracy
from the first SWA epoch on and the SGD network's before it; both are logged every epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn

from kd_platform.config.knobs import knob
from kd_platform.errors import UsageError
from kd_platform.methods._online import freeze_parameters
from kd_platform.methods.base import Batch, BuildEnv, MethodConfig, StepContext
from kd_platform.methods.ce import CE, CEConfig
from kd_platform.methods.registry import register_method

ANNEALS: dict[str, Callable[[float], float]] = {
    "cos": lambda t: (1.0 - math.cos(math.pi * t)) / 2.0,
    "linear": lambda t: t,
}
"""How far (0..1) from the start lr towards ``swa_lr`` an SWA epoch is, given ``t``, the
fraction of the annealing epochs done (SWALR's two strategies)."""


@dataclass(frozen=True)
class SWAConfig(CEConfig):
    swa_start: str = knob("", form="epochs",
                          help="epochs trained before the SWA phase (one epoch number); empty: 75% of the epochs")
    swa_lr: float = knob(0.05, low=0.0, high=10.0, help="learning rate of the SWA epochs")
    swa_anneal_epochs: int = knob(0, low=0, high=100000,
                                  help="epochs over which the lr moves from the schedule's to swa_lr (0: at once)")
    swa_anneal: str = knob("cos", choices=tuple(ANNEALS), help="shape of that move")

    def __post_init__(self) -> None:
        if "," in self.swa_start:
            raise UsageError(f"knob 'swa_start': {self.swa_start!r}: expected one epoch, not a list")

    def start_epoch(self, epochs: int) -> int:
        """How many epochs train before averaging begins, in a run of ``epochs``."""
        return int(self.swa_start) if self.swa_start.strip() else int(0.75 * epochs)


@register_method
class SWA(CE):
    name = "swa"
    Config = SWAConfig
    cfg: SWAConfig
    swa: AveragedModel
    anneal_from: Tensor

    @classmethod
    def student_names(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("swa",)

    def __init__(self, cfg: SWAConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.start = cfg.start_epoch(env.recipe.epochs)
        if self.start >= env.recipe.epochs:
            raise UsageError(f"knob 'swa_start': {self.start} leaves no SWA epoch in a run of "
                             f"{env.recipe.epochs} epochs; it must be below epochs")
        # Its parameters stay out of the optimiser; it is written only by averaging.
        self.swa = AveragedModel(self.net)
        freeze_parameters(self.swa)
        # The schedule's lr when the phase began (the annealing's start); a buffer, so it resumes.
        self.register_buffer("anneal_from", torch.tensor(math.nan, dtype=torch.float64))

    @property
    def averaging(self) -> bool:
        return int(cast(Tensor, self.swa.n_averaged)) > 0

    def swa_lr(self, epoch: int, scheduled: float) -> float:
        """The lr of SWA epoch ``epoch`` (0-based run epoch) when the schedule says ``scheduled``."""
        cfg = self.cfg
        if cfg.swa_anneal_epochs == 0:
            return cfg.swa_lr
        if math.isnan(float(self.anneal_from)):
            self.anneal_from.fill_(scheduled)
        a = ANNEALS[cfg.swa_anneal](min(1.0, (epoch - self.start) / cfg.swa_anneal_epochs))
        return a * cfg.swa_lr + (1.0 - a) * float(self.anneal_from)

    def optimizer_step(self, loss_terms: Callable[[], dict[str, Tensor]], opt: torch.optim.Optimizer,
                       ctx: StepContext) -> dict[str, Tensor]:
        if ctx.epoch < self.start:
            return super().optimizer_step(loss_terms, opt, ctx)
        scheduled = [g["lr"] for g in opt.param_groups]
        lr = self.swa_lr(ctx.epoch, scheduled[0])
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            return super().optimizer_step(loss_terms, opt, ctx)
        finally:
            for g, value in zip(opt.param_groups, scheduled):
                g["lr"] = value

    def after_epoch(self, ctx: StepContext) -> None:
        if ctx.epoch >= self.start:
            self.swa.update_parameters(self.net)

    def before_eval(self, ctx: StepContext, train_batches: Callable[[], Iterable[Batch]]) -> None:
        if self.averaging:
            update_bn((b.x for b in train_batches()), self.swa)
            _average_over_workers(self.swa)

    def averaged_network(self) -> nn.Module:
        """The plain network SWA hands you now (see the module docstring)."""
        return cast(nn.Module, self.swa.module) if self.averaging else self.net

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"net": self.net, "swa": self.averaged_network()}

    def analysis_networks(self) -> dict[str, nn.Module]:
        # Both, by their evaluation names: SWA's claim is that the average sits in a flatter region.
        return {"swa": self.averaged_network(), "net": self.net}


@torch.no_grad()
def _average_over_workers(net: nn.Module) -> None:
    """Each worker recomputed the statistics on its own shard; give every worker their mean."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for b in (m.running_mean, cast(Tensor, m.running_var)):
                dist.all_reduce(b)
                b.div_(dist.get_world_size())
