"""Pieces shared by the online methods (DML, KDCL, PCL, DKEL, IE-DML).

Peer evaluation with a logit ensemble, temporal-mean (EMA) teachers and their ramp-up,
multi-branch forwards with per-branch views, and the peer-teacher loss PCL and DKEL share.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.config.knobs import knob
from kd_platform.losses import kd_loss
from kd_platform.methods.base import MethodConfig

Logits = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MultiBranchConfig(MethodConfig):
    """Knobs of the multi-branch peer methods (PCL and DKEL, which builds on it)."""
    branches: int = knob(3, low=2, high=8, help="B, the number of peer branches")
    ema_decay: float = knob(0.999, low=0.0, high=1.0, help="decay of the EMA teacher (PCL: the temporal mean)")
    rampup_epochs: float = knob(80.0, low=0.0, high=100000.0,
                                help="R, epochs of the mean-teacher ramp-up of the KD weights (0: none)")
    temperature: float = knob(3.0, low=0.1, high=20.0, help="T of the KD terms")
    views: str = knob("shared", choices=("shared", "per_network"),
                      help="per_network: each branch sees its own augmented view")


def memo_forward(net: Callable[[Tensor], object]) -> Callable[[Tensor], object]:
    """``net`` remembering its output for the last input it saw.

    The engine evaluates every named network on the same batch in turn; several of our
    names read different heads of one forward, so this runs that forward once per batch.
    The cached input is held by reference, so its ``id`` cannot be reused while cached.
    Only valid while the weights do not change, i.e. within one evaluation.
    """
    last: dict[str, object] = {}

    def run(x: Tensor) -> object:
        if last.get("x") is not x:
            last["x"], last["out"] = x, net(x)
        return last["out"]
    return run


def detached_mean(terms: Sequence[Tensor]) -> Tensor:
    """Mean of scalar loss terms, for logging."""
    return torch.stack(list(terms)).mean().detach()


def peer_eval_networks(names: Sequence[str], run_all: Callable[[Tensor], Sequence[Tensor]],
                       extra_names: Sequence[str] = ()) -> dict[str, Logits]:
    """Each peer by name, ``ensemble`` (the mean of the peers' logits), then any extra members.

    ``run_all(x)`` returns the peers' logits followed by the extras'; it runs once per batch
    however many names read it (one stacked forward when the peers are fused)."""
    run = memo_forward(run_all)
    n = len(names)
    out: dict[str, Logits] = {name: (lambda x, i=i: run(x)[i]) for i, name in enumerate(names)}
    out["ensemble"] = lambda x: torch.stack(list(run(x)[:n])).mean(0)
    for j, name in enumerate(extra_names):
        out[name] = lambda x, i=n + j: run(x)[i]
    return out


def mean_teacher_rampup(epoch: float, length: float) -> float:
    """Laine & Aila's / Tarvainen & Valpola's ``exp(-5 (1 - min(e, R)/R)^2)``; 1 when R <= 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def freeze_parameters(net: nn.Module) -> nn.Module:
    """Keep ``net`` out of the optimiser and of DDP; unlike ``base.freeze`` it still follows
    ``train()``/``eval()``, because temporal-mean networks run in training mode."""
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def frozen_copy(net: nn.Module) -> nn.Module:
    return freeze_parameters(copy.deepcopy(net))


@torch.no_grad()
def ema_update_(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``theta_t <- decay * theta_t + (1 - decay) * theta_s`` over the parameters.

    Buffers are left alone on purpose: the temporal-mean networks run their own forwards in
    training mode (as in the mean-teacher code), so their BatchNorm statistics describe their
    own averaged weights rather than a lagging average of the student's statistics.
    """
    for t, s in zip(target.parameters(), source.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)


def multibranch_logits(net: nn.Module, views: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """``(branch_logits, ensemble_logits)`` of a multi-branch net.

    With one view this is the plain forward. With one view per branch the shared trunk runs
    once per view and branch ``b`` sees view ``b``, so each peer learns from its own
    augmentation while the ensemble head still sees every branch.
    """
    if len(views) == 1:
        return net(views[0])
    branches = cast(nn.ModuleList, net.branches)  # nn.Module's __getattr__ is typed Tensor | Module
    return net.classify([branch(net.trunk(v)) for branch, v in zip(branches, views)])


def multibranch_eval_networks(net: nn.Module, prefix: str, ensemble: str | None,
                              mean: str | None) -> dict[str, Logits]:
    """``{prefix}{b}`` for every branch, optionally the ensemble head and the branches' logit mean."""
    run = memo_forward(net)
    out: dict[str, Logits] = {f"{prefix}{b + 1}": (lambda x, b=b: run(x)[0][b])
                              for b in range(cast(int, net.num_branches))}
    if ensemble:
        out[ensemble] = lambda x: run(x)[1]
    if mean:
        out[mean] = lambda x: torch.stack(run(x)[0]).mean(0)
    return out


def peer_teacher_loss(z: list[Tensor], z_en: Tensor, m: list[Tensor], y: Tensor, r: float,
                      w: float, temperature: float) -> dict[str, Tensor]:
    """The branch losses PCL and DKEL share, summed over branches, plus ``CE(z_en)``.

    ``L_b = CE(z_b) + r KD(z_b || z_en) + r [w KD(z_b || mean_{b'!=b} m_b')
    + (1-w) mean_{b'!=b} KD(z_b || m_b')]``; PCL is the case ``w = 0``. Terms whose weight
    is zero are skipped, which changes no value and no gradient.
    """
    t, target = temperature, z_en.detach()
    ce = [F.cross_entropy(zb, y) for zb in z]
    kd_en = [kd_loss(zb, target, t) for zb in z]
    kd_mean, kd_each = [], []
    for b, zb in enumerate(z):
        others = [mb.detach() for j, mb in enumerate(m) if j != b]
        kd_mean.append(kd_loss(zb, torch.stack(others).mean(0), t) if w > 0 else zb.new_zeros(()))
        kd_each.append(torch.stack([kd_loss(zb, o, t) for o in others]).mean() if w < 1
                       else zb.new_zeros(()))
    ce_en = F.cross_entropy(z_en, y)
    peer = [w * a + (1.0 - w) * c for a, c in zip(kd_mean, kd_each)]
    loss = ce_en + sum(c + r * k + r * p for c, k, p in zip(ce, kd_en, peer))
    return {"loss": loss, "ce_ensemble": ce_en.detach(), "ce_branches": detached_mean(ce),
            "kd_ensemble": detached_mean(kd_en), "kd_teacher": detached_mean(peer)}


@contextmanager
def gradients_for(net: nn.Module) -> Iterator[nn.Module]:
    """Let ``net``'s parameters (normally excluded from training) track gradients for a while."""
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield net
    finally:
        for p in params:
            p.requires_grad_(False)


def plain_sgd_step_(net: nn.Module, loss: Tensor, lr: float) -> None:
    """One momentum-free, decay-free SGD step of ``loss`` on ``net`` (inside :func:`gradients_for`).

    ``net`` is outside the method's optimiser and outside DDP, so under data parallelism its
    gradients are averaged over workers here, keeping every worker's copy identical.
    """
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            if world > 1:
                dist.all_reduce(g)
                g = g / world
            p.sub_(g, alpha=lr)
