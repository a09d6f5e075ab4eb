"""Evaluation of a method's networks on one split: accuracy, calibration and, for online
methods, how different the peers still are.

Per network: top-1 accuracy (%), expected calibration error (%; Guo et al. 2017, 15
equal-width confidence bins) and the mean negative log-likelihood. Across the students of an
online method: pairwise prediction disagreement (%), the mean pairwise symmetric KL divergence
of their softmax outputs (``KL(p||q) + KL(q||p)``, in nats, averaged over samples and pairs)
and, for homogeneous peers, their relative parameter distance. A degenerate run whose peers
are one network (e.g. OKDPH with shared initialisation, shared views and no HWM gradient) is
thereby visible: every diversity figure is 0 and ``diversity/identical`` is 1.

Everything is summed on the device and reduced across data-parallel ranks once per split.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from kd_platform.methods.base import Method

ECE_BINS = 15


def _all_reduce(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def calibration_bins(log_probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> Tensor:
    """``(3, bins)``: per confidence bin ``((m-1)/M, m/M]`` the sample count, the summed
    confidence and the number correct, in float64."""
    conf, pred = log_probs.max(1)
    conf = conf.exp().double()
    b = (torch.ceil(conf * bins).long() - 1).clamp_(0, bins - 1)
    out = torch.zeros(3, bins, dtype=torch.float64, device=log_probs.device)
    out[0].index_add_(0, b, torch.ones_like(conf))
    out[1].index_add_(0, b, conf)
    out[2].index_add_(0, b, (pred == y).double())
    return out


def expected_calibration_error(bins: Tensor) -> float:
    """ECE (%) from :func:`calibration_bins` sums: ``sum_m |n_correct_m - sum_conf_m| / n``."""
    n = float(bins[0].sum())
    return float(100.0 * (bins[2] - bins[1]).abs().sum() / max(n, 1.0))


def pairwise_divergence(log_probs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per pair ``(i, j)`` of networks (``itertools.combinations`` order): the number of
    samples where their predictions differ and the summed symmetric KL of their softmaxes."""
    preds = [lp.argmax(1) for lp in log_probs]
    disagree, kl = [], []
    for a, b in itertools.combinations(range(len(log_probs)), 2):
        la, lb = log_probs[a].double(), log_probs[b].double()
        disagree.append((preds[a] != preds[b]).sum().double())
        kl.append(((la.exp() - lb.exp()) * (la - lb)).sum())  # KL(a||b) + KL(b||a), summed over samples
    return torch.stack(disagree), torch.stack(kl)


def relative_parameter_distance(stacks: dict[str, Tensor]) -> float:
    """Mean over pairs of peers of ``||theta_i - theta_j|| / mean(||theta_i||, ||theta_j||)``
    over all parameters; ``stacks`` holds each parameter stacked along a leading peer dimension."""
    gram = None
    for t in stacks.values():
        flat = t.detach().double().reshape(len(t), -1)
        g = flat @ flat.T
        gram = g if gram is None else gram + g
    assert gram is not None
    norms = gram.diagonal().clamp_min(0).sqrt()
    dists = []
    for i, j in itertools.combinations(range(len(gram)), 2):
        d2 = (gram[i, i] + gram[j, j] - 2 * gram[i, j]).clamp_min(0)
        dists.append(float(d2.sqrt() / max(float(norms[i] + norms[j]) / 2, 1e-30)))
    return float(np.mean(dists))


def _diversity_applies(method: Method) -> bool:
    return method.kind == "online" and len(method.students) >= 2


@torch.no_grad()
def evaluate(method: Method, data: Any, split: str, device: torch.device, reduce: bool = True) -> dict[str, float]:
    """Metrics of every network the method names on ``split``, keyed ``acc/<network>``,
    ``ece/<network>``, ``nll/<network>`` (plus the students' and groups' mean and best
    accuracy, and ``acc/best_network``) and, for online methods, ``diversity/*``.

    ``reduce=False`` keeps the sums local: a teacher trained by one DDP rank while the
    others wait for it must not enter a collective call they will never join."""
    method.eval()
    nets = method.eval_networks()
    names = list(nets)
    peers = [names.index(s) for s in method.students] if _diversity_applies(method) else []
    pairs = len(peers) * (len(peers) - 1) // 2
    correct = torch.zeros(len(names), dtype=torch.float64, device=device)
    nll = torch.zeros(len(names), dtype=torch.float64, device=device)
    bins = torch.zeros(len(names), 3, ECE_BINS, dtype=torch.float64, device=device)
    disagree = torch.zeros(pairs, dtype=torch.float64, device=device)
    kl = torch.zeros(pairs, dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in data.eval_batches(split):
        log_probs = [F.log_softmax(fn(x).float(), 1) for fn in nets.values()]
        for i, lp in enumerate(log_probs):
            correct[i] += (lp.argmax(1) == y).sum()
            nll[i] += F.nll_loss(lp, y, reduction="sum").double()
            bins[i] += calibration_bins(lp, y)
        if pairs:
            d, k = pairwise_divergence([log_probs[i] for i in peers])
            disagree += d
            kl += k
        total += len(y)
    if reduce:
        for t in (correct, nll, bins, disagree, kl, total):
            _all_reduce(t)
    n = max(float(total), 1.0)
    out: dict[str, float] = {f"acc/{name}": float(100.0 * c / n) for name, c in zip(names, correct)}
    for group, members in {"students": method.students, **method.groups}.items():
        out[f"acc/{group}_mean"] = float(np.mean([out[f"acc/{m}"] for m in members]))
        out[f"acc/{group}_best"] = max(out[f"acc/{m}"] for m in members)
    out["acc/best_network"] = max(out[f"acc/{m}"] for m in names)
    for i, name in enumerate(names):
        out[f"ece/{name}"] = expected_calibration_error(bins[i])
        out[f"nll/{name}"] = float(nll[i] / n)
    if pairs:
        out.update(_diversity(method, float(disagree.mean()) / n, float(kl.mean()) / n))
    method.train()
    return out


def _diversity(method: Method, disagreement: float, kl: float) -> dict[str, float]:
    out = {"diversity/disagreement": 100.0 * disagreement, "diversity/kl": kl}
    stacks = method.peer_parameters()
    if stacks is not None:
        out["diversity/param_dist"] = relative_parameter_distance(stacks)
        identical = out["diversity/param_dist"] == 0.0
    else:
        identical = disagreement == 0.0 and kl == 0.0
    out["diversity/identical"] = float(identical)
    return out


def collapsed(metrics: dict[str, Any]) -> bool:
    """Whether an epoch's metrics say the students are one network (``val/diversity/identical``)."""
    return metrics.get("val/diversity/identical") == 1


def warning_tags(metrics: dict[str, Any]) -> dict[str, str]:
    """Run tags for what an epoch's metrics warn about: ``identical_peers`` when the students
    are one network."""
    return {"identical_peers": "true"} if collapsed(metrics) else {}
