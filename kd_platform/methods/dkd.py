"""``dkd``: decoupled knowledge distillation (Zhao et al., "Decoupled Knowledge Distillation",
CVPR 2022), offline from a trained, frozen teacher.

Hinton's KD term splits into a target-class part and a non-target part, which DKD weighs
separately. With ``p = softmax(z / T)`` and the true class ``y``:

    b = [p_y, 1 - p_y]                          binary: target vs the rest
    q = softmax of the logits other than y       the distribution among the non-target classes
    TCKD = T^2 KL(b_t || b_s),  NCKD = T^2 KL(q_t || q_s)      (batch means, teacher detached)
    L = CE + min(e / warmup, 1) * (alpha TCKD + beta NCKD)

Defaults alpha = 1, beta = 8, T = 4, warmup = 20 epochs (the paper's CIFAR-100 settings); its
published CIFAR-100 resnet32x4 -> resnet8x4 top-1 is 76.32. ``e`` is the fractional epoch at
the end of the step, ``epoch + (step + 1) / steps_per_epoch``, so the weight is 1/20 at the
end of the first epoch (as the released code's 1-based epoch gives it) and reaches 1 after 20
epochs; ``warmup=0`` disables the warm-up. ``q`` is the softmax of the non-target logits
themselves and ``log(1 - p_y)`` is ``logsumexp`` of the non-target logits minus that of all
of them, so neither divides by a probability near 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.config.recipe import Recipe
from kd_platform.methods._offline import OfflineConfig, OfflineMethod
from kd_platform.methods.base import Batch, StepContext, Void, off_with
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class DKDConfig(OfflineConfig):
    alpha: float = knob(1.0, low=0.0, high=100.0, help="weight of TCKD, the target-class term")
    beta: float = knob(8.0, low=0.0, high=100.0, help="weight of NCKD, the non-target-class term")
    temperature: float = knob(4.0, low=0.1, high=20.0, help="T of both terms")
    warmup: float = knob(20.0, low=0.0, high=100000.0, help="epochs over which the DKD weight ramps to 1 (0: none)")


def _split_log_probs(z: Tensor, y: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """``(log b, log q)``: the binary target/rest log-probabilities ``(N, 2)`` and the
    non-target log-distribution ``(N, C-1)`` of logits ``z`` at temperature ``t``."""
    z = z / t
    # Column j of the rest is class j, or j + 1 from the target on: a gather of fixed shape.
    cols = torch.arange(z.shape[1] - 1, device=z.device)[None, :]
    rest = z.gather(1, cols + (cols >= y[:, None]))
    log_all, log_rest = torch.logsumexp(z, 1), torch.logsumexp(rest, 1)
    log_b = torch.stack([z.gather(1, y[:, None]).squeeze(1) - log_all, log_rest - log_all], 1)
    return log_b, F.log_softmax(rest, 1)


def _kl(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def decoupled_kd(z_s: Tensor, z_t: Tensor, y: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """``(TCKD, NCKD)``, each with its ``T^2``; the teacher side carries no graph."""
    b_s, q_s = _split_log_probs(z_s, y, t)
    b_t, q_t = _split_log_probs(z_t.detach(), y, t)
    return t * t * _kl(b_t, b_s), t * t * _kl(q_t, q_s)


def warmup_weight(ctx: StepContext, warmup: float) -> float:
    if warmup <= 0:
        return 1.0
    return min((ctx.epoch + (ctx.step + 1) / ctx.steps_per_epoch) / warmup, 1.0)


def dkd_objective(z_s: Tensor, z_t: Tensor, y: Tensor, cfg: DKDConfig, weight: float) -> dict[str, Tensor]:
    ce = F.cross_entropy(z_s, y)
    tckd, nckd = decoupled_kd(z_s, z_t, y, cfg.temperature)
    loss = ce + weight * (cfg.alpha * tckd + cfg.beta * nckd)
    return {"loss": loss, "ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}


@register_method
class DKD(OfflineMethod):
    name = "dkd"
    Config = DKDConfig
    cfg: DKDConfig

    @classmethod
    def void_knobs(cls, cfg: DKDConfig, recipe: Recipe, steps_per_epoch: int | None = None) -> dict[str, Void]:
        return off_with("alpha+beta", cfg.alpha + cfg.beta, ("temperature", "warmup"), "DKD terms")

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        z_s, z_t = self.logits(batch.x)
        return dkd_objective(z_s, z_t, batch.y, self.cfg, warmup_weight(ctx, self.cfg.warmup))
