"""``one``: On-the-fly Native Ensemble (Lan, Zhu and Gong, "Knowledge Distillation by
On-the-Fly Native Ensemble", NeurIPS 2018), online.

One multi-branch network (``models/multibranch.py``: stem and first two stages shared, ``m``
separate last stages with their own heads; PCL's ensemble head is not used) and a gate that
reads the shared low-level features and weighs the branches:

    g = softmax(FC(GAP(shared features)))        (N, m)
    z_e = sum_i g_i z_i                           the gated ensemble, ONE's teacher
    L = CE(z_e) + sum_i CE(z_i) + sum_i KD(z_i || z_e)     z_e detached in the KD terms, T = 3

``CE(z_e)`` trains the gate and, through it, every branch. ``gate=fc`` is that formula (the
project's method notes); ``gate=fc_bn_relu`` puts BatchNorm and ReLU between the FC layer and
the softmax, as the paper describes the gate. Defaults: m = 3 branches, T = 3.

Evaluated: ``student1..m`` (the branches, averaged into the primary metric) and ``ensemble``
(the gated ensemble, which the paper reports as ONE's figure).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.config.knobs import knob
from kd_platform.losses import kd_loss
from kd_platform.methods._online import detached_mean, multibranch_eval_networks
from kd_platform.methods.base import Batch, BuildEnv, Method, MethodConfig, MethodKind, StepContext, peer_names
from kd_platform.methods.registry import register_method
from kd_platform.models import build_multibranch
from kd_platform.models.multibranch import MultiBranchResNet


@dataclass(frozen=True)
class ONEConfig(MethodConfig):
    branches: int = knob(3, low=2, high=8, help="m, the number of branches")
    temperature: float = knob(3.0, low=0.1, high=20.0, help="T of the KD terms")
    gate: str = knob("fc", choices=("fc", "fc_bn_relu"),
                     help="fc: softmax(FC(GAP(x))); fc_bn_relu: BatchNorm and ReLU before the softmax (the paper)")


def _pooled(fmap: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(fmap, 1).flatten(1)


class GatedBranches(nn.Module):
    """A multi-branch network whose ensemble is the gate-weighted sum of its branch logits.

    ``forward(x)`` returns ``(branch_logits, ensemble_logits)`` like the multi-branch network;
    ``gate_weights(shared)`` the gate's ``(N, m)`` weights for the trunk's output ``shared``."""

    def __init__(self, arch: str, num_classes: int, in_channels: int, branches: int, gate: str) -> None:
        super().__init__()
        self.body = cast(MultiBranchResNet, build_multibranch(arch, num_classes, in_channels, branches))
        del self.body.ensemble_head  # ONE's teacher is the gate's; an unused head would stall DDP
        self.num_branches = branches
        shared = next(m.in_channels for m in self.body.branches[0].modules() if isinstance(m, nn.Conv2d))
        extra = [nn.BatchNorm1d(branches), nn.ReLU()] if gate == "fc_bn_relu" else []
        self.gate = nn.Sequential(nn.Linear(shared, branches), *extra)

    def gate_weights(self, shared: Tensor) -> Tensor:
        return F.softmax(self.gate(_pooled(shared)), dim=1)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        shared = self.body.trunk(x)
        z = [head(_pooled(branch(shared))) for branch, head in zip(self.body.branches, self.body.heads)]
        g = self.gate_weights(shared)
        return z, (torch.stack(z, 1) * g[:, :, None]).sum(1)


def one_loss(z: list[Tensor], z_e: Tensor, y: Tensor, temperature: float) -> dict[str, Tensor]:
    ce = [F.cross_entropy(zb, y) for zb in z]
    kd = [kd_loss(zb, z_e, temperature) for zb in z]  # kd_loss detaches the ensemble
    ce_e = F.cross_entropy(z_e, y)
    return {"loss": ce_e + sum(ce) + sum(kd), "ce_ensemble": ce_e.detach(), "ce_branches": detached_mean(ce),
            "kd_ensemble": detached_mean(kd)}


@register_method
class ONE(Method):
    name = "one"
    Config = ONEConfig
    cfg: ONEConfig
    kind = MethodKind.ONLINE

    @classmethod
    def student_names(cls, cfg: ONEConfig) -> tuple[str, ...]:
        return peer_names(cfg.branches)

    def __init__(self, cfg: ONEConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.net = GatedBranches(env.recipe.arch, env.num_classes, env.in_channels, cfg.branches, cfg.gate)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        z, z_e = self.net(batch.x)
        return one_loss(z, z_e, batch.y, self.cfg.temperature)

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return multibranch_eval_networks(self.net, "student", "ensemble", None)
