"""``cmkd``: CMKD, "Efficient and Robust Knowledge Distillation from A Stronger Teacher Based
on Correlation Matching" (2024).

DIST's inter-class Pearson term is complemented by a Spearman (rank) term, weighted per
sample by how hard the sample is. With ``ys = softmax(z_s/t)``, ``yt = softmax(z_t/t)``
(each row z-scored first when ``standardize``):

    lp_i = 1 - pearson(ys_i, yt_i)
    ls_i = 1 - pearson(rank(ys_i), rank(yt_i))   teacher ranks exact, student ranks soft:
           rank_j = 1 + sum_{k != j} sigmoid((s_j - s_k) / eps), eps = rank_eps * row range
    L = CE + w_kd * t^2 * [mean_i (w_P,i lp_i + w_S,i ls_i) + g_intra * intra]

with DIST's intra-class term. The difficulty ``d_i`` in [0, 1] is the entropy of the
teacher's prediction over ``log C`` (``difficulty=entropy``) or one minus its probability
of the true class (``margin``), both from ``softmax(z_t / T_d)`` with the knob
``difficulty_temperature`` T_d. The paper does not say which temperature; the default T_d = 1
(the behaviour before it was a knob) measures how hard the sample is for the teacher itself,
independently of the distillation temperature, while T_d = t would measure it on the
softened outputs the loss compares (flatter, so every sample looks harder).

The exact weighting used in the paper is unknown, so it is a knob: ``difficulty``
(default) gives ``w_P = 1 - d``, ``w_S = d`` (ranks matter more on hard samples),
``inverse`` swaps them, ``fixed`` uses ``w_P = 1 - s``, ``w_S = s`` with ``s = spearman_share``.
``weighting=fixed, spearman_share=0`` is DIST with its ``t^2`` scaling (``dist``'s default, ``tau_squared=true``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.config.recipe import Recipe
from kd_platform.losses import dist_intra, pearson_rows, spearman_rows, standardize_rows
from kd_platform.methods._offline import OfflineConfig, OfflineMethod
from kd_platform.methods.base import Batch, StepContext, Void, off_with
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class CMKDConfig(OfflineConfig):
    temperature: float = knob(4.0, low=0.1, high=20.0, help="t of both softmaxes")
    w_kd: float = knob(2.0, low=0.0, high=100.0, help="weight of the correlation terms against CE")
    g_intra: float = knob(1.0, low=0.0, high=100.0, help="weight of DIST's intra-class term")
    standardize: bool = knob(False, help="z-score each row of ys and yt before correlating")
    rank_eps: float = knob(0.01, low=1e-6, high=10.0,
                           help="soft-rank temperature as a fraction of each student row's range")
    difficulty: str = knob("entropy", choices=("entropy", "margin"),
                           help="entropy: teacher entropy / log C; margin: 1 - teacher p(true class)")
    weighting: str = knob("difficulty", choices=("difficulty", "inverse", "fixed"),
                          help="difficulty: w_S = d; inverse: w_S = 1 - d; fixed: w_S = spearman_share")
    spearman_share: float = knob(0.5, low=0.0, high=1.0, help="w_S under weighting=fixed")
    difficulty_temperature: float = knob(1.0, low=0.1, high=20.0,
                                         help="T_d of the teacher softmax the difficulty is measured on")


def sample_difficulty(z_t: Tensor, y: Tensor, kind: str, temperature: float = 1.0) -> Tensor:
    """Per-sample difficulty in [0, 1] from the teacher's logits at ``temperature`` (no graph)."""
    log_p = F.log_softmax(z_t.detach() / temperature, dim=1)
    if kind == "entropy":
        return -(log_p.exp() * log_p).sum(dim=1) / math.log(z_t.shape[1])
    if kind == "margin":
        return 1.0 - log_p.gather(1, y[:, None]).squeeze(1).exp()
    raise ValueError(f"unknown difficulty '{kind}'")


def correlation_weights(d: Tensor, weighting: str, spearman_share: float) -> tuple[Tensor, Tensor]:
    """``(w_P, w_S)`` per sample; they always sum to 1."""
    if weighting == "difficulty":
        w_s = d
    elif weighting == "inverse":
        w_s = 1.0 - d
    elif weighting == "fixed":
        w_s = d.new_full(d.shape, spearman_share)
    else:
        raise ValueError(f"unknown weighting '{weighting}'")
    return 1.0 - w_s, w_s


def cmkd_objective(z_s: Tensor, z_t: Tensor, y: Tensor, cfg: CMKDConfig) -> dict[str, Tensor]:
    t = cfg.temperature
    ys, yt = F.softmax(z_s / t, dim=1), F.softmax(z_t.detach() / t, dim=1)
    if cfg.standardize:
        ys, yt = standardize_rows(ys), standardize_rows(yt)
    lp = 1.0 - pearson_rows(ys, yt)
    ls = 1.0 - spearman_rows(ys, yt, cfg.rank_eps)
    d = sample_difficulty(z_t, y, cfg.difficulty, cfg.difficulty_temperature)
    w_p, w_s = correlation_weights(d, cfg.weighting, cfg.spearman_share)
    intra = dist_intra(ys, yt)
    ce = F.cross_entropy(z_s, y)
    loss = ce + cfg.w_kd * t * t * ((w_p * lp + w_s * ls).mean() + cfg.g_intra * intra)
    return {"loss": loss, "ce": ce.detach(), "pearson": lp.mean().detach(), "spearman": ls.mean().detach(),
            "intra": intra.detach(), "difficulty": d.mean()}


@register_method
class CMKD(OfflineMethod):
    name = "cmkd"
    Config = CMKDConfig
    cfg: CMKDConfig

    @classmethod
    def void_knobs(cls, cfg: CMKDConfig, recipe: Recipe, steps_per_epoch: int | None = None) -> dict[str, Void]:
        return {**off_with("w_kd", cfg.w_kd, ("temperature", "g_intra", "standardize", "rank_eps", "difficulty",
                                             "weighting", "spearman_share", "difficulty_temperature"),
                         "correlation terms"),
                **({"spearman_share": Void(f"weighting={cfg.weighting} sets w_S itself")}
                   if cfg.weighting != "fixed" and cfg.w_kd != 0 else {})}

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        return cmkd_objective(*self.logits(batch.x), batch.y, self.cfg)
