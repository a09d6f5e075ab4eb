"""``dkel``: decoupled knowledge with ensemble learning for online distillation (arXiv, Dec. 2023).

Student: the PCL multi-branch network (B=3 branches + an ensemble head). Teacher: an
independent network of the same shape (its own random initialisation, not a copy of the
student), first trained alone for ``init_steps`` mini-batches with the mean branch CE and
plain SGD (no momentum, no weight decay) at ``lr * init_lr_scale``, then changed only by EMA
towards the student, ``theta_T <- a theta_T + (1 - a) theta_S``. The initialisation uses the
first ``init_steps`` training batches, which the student trains on as usual; the teacher's
targets on those batches come from its weights before each SGD step. The EMA starts after
the optimiser step of the last initialisation batch.

- ``variant=paper``: ``a = ema_decay`` (0.999) from the first EMA update, so the EMA starts
  from the initialised teacher; ramp-up ``r(e) = lam * exp(-5 (1 - min(e, R)/R)^2)``.
- ``variant=code`` (the released script): ``a = min(1 - 1/(n+1), ema_decay)`` with ``n``
  the number of EMA updates done so far, so the first update (n=0) overwrites the teacher
  with the student; ramp-up ``0.1 * exp(-5 (1 - e/0.1)^2)`` for ``e <= 80`` and 0.1 after,
  constants hard-coded as in that script (``lam`` and ``R`` do not apply), which leaves
  distillation practically off for the first 80 epochs.

Decaying weight of the teacher-ensemble target ``w(e) = exp(-decay * e)``, set to 0 once it
is <= 0.01. Per branch, with ``m`` the teacher's branch logits and T=3::

    L_b = CE(z_b) + r KD(z_b || z_en)
          + r [w KD(z_b || mean_{b'!=b} m_b') + (1 - w) mean_{b'!=b} KD(z_b || m_b')]
    L   = CE(z_en) + sum_b L_b

``e`` is the 0-based integer epoch index (``StepContext.epoch``), constant within an epoch,
for both the ramp-up and ``w``. Only parameters are averaged; the teacher runs in training
mode and keeps its own BatchNorm statistics. Its initialisation and EMA counters are
buffers, so a checkpoint resumes them. Evaluated: ``student1..B`` (the branches, averaged
into the primary metric), the student's ``ensemble`` head, ``teacher_branch1..B`` and
``teacher_mean`` (mean of the teacher's branch logits); the best teacher branch is logged
as ``teacher_branches_best``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.methods._online import (
    MultiBranchConfig,
    ema_update_,
    freeze_parameters,
    gradients_for,
    mean_teacher_rampup,
    multibranch_eval_networks,
    multibranch_logits,
    peer_teacher_loss,
    plain_sgd_step_,
)
from kd_platform.methods.base import Batch, BuildEnv, Method, MethodKind, StepContext, peer_names
from kd_platform.methods.registry import register_method
from kd_platform.models import build_multibranch

# The released script's ramp-up constants, kept literal under variant=code.
CODE_RAMPUP_SCALE, CODE_RAMPUP_LENGTH, CODE_RAMPUP_UNTIL = 0.1, 0.1, 80
ENSEMBLE_WEIGHT_FLOOR = 0.01


@dataclass(frozen=True)
class DKELConfig(MultiBranchConfig):
    variant: str = knob("paper", choices=("paper", "code"),
                        help="paper: EMA from the initialised teacher, lam-scaled ramp-up; "
                             "code: the released script's EMA warm-up and ramp-up (R fixed at 80)")
    decay: float = knob(0.5, low=0.0, high=100.0, help="k of the ensemble weight w(e) = exp(-k e)")
    init_steps: int = knob(1, low=0, high=100000, help="mini-batches of teacher initialisation")
    init_lr_scale: float = knob(0.01, low=0.0, high=10.0, help="teacher initialisation lr = lr * this")
    lam: float = knob(1.0, low=0.0, high=100.0, help="scale of the paper ramp-up")


@register_method
class DKEL(Method):
    name = "dkel"
    Config = DKELConfig
    cfg: DKELConfig
    kind = MethodKind.ONLINE
    teacher_init_steps: Tensor  # registered buffers (long scalars)
    ema_updates: Tensor

    @classmethod
    def student_names(cls, cfg: DKELConfig) -> tuple[str, ...]:
        return peer_names(cfg.branches)

    @classmethod
    def group_names(cls, cfg: DKELConfig) -> dict[str, tuple[str, ...]]:
        # Released DKEL code reports the best teacher branch: logged as val/acc/teacher_branches_best.
        return {"teacher_branches": tuple(f"teacher_branch{b + 1}" for b in range(cfg.branches))}

    def __init__(self, cfg: DKELConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.net = build_multibranch(env.recipe.arch, env.num_classes, env.in_channels, cfg.branches)
        self.teacher = freeze_parameters(
            build_multibranch(env.recipe.arch, env.num_classes, env.in_channels, cfg.branches))
        self.init_lr = env.recipe.lr * cfg.init_lr_scale
        self.register_buffer("teacher_init_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @classmethod
    def views_for(cls, cfg: DKELConfig) -> int:
        return cfg.branches if cfg.views == "per_network" else 1

    def rampup(self, epoch: float) -> float:
        if self.cfg.variant == "code":
            if epoch > CODE_RAMPUP_UNTIL:
                return CODE_RAMPUP_SCALE
            return CODE_RAMPUP_SCALE * math.exp(-5.0 * (1.0 - epoch / CODE_RAMPUP_LENGTH) ** 2)
        return self.cfg.lam * mean_teacher_rampup(epoch, self.cfg.rampup_epochs)

    def ensemble_weight(self, epoch: float) -> float:
        w = math.exp(-self.cfg.decay * epoch)
        return w if w > ENSEMBLE_WEIGHT_FLOOR else 0.0

    def teacher_initialised(self) -> bool:
        return int(self.teacher_init_steps) >= self.cfg.init_steps

    def teacher_logits(self, views: list[Tensor], y: Tensor) -> list[Tensor]:
        """The teacher's branch logits (detached), after one initialisation step while due."""
        if self.teacher_initialised():
            with torch.no_grad():
                return multibranch_logits(self.teacher, views)[0]
        with gradients_for(self.teacher):
            m, _ = multibranch_logits(self.teacher, views)
            ce = torch.stack([F.cross_entropy(mb, y) for mb in m]).mean()
            plain_sgd_step_(self.teacher, ce, self.init_lr)
        self.teacher_init_steps += 1
        return [mb.detach() for mb in m]

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        views = [batch.view(i) for i in range(self.num_views())]
        z, z_en = multibranch_logits(self.net, views)
        m = self.teacher_logits(views, batch.y)
        return peer_teacher_loss(z, z_en, m, batch.y, self.rampup(ctx.epoch),
                                 self.ensemble_weight(ctx.epoch), self.cfg.temperature)

    def ema_decay_now(self) -> float:
        if self.cfg.variant == "code":
            return min(1.0 - 1.0 / (int(self.ema_updates) + 1), self.cfg.ema_decay)
        return self.cfg.ema_decay

    def after_step(self, ctx: StepContext) -> None:
        if not self.teacher_initialised():
            return
        ema_update_(self.teacher, self.net, self.ema_decay_now())
        self.ema_updates += 1

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {**multibranch_eval_networks(self.net, "student", "ensemble", None),
                **multibranch_eval_networks(self.teacher, "teacher_branch", None, "teacher_mean")}
