"""``kd``: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

A student matches a frozen teacher's softened outputs::

    L = (1 - alpha) CE(z_s, y) + alpha * T^2 KL(softmax(z_t/T) || softmax(z_s/T))

with batch-mean reduction; defaults T = 4, alpha = 0.9 (the CRD/DIST benchmark's KD row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.config.recipe import Recipe
from kd_platform.losses import kd_loss
from kd_platform.methods._offline import OfflineConfig, OfflineMethod
from kd_platform.methods.base import Batch, StepContext, Void, off_with
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class KDConfig(OfflineConfig):
    temperature: float = knob(4.0, low=0.1, high=20.0, help="T of the KD term")
    alpha: float = knob(0.9, low=0.0, high=1.0, help="a, the weight of the KD term against CE")


def kd_objective(z_s: Tensor, z_t: Tensor, y: Tensor, cfg: KDConfig) -> dict[str, Tensor]:
    ce = F.cross_entropy(z_s, y)
    kd = kd_loss(z_s, z_t, cfg.temperature)
    return {"loss": (1.0 - cfg.alpha) * ce + cfg.alpha * kd, "ce": ce.detach(), "kd": kd.detach()}


@register_method
class KD(OfflineMethod):
    name = "kd"
    Config = KDConfig
    cfg: KDConfig

    @classmethod
    def void_knobs(cls, cfg: KDConfig, recipe: Recipe, steps_per_epoch: int | None = None) -> dict[str, Void]:
        return off_with("alpha", cfg.alpha, ("temperature",))

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        return kd_objective(*self.logits(batch.x), batch.y, self.cfg)
