"""``pcl``: peer collaborative learning for online KD (Wu & Gong, AAAI 2021).

One multi-branch student (shared trunk, B=3 branches, an ensemble head over the
concatenated branch features; see ``models/multibranch.py``) and a temporal-mean copy of
it, the "peer mean teacher". Loss, with ``m`` the temporal mean's branch logits and T=3::

    L = CE(z_en) + sum_b [CE(z_b) + r(e) KD(z_b || z_en) + r(e) mean_{b'!=b} KD(z_b || m_b')]

The temporal mean starts as an exact copy of the student and, after every optimiser step
(the first one included), moves by ``m <- 0.999 m + 0.001 s``. The decay is constant from
the first update: the mean-teacher warm-up ``min(1 - 1/(step+1), decay)`` is not used, so
the copy is never overwritten by the student at step 0. Only parameters are averaged; the
copy runs in training mode and keeps its own BatchNorm statistics, as in the mean-teacher
code PCL builds on.

Ramp-up ``r(e) = exp(-5 (1 - min(e, R)/R)^2)``, R=80, where ``e`` is the 0-based integer
epoch index (``StepContext.epoch``), constant within an epoch: r = exp(-5) during the
first epoch and 1 from epoch index R on.

Views: ``views=per_network`` gives branch ``b`` its own augmented view (the trunk then runs
once per view); the temporal mean sees the same per-branch views. Default: one shared view.
Evaluated: ``student1..B`` (the branches, averaged into the primary metric), the student's
``ensemble`` head, and the temporal mean's ``temporal_branch1..B``, ``temporal_mean``
(mean of its branch logits) and ``temporal_ensemble`` (its ensemble head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from kd_platform.methods._online import (
    MultiBranchConfig,
    ema_update_,
    frozen_copy,
    mean_teacher_rampup,
    multibranch_eval_networks,
    multibranch_logits,
    peer_teacher_loss,
)
from kd_platform.methods.base import Batch, BuildEnv, Method, MethodKind, StepContext, peer_names
from kd_platform.methods.registry import register_method
from kd_platform.models import build_multibranch


@dataclass(frozen=True)
class PCLConfig(MultiBranchConfig):
    """PCL's knobs are exactly the multi-branch ones."""


@register_method
class PCL(Method):
    name = "pcl"
    Config = PCLConfig
    cfg: PCLConfig
    kind = MethodKind.ONLINE

    @classmethod
    def student_names(cls, cfg: PCLConfig) -> tuple[str, ...]:
        return peer_names(cfg.branches)

    def __init__(self, cfg: PCLConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.net = build_multibranch(env.recipe.arch, env.num_classes, env.in_channels, cfg.branches)
        self.temporal = frozen_copy(self.net)

    @classmethod
    def views_for(cls, cfg: PCLConfig) -> int:
        return cfg.branches if cfg.views == "per_network" else 1

    def rampup(self, epoch: float) -> float:
        return mean_teacher_rampup(epoch, self.cfg.rampup_epochs)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        views = [batch.view(i) for i in range(self.num_views())]
        z, z_en = multibranch_logits(self.net, views)
        with torch.no_grad():
            m, _ = multibranch_logits(self.temporal, views)
        return peer_teacher_loss(z, z_en, m, batch.y, self.rampup(ctx.epoch), 0.0, self.cfg.temperature)

    def after_step(self, ctx: StepContext) -> None:
        ema_update_(self.temporal, self.net, self.cfg.ema_decay)

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {**multibranch_eval_networks(self.net, "student", "ensemble", None),
                **multibranch_eval_networks(self.temporal, "temporal_branch", "temporal_ensemble",
                                            "temporal_mean")}
