"""``sam``: sharpness-aware minimisation (Foret et al., ICLR 2021); ``adaptive`` gives ASAM
(Kwon et al., ICML 2021). One network with ``ce``'s loss (label smoothing included) and a
two-pass update: the flat-minima baseline OKDPH compares with.

Each step takes the gradient ``g`` at the weights ``w``, climbs to the worst point of a ball
of radius ``rho`` around them to first order,

    eps = rho g / ||g||                      (SAM)
    eps = rho T^2 g / ||T g||,  T = |w|      (ASAM, ``adaptive``: the ball scales with each weight)

with ``||.||`` the L2 norm over every parameter together, and lets the run's optimiser (the
recipe's SGD, its momentum and weight decay included) step ``w`` with the gradient taken at
``w + eps``. The second forward leaves BatchNorm's running statistics exactly as the first
left them, so they describe the network at ``w``. The loss terms logged are the first pass's,
the loss at ``w``. Defaults: rho = 0.05 (Foret et al.'s CIFAR value; ASAM's CIFAR runs use a
larger ball, about 0.5 to 1.0). Under data parallelism both backward passes average the
gradients over the workers, so every worker computes the same ``eps``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from kd_platform.config.knobs import knob
from kd_platform.config.recipe import Recipe
from kd_platform.methods.base import StepContext, Void, off_with
from kd_platform.methods.ce import CE, CEConfig
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class SAMConfig(CEConfig):
    rho: float = knob(0.05, low=0.0, high=10.0, help="radius of the neighbourhood the sharpness is taken over")
    adaptive: bool = knob(False, help="ASAM: a ball scaled by |w| per weight instead of a fixed one")


@torch.no_grad()
def sam_perturbation(params: list[nn.Parameter], rho: float, adaptive: bool) -> list[Tensor]:
    """``eps`` for every parameter (that has a gradient) from the gradients stored in ``.grad``."""
    grads = [p.grad for p in params if p.grad is not None]
    scaled = [g * p.abs() if adaptive else g for g, p in zip(grads, params)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    factor = rho / norm.clamp_min(1e-12)  # a zero gradient: no step up, not a division by zero
    return [s * p.abs() * factor if adaptive else s * factor for s, p in zip(scaled, params)]


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Whatever runs inside leaves ``module``'s buffers (BatchNorm's running statistics and
    batch count) as it found them."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


@register_method
class SAM(CE):
    """``ce``'s network and loss, trained with SAM's two-pass step."""
    name = "sam"
    Config = SAMConfig
    cfg: SAMConfig

    @classmethod
    def void_knobs(cls, cfg: SAMConfig, recipe: Recipe, steps_per_epoch: int | None = None) -> dict[str, Void]:
        return off_with("rho", cfg.rho, ("adaptive",), "perturbation")

    def optimizer_step(self, loss_terms: Callable[[], dict[str, Tensor]], opt: torch.optim.Optimizer,
                       ctx: StepContext) -> dict[str, Tensor]:
        terms = loss_terms()
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        eps = sam_perturbation(params, self.cfg.rho, self.cfg.adaptive)
        at_w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        opt.zero_grad(set_to_none=True)
        with buffers_kept(self):
            loss_terms()["loss"].backward()
        with torch.no_grad():  # back to w exactly (w + eps - eps would round)
            for p, w in zip(params, at_w):
                p.copy_(w)
        opt.step()
        return terms
