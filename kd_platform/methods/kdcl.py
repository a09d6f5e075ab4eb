"""``kdcl``: knowledge distillation via collaborative learning (Guo et al., CVPR 2020).

N networks learn from one soft target built from all of them: ``z_ens`` = the mean of the
peers' detached logits, and network ``i`` minimises ``(1 - a) CE_i + a KD(z_i || z_ens)``
with a=0.5, T=4. The paper also builds the target in other ways (e.g. a min-logit or a
learned linear combination); the platform's specification fixes plain averaging. One
forward per network per batch; the peers share one augmented view so the comparison with
other methods is fair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.config.recipe import Recipe
from kd_platform.losses import kd_loss, total
from kd_platform.methods._online import detached_mean, peer_eval_networks
from kd_platform.methods._peers import Peers
from kd_platform.methods.base import (
    Batch,
    BuildEnv,
    Method,
    MethodConfig,
    MethodKind,
    StepContext,
    Void,
    off_with,
    peer_names,
)
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class KDCLConfig(MethodConfig):
    n_students: int = knob(2, low=2, high=8, help="N, the number of peers")
    alpha: float = knob(0.5, low=0.0, high=1.0, help="a, the weight of the KD term against CE")
    temperature: float = knob(4.0, low=0.1, high=20.0, help="T of the KD terms")


@register_method
class KDCL(Method):
    name = "kdcl"
    Config = KDCLConfig
    cfg: KDCLConfig
    kind = MethodKind.ONLINE
    fusable_peers = True

    @classmethod
    def student_names(cls, cfg: KDCLConfig) -> tuple[str, ...]:
        return peer_names(cfg.n_students)

    def __init__(self, cfg: KDCLConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.peers = Peers(lambda: env.make_model(env.recipe.arch), cfg.n_students, env.fused)

    @classmethod
    def void_knobs(cls, cfg: KDCLConfig, recipe: Recipe, steps_per_epoch: int | None = None) -> dict[str, Void]:
        return off_with("alpha", cfg.alpha, ("temperature",))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        a, t = self.cfg.alpha, self.cfg.temperature
        logits = self.peers([batch.x])
        target = torch.stack([z.detach() for z in logits]).mean(0)
        ce = [F.cross_entropy(z, batch.y) for z in logits]
        kd = [kd_loss(z, target, t) for z in logits]
        loss = total((1 - a) * c + a * k for c, k in zip(ce, kd))
        return {"loss": loss, "ce": detached_mean(ce), "kd": detached_mean(kd)}

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return peer_eval_networks(self.students, lambda x: self.peers([x]))
