"""The baselines sam, swa, one and dkd, and dist's and cmkd's fidelity knobs, against
computations that do not use the methods' code (hand-written passes, NumPy formulas)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kd_platform.methods.base import Batch, BuildEnv, StepContext
from kd_platform.methods.sam import SAM, SAMConfig
from kd_platform.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny() -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Linear on 4 features, 3 classes, in float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()


def _env(epochs: int = 5) -> BuildEnv:
    return BuildEnv(Recipe(epochs=epochs), num_classes=3, in_channels=1, image_size=1, make_model=lambda _: _tiny())


def _batch(seed: int, n: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch([torch.randn(n, 4, generator=g, dtype=torch.float64)], torch.randint(0, 3, (n,), generator=g))


def _step(method, opt: torch.optim.Optimizer, batch: Batch, ctx: StepContext) -> dict:
    return method.optimizer_step(lambda: method.training_step(batch, ctx), opt, ctx)


def _ctx(epoch: int = 0, step: int = 0, steps: int = 1, epochs: int = 5) -> StepContext:
    return StepContext(epoch, epochs, step, steps, epoch * steps + step)


# --- sam ---------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_is_the_gradient_at_the_perturbed_weights(adaptive: bool) -> None:
    rho, lr = 0.3, 0.1
    method = SAM(SAMConfig(rho=rho, adaptive=adaptive), _env())
    ref = copy.deepcopy(method.net)
    names = [n for n, _ in ref.named_parameters()]
    w = {n: p.detach().clone() for n, p in ref.named_parameters()}
    buffers = {n: b.clone() for n, b in ref.named_buffers()}
    batch = _batch(1)

    def loss_at(params: dict, bufs: dict) -> torch.Tensor:
        return F.cross_entropy(functional_call(ref, {**params, **bufs}, (batch.x,)), batch.y)

    # By hand: one flat vector of every gradient, the ball's step, the gradient up there.
    at_w = {n: v.clone().requires_grad_(True) for n, v in w.items()}
    g = torch.autograd.grad(loss_at(at_w, buffers), [at_w[n] for n in names])  # moves `buffers` once
    flat_g = torch.cat([x.flatten() for x in g])
    flat_t = torch.cat([w[n].abs().flatten() for n in names]) if adaptive else torch.ones_like(flat_g)
    flat_eps = rho * flat_t ** 2 * flat_g / torch.linalg.vector_norm(flat_t * flat_g)
    eps = dict(zip(names, torch.split(flat_eps, [w[n].numel() for n in names])))
    up = {n: (w[n] + eps[n].view_as(w[n])).requires_grad_(True) for n in names}
    g_up = torch.autograd.grad(loss_at(up, {n: b.clone() for n, b in ref.named_buffers()}), [up[n] for n in names])
    expected = {n: w[n] - lr * gu for n, gu in zip(names, g_up)}

    opt = torch.optim.SGD(method.net.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    terms = _step(method, opt, batch, _ctx())
    got = dict(method.net.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n].detach(), expected[n], rtol=1e-10, atol=1e-12)
    # It is not plain SGD: the perturbation changed the step.
    plain = torch.cat([(w[n] - lr * gw).flatten() for n, gw in zip(names, g)])
    assert not torch.allclose(torch.cat([got[n].detach().flatten() for n in names]), plain, atol=1e-6)
    # The loss logged is the one at w; BatchNorm saw one batch, at w.
    assert terms["loss"].item() == pytest.approx(loss_at(w, {n: b.clone() for n, b in ref.named_buffers()}).item())
    for n, b in method.net.named_buffers():
        torch.testing.assert_close(b, buffers[n])
    assert int(method.net[1].num_batches_tracked) == 1


def test_sam_with_zero_radius_is_plain_sgd() -> None:
    method = SAM(SAMConfig(rho=0.0), _env())
    ref = copy.deepcopy(method.net)
    batch = _batch(2)
    F.cross_entropy(ref(batch.x), batch.y).backward()
    expected = [p.detach() - 0.1 * p.grad for p in ref.parameters()]
    _step(method, torch.optim.SGD(method.net.parameters(), lr=0.1), batch, _ctx())
    for p, e in zip(method.net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
