"""OKDPH's mathematics against explicit, independent computations."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_method
from torch.func import functional_call

from kd_platform.losses import kd_loss
from kd_platform.methods.base import Batch, StepContext


def _hwm(m, x: torch.Tensor, r: torch.Tensor, keep_grad: bool) -> torch.Tensor:
    """The hybrid-weight model's logits, run on its own."""
    return functional_call(m.peers.nets[0], m.peers.mixed_state(r, keep_grad), (x,))


def _batch(n: int = 16, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch([torch.randn(n, 1, 8, 8, generator=g)], torch.randint(0, 10, (n,), generator=g))


def _perturb(method, scale: float = 0.05) -> None:
    """Make the students differ (they start identical with same_init), buffers included."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for net in method.peers.nets:
            for t in list(net.parameters()) + [b for b in net.buffers() if b.is_floating_point()]:
                t.add_(scale * torch.randn(t.shape, generator=g))
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.abs_().add_(0.1)


def _explicit_hybrid(method, r: torch.Tensor) -> torch.nn.Module:
    """A stand-alone network whose every float tensor is sum_i r_i * (student i's tensor)."""
    hybrid = copy.deepcopy(method.peers.nets[0])
    states = [net.state_dict() for net in method.peers.nets]
    mixed = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            mixed[key] = sum(float(r[i]) * states[i][key] for i in range(len(states)))
        else:
            mixed[key] = value
    hybrid.load_state_dict(mixed)
    return hybrid


@pytest.mark.parametrize("n", [2, 3])
def test_hwm_is_the_explicit_convex_combination(n):
    m = make_method("okdph", n_students=n, same_init=False)
    _perturb(m)
    r = torch.distributions.Dirichlet(torch.ones(n)).sample()
    state = m.peers.mixed_state(r, keep_grad=False)
    hybrid = _explicit_hybrid(m, r)
    for key, value in hybrid.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
    x = _batch().x
    m.eval(), hybrid.eval()
    torch.testing.assert_close(_hwm(m, x, r, keep_grad=False), hybrid(x), rtol=1e-4, atol=1e-5)


def test_hwm_gradient_reaches_students_scaled_by_r():
    m = make_method("okdph", n_students=3, same_init=False, hwm_grad="true")
    _perturb(m)
    m.train()
    r = torch.tensor([0.2, 0.5, 0.3])
    b = _batch()
    F.cross_entropy(_hwm(m, b.x, r, keep_grad=True), b.y).backward()

    hybrid = _explicit_hybrid(m, r)
    hybrid.train()
    F.cross_entropy(hybrid(b.x), b.y).backward()
    for i, net in enumerate(m.peers.nets):
        for (name, p), q in zip(net.named_parameters(), hybrid.parameters()):
            torch.testing.assert_close(p.grad, r[i] * q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_code_variant_hwm_gives_students_no_gradient():
    m = make_method("okdph", variant="code")
    assert m.hwm_grad is False and m.mix == "mean" and m.num_views() == 3
    b = _batch()
    # The HWM is built from detached copies: its loss is not even connected to the students.
    assert not F.cross_entropy(_hwm(m, b.x, m.mixing_weights(), m.hwm_grad), b.y).requires_grad
    assert m.training_step(b, StepContext(0, 1, 0, 1, 0))["ce_hwm"].requires_grad is False


def test_training_step_loss_matches_the_formula():
    m = make_method("okdph", n_students=2, omega=0.7, beta=0.6, temperature=3.0, same_init=False,
                    hwm_mix="mean")
    _perturb(m)
    b = _batch()
    terms = m.training_step(b, StepContext(0, 1, 0, 1, 0))
    z = [net(b.x) for net in m.peers.nets]
    z_h = _explicit_hybrid(m, torch.tensor([0.5, 0.5])).train()(b.x)
    target = torch.stack(z + [z_h]).mean(0)
    # KD written out: T^2 * KL(p_t || p_s), batch mean.
    def kd(s, t, T=3.0):
        p_t = F.softmax(t / T, 1)
        return T * T * (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = sum(0.7 * F.cross_entropy(zi, b.y) + 0.3 * F.cross_entropy(z_h, b.y) + 0.6 * kd(zi, target)
                   for zi in z)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kd_loss(z[0], target, 3.0), kd(z[0], target), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 0.5])
def test_fusion(gamma):
    m = make_method("okdph", n_students=3, same_init=False, gamma=gamma)
    _perturb(m)
    before = [copy.deepcopy(net.state_dict()) for net in m.peers.nets]
    m.fuse()
    for i, net in enumerate(m.peers.nets):
        for key, value in net.state_dict().items():
            if not value.is_floating_point():
                continue
            mean = sum(s[key] for s in before) / 3
            torch.testing.assert_close(value, gamma * mean + (1 - gamma) * before[i][key], rtol=1e-5, atol=1e-6)
    if gamma == 1.0:  # every student is now the same network
        a, b = m.peers.nets[0].state_dict(), m.peers.nets[2].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_fusion_schedule_by_batch_and_epoch():
    calls = []
    m = make_method("okdph", fusion_interval=5, fusion_unit="batch")
    m.fuse = lambda: calls.append("fuse")
    for step in range(12):
        m.after_step(StepContext(0, 1, step, 12, step))
    assert len(calls) == 2  # after steps 5 and 10
    m.after_epoch(StepContext(0, 1, 11, 12, 11))
    assert len(calls) == 2
    calls.clear()
    m = make_method("okdph", fusion_interval=2, fusion_unit="epoch")
    m.fuse = lambda: calls.append("fuse")
    for epoch in range(4):
        m.after_step(StepContext(epoch, 4, 0, 1, epoch))
        m.after_epoch(StepContext(epoch, 4, 0, 1, epoch))
    assert len(calls) == 2  # after epochs 2 and 4
    calls.clear()
    m = make_method("okdph", fusion_interval=0, fusion_unit="batch")
    m.fuse = lambda: calls.append("fuse")
    m.after_step(StepContext(0, 1, 0, 1, 0))
    assert calls == []


def test_mean_versus_dirichlet_mixing():
    mean = make_method("okdph", n_students=4, hwm_mix="mean", same_init=False)
    assert torch.equal(mean.mixing_weights(), torch.full((4,), 0.25))
    dirichlet = make_method("okdph", n_students=4, hwm_mix="dirichlet", alpha=2.0)
    torch.manual_seed(0)
    draws = torch.stack([dirichlet.mixing_weights() for _ in range(4000)])
    assert torch.allclose(draws.sum(1), torch.ones(4000), atol=1e-5) and (draws > 0).all()
    # Dirichlet(alpha * 1_N): mean 1/N, variance (1/N)(1 - 1/N) / (N alpha + 1).
    torch.testing.assert_close(draws.mean(0), torch.full((4,), 0.25), atol=0.01, rtol=0)
    torch.testing.assert_close(draws.var(0), torch.full((4,), 0.25 * 0.75 / 9), atol=0.003, rtol=0)


def test_paper_variant_defaults():
    m = make_method("okdph")
    assert m.mix == "dirichlet" and m.hwm_grad is True and m.num_views() == 1
    assert set(m.eval_networks()) == {"student1", "student2", "hwm", "ensemble"}
    a, b = m.peers.nets[0].state_dict(), m.peers.nets[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same_init
