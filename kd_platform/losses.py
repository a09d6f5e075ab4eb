"""Loss functions shared by several methods. The target side is always detached."""
from __future__ import annotations

import functools
import operator
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


def total(terms: Iterable[Tensor]) -> Tensor:
    """The sum of loss terms in order, as ``sum`` adds them but typed as a tensor (``sum`` of
    no terms would be the integer 0, which cannot be back-propagated)."""
    return functools.reduce(operator.add, terms)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's KD term ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` with batch-mean reduction."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def mean_kd_to_peers(logits: list[Tensor], i: int, temperature: float) -> Tensor:
    """Mean of ``KD(z_i || z_j)`` over every ``j != i`` (targets detached)."""
    terms = [kd_loss(logits[i], z, temperature) for j, z in enumerate(logits) if j != i]
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------
# Correlation-based terms (DIST, CMKD). Rows are the unit of correlation;
# callers transpose to correlate across the batch instead.
# ---------------------------------------------------------------------------


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; shape ``(N,)``.

    ``eps`` floors the product of the two centred row norms, so a constant row
    scores 0 (uncorrelated) instead of NaN, with a finite gradient.
    """
    a_c = a - a.mean(dim=1, keepdim=True)
    b_c = b - b.mean(dim=1, keepdim=True)
    num = (a_c * b_c).sum(dim=1)
    # Clamp before the sqrt: clamping after it would still backpropagate
    # through sqrt(0) and turn 0 * inf into NaN.
    sq = (a_c.pow(2).sum(dim=1) * b_c.pow(2).sum(dim=1)).clamp_min(eps * eps)
    return num / sq.sqrt()


def dist_inter(ys: Tensor, yt: Tensor) -> Tensor:
    """DIST inter-class term ``1 - mean_i pearson(ys_i, yt_i)`` (rows = samples); ``yt`` is detached."""
    return 1.0 - pearson_rows(ys, yt.detach()).mean()


def dist_intra(ys: Tensor, yt: Tensor) -> Tensor:
    """DIST intra-class term: :func:`dist_inter` on the transposes (rows = classes, across the batch)."""
    return 1.0 - pearson_rows(ys.t(), yt.detach().t()).mean()


def soft_rank(x: Tensor, eps: Tensor | float) -> Tensor:
    """Differentiable 1-based rank of each row: ``1 + sum_{k != j} sigmoid((x_j - x_k) / eps)``.

    ``eps`` is an absolute temperature: a float, or a tensor of shape ``(N,)``
    or ``(N, 1)`` giving one value per row. As ``eps -> 0`` this tends to
    :func:`exact_rank` (ties included, since ``sigmoid(0) = 1/2`` splits them
    evenly, which is exactly the averaged rank). Cost is ``O(N * C^2)`` memory.
    """
    if isinstance(eps, Tensor):
        eps = eps.to(dtype=x.dtype, device=x.device)
        if eps.dim() == x.dim() - 1:
            eps = eps.unsqueeze(-1)
        eps = eps.unsqueeze(-1)  # broadcast over the (j, k) pair axes
    diff = x.unsqueeze(-1) - x.unsqueeze(-2)  # [..., j, k] = x_j - x_k
    # The k == j term is sigmoid(0) = 1/2; summing over all k and correcting
    # is cheaper than masking the diagonal.
    return 0.5 + torch.sigmoid(diff / eps).sum(dim=-1)


def exact_rank(x: Tensor) -> Tensor:
    """1-based rank of each row, ties given their average rank (as ``scipy.stats.rankdata``).

    Not differentiable and never part of the graph: CMKD uses it for the
    teacher's ranks, which are exact; only the student's ranks are soft.
    Averaging ties makes it the ``eps -> 0`` limit of :func:`soft_rank`.
    """
    x = x.detach()
    diff = x.unsqueeze(-1) - x.unsqueeze(-2)
    below = (diff > 0).sum(dim=-1).to(x.dtype)
    tied = (diff == 0).sum(dim=-1).to(x.dtype)  # counts the element itself
    return 1.0 + below + 0.5 * (tied - 1.0)


def spearman_rows(student: Tensor, teacher: Tensor, rank_eps: float = 0.01) -> Tensor:
    """Per-row Spearman correlation between soft student ranks and exact teacher ranks; shape ``(N,)``.

    The soft-rank temperature of each row is ``rank_eps`` times that student
    row's range (max - min), detached so it acts as a fixed scale rather than
    a quantity the student can shrink. Gradient flows to ``student`` only.
    """
    s_range = (student.amax(dim=1) - student.amin(dim=1)).detach()
    scale = rank_eps * s_range
    # A constant row has every pairwise difference 0, so any positive scale
    # gives the same (constant) soft ranks; 1 keeps the gradient moderate
    # instead of dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return pearson_rows(soft_rank(student, scale), exact_rank(teacher))


def standardize_rows(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Z-score each row (population std); ``eps`` floors the std so constant rows map to 0."""
    centred = x - x.mean(dim=1, keepdim=True)
    var = centred.pow(2).mean(dim=1, keepdim=True)
    # Floor the variance, not the std, so sqrt never sees 0 in backward.
    return centred / var.clamp_min(eps * eps).sqrt()
