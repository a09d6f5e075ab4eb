"""``dml``: deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018).

N networks of one architecture, each separately initialised, learn together: network
``i`` minimises ``CE_i + mean_{j != i} KD(z_i || z_j)`` (T=1 by default, as in the paper's
KL formulation). The paper updates the networks in turn, re-running the others after each
update; here all networks take one forward per batch and are stepped together, with every
peer's logits detached as targets, which is the usual batched form and avoids N^2 forwards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.losses import mean_kd_to_peers, total
from kd_platform.methods._online import detached_mean, peer_eval_networks
from kd_platform.methods._peers import Peers
from kd_platform.methods.base import Batch, BuildEnv, Method, MethodConfig, MethodKind, StepContext, peer_names
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class DMLConfig(MethodConfig):
    n_students: int = knob(2, low=2, high=8, help="N, the number of peers")
    temperature: float = knob(1.0, low=0.1, high=20.0, help="T of the KD terms")


@register_method
class DML(Method):
    name = "dml"
    Config = DMLConfig
    cfg: DMLConfig
    kind = MethodKind.ONLINE
    fusable_peers = True

    @classmethod
    def student_names(cls, cfg: DMLConfig) -> tuple[str, ...]:
        return peer_names(cfg.n_students)

    def __init__(self, cfg: DMLConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.peers = Peers(lambda: env.make_model(env.recipe.arch), cfg.n_students, env.fused)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        logits = self.peers([batch.x])
        ce = [F.cross_entropy(z, batch.y) for z in logits]
        kd = [mean_kd_to_peers(logits, i, self.cfg.temperature) for i in range(len(logits))]
        loss = total(c + k for c, k in zip(ce, kd))
        return {"loss": loss, "ce": detached_mean(ce), "kd": detached_mean(kd)}

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return peer_eval_networks(self.students, lambda x: self.peers([x]))
