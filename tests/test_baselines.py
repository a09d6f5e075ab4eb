"""The baselines sam, swa, one and dkd, and dist's and cmkd's fidelity knobs, against
computations that do not use the methods' code (hand-written passes, NumPy formulas)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_method
from scipy import special
from torch import nn
from torch.func import functional_call

from kd_platform.config.recipe import Recipe
from kd_platform.errors import UsageError
from kd_platform.methods.base import Batch, BuildEnv, StepContext
from kd_platform.methods.cmkd import CMKDConfig, cmkd_objective, sample_difficulty
from kd_platform.methods.dist import dist_objective
from kd_platform.methods.dkd import DKDConfig, decoupled_kd, dkd_objective, warmup_weight
from kd_platform.methods.sam import SAM, SAMConfig
from kd_platform.methods.swa import SWA, SWAConfig
from kd_platform.run.engine import RunSpec

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


# --- swa ---------------------------------------------------------------------


def _train_swa(method: SWA, epochs: int, steps: int, lr: float = 0.1):
    """The engine's loop in miniature: steps, after_epoch, before_eval, then the scheduler."""
    opt = torch.optim.SGD(method.trainable_parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    snapshots, applied, scheduled_seen = [], [], []
    for epoch in range(epochs):
        batches = [_batch(100 * epoch + s) for s in range(steps)]
        for s, batch in enumerate(batches):
            ctx = _ctx(epoch, s, steps, epochs)
            before = [p.detach().clone() for p in method.net.parameters()]
            scheduled = opt.param_groups[0]["lr"]
            _step(method, opt, batch, ctx)
            p0, b0 = next(iter(method.net.parameters())), before[0]
            applied.append(float(((b0 - p0.detach()) / p0.grad).flatten()[0]))  # lr of a plain SGD step
            scheduled_seen.append((scheduled, opt.param_groups[0]["lr"]))
        method.after_epoch(ctx)
        if epoch >= method.start:
            snapshots.append({n: p.detach().clone() for n, p in method.net.named_parameters()})
        method.before_eval(ctx, lambda batches=batches: iter(batches))
        sched.step()
    return snapshots, applied, scheduled_seen, batches


def test_swa_averages_snapshots_at_its_lr_and_recomputes_batchnorm() -> None:
    epochs, steps, swa_lr = 5, 3, 0.02
    method = SWA(SWAConfig(swa_start="2", swa_lr=swa_lr), _env(epochs))
    assert method.eval_networks()["swa"] is method.net  # nothing averaged yet: the SGD network
    snapshots, applied, scheduled_seen, last_batches = _train_swa(method, epochs, steps)
    assert len(snapshots) == 3 and int(method.swa.n_averaged) == 3

    # The average is the plain mean of the end-of-epoch snapshots.
    avg = {n: torch.stack([s[n] for s in snapshots]).mean(0) for n in snapshots[0]}
    for n, p in method.swa.module.named_parameters():
        torch.testing.assert_close(p, avg[n], rtol=1e-12, atol=1e-14)
    # Epochs 0-1 step with the cosine schedule's lr, epochs 2-4 with swa_lr; the optimiser's
    # lr is the schedule's again after every step.
    cosine = [0.1 * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    want = [cosine[e] if e < 2 else swa_lr for e in range(epochs) for _ in range(steps)]
    assert applied == pytest.approx(want, rel=1e-9)
    assert all(before == after for before, after in scheduled_seen)

    # BatchNorm of the average: the mean over the last epoch's batches of each batch's mean
    # and unbiased variance of the first layer's output under the averaged weights.
    h = [b.x @ avg["0.weight"].T + avg["0.bias"] for b in last_batches]
    bn = method.swa.module[1]
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in h]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0, unbiased=True) for x in h]).mean(0))
    assert bn.momentum == 0.1  # restored after the recomputation

    # What is evaluated as `swa` is the averaged network; `swa` is the student.
    method.eval()
    x = _batch(7).x
    torch.testing.assert_close(method.eval_networks()["swa"](x), functional_call(method.net, {
        **avg, **{f"1.{k}": v for k, v in bn.state_dict().items()}}, (x,)))
    assert method.students == ("swa",) and set(method.eval_networks()) == {"net", "swa"}


def test_swa_state_resumes() -> None:
    method = SWA(SWAConfig(swa_start="1", swa_lr=0.05, swa_anneal_epochs=2), _env(3))
    _train_swa(method, 3, 2)
    fresh = SWA(SWAConfig(swa_start="1", swa_lr=0.05, swa_anneal_epochs=2), _env(3))
    fresh.load_state_dict(method.state_dict())
    assert int(fresh.swa.n_averaged) == 2 and float(fresh.anneal_from) == float(method.anneal_from)
    for a, b in zip(fresh.swa.module.parameters(), method.swa.module.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("anneal, middle", [("linear", 0.5), ("cos", 0.5)])
def test_swa_lr_anneals_like_swalr(anneal: str, middle: float) -> None:
    method = SWA(SWAConfig(swa_start="2", swa_lr=0.01, swa_anneal_epochs=2, swa_anneal=anneal), _env(8))
    lrs = [method.swa_lr(e, 0.09) for e in range(2, 6)]  # the schedule's lr at the start is kept
    assert lrs == pytest.approx([0.09, 0.09 + middle * (0.01 - 0.09), 0.01, 0.01])
    # SWALR itself on a throwaway optimiser gives the same sequence.
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.09)
    swalr = torch.optim.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=2, anneal_strategy=anneal)
    want = []
    for _ in range(4):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        swalr.step()
    assert lrs == pytest.approx(want)


def test_swa_default_start_and_bad_starts() -> None:
    assert SWAConfig().start_epoch(300) == 225 and SWAConfig().start_epoch(1) == 0
    with pytest.raises(UsageError, match="swa_start"):
        RunSpec.from_flat("swa", {"swa_start": "2,3"}, 0)
    with pytest.raises(UsageError, match="swa_start"):
        make_method("swa", swa_start="5", epochs=5)


# --- one ---------------------------------------------------------------------


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    return special.log_softmax(z, axis=1)


@pytest.mark.parametrize("gate", ["fc", "fc_bn_relu"])
def test_one_gate_ensemble_and_loss_by_hand(gate: str) -> None:
    t = 3.0
    method = make_method("one", temperature=t, gate=gate).double()
    body = method.net.body
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(12) % 10
    with torch.no_grad():  # the network's own layers up to the pooled features; the rest by hand
        shared = body.trunk(x)
        pooled = [branch(shared).mean((2, 3)).numpy() for branch in body.branches]
        gap = shared.mean((2, 3)).numpy()
    heads = [(h.weight.detach().numpy(), h.bias.detach().numpy()) for h in body.heads]
    z = [p @ w.T + b for p, (w, b) in zip(pooled, heads)]
    fc = method.net.gate[0]
    a = gap @ fc.weight.detach().numpy().T + fc.bias.detach().numpy()
    if gate == "fc_bn_relu":
        bn = method.net.gate[1]
        a = (a - a.mean(0)) / np.sqrt(a.var(0) + bn.eps) * bn.weight.detach().numpy() + bn.bias.detach().numpy()
        a = np.maximum(a, 0.0)
    weights = np.exp(a - a.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    z_e = sum(weights[:, [i]] * z[i] for i in range(3))

    def ce(logits: np.ndarray) -> float:
        return float(-_np_log_softmax(logits)[np.arange(12), y.numpy()].mean())

    log_pe = _np_log_softmax(z_e / t)
    kd = [float(t * t * (np.exp(log_pe) * (log_pe - _np_log_softmax(zi / t))).sum(1).mean()) for zi in z]
    terms = method.training_step(Batch([x], y), _ctx())
    assert terms["loss"].item() == pytest.approx(ce(z_e) + sum(ce(zi) for zi in z) + sum(kd), rel=1e-9)
    assert terms["kd_ensemble"].item() == pytest.approx(np.mean(kd), rel=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(method.net.gate_weights(shared), torch.from_numpy(weights))

    # Every parameter learns (nothing idle to stall DDP); the gate only through CE(z_e).
    terms["loss"].backward()
    assert all(p.grad is not None for p in method.trainable_parameters())
    gate_grad = [p.grad.clone() for p in method.net.gate.parameters()]
    method.zero_grad()
    z_t, z_e_t = method.net(x)
    F.cross_entropy(z_e_t, y).backward()
    for got, want in zip(gate_grad, method.net.gate.parameters()):
        torch.testing.assert_close(got, want.grad)


def test_one_evaluates_branches_and_the_gated_ensemble() -> None:
    method = make_method("one", branches=4)
    method.eval()
    nets = method.eval_networks()
    assert list(nets) == ["student1", "student2", "student3", "student4", "ensemble"]
    assert method.students == ("student1", "student2", "student3", "student4")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        w = method.net.gate_weights(method.net.body.trunk(x))
        expected = sum(w[:, [i]] * nets[f"student{i + 1}"](x) for i in range(4))
        torch.testing.assert_close(nets["ensemble"](x), expected)
    assert not hasattr(method.net.body, "ensemble_head")


# --- dkd ---------------------------------------------------------------------


def _logits(n: int = 16, c: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_s = (2 * torch.randn(n, c, generator=g, dtype=torch.float64)).requires_grad_(True)
    z_t = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return z_s, z_t, torch.randint(0, c, (n,), generator=g)


def _np_dkd(z_s: np.ndarray, z_t: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    """TCKD and NCKD from explicit binary and renormalised non-target distributions."""
    tckd, nckd = [], []
    for s, tt, label in zip(z_s, z_t, y):
        p_s, p_t = special.softmax(s / t), special.softmax(tt / t)
        b_s, b_t = np.array([p_s[label], 1 - p_s[label]]), np.array([p_t[label], 1 - p_t[label]])
        q_s, q_t = np.delete(p_s, label) / (1 - p_s[label]), np.delete(p_t, label) / (1 - p_t[label])
        tckd.append((b_t * np.log(b_t / b_s)).sum())
        nckd.append((q_t * np.log(q_t / q_s)).sum())
    return t * t * float(np.mean(tckd)), t * t * float(np.mean(nckd))


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dkd_terms_match_the_paper_formula(t: float) -> None:
    z_s, z_t, y = _logits()
    tckd, nckd = decoupled_kd(z_s, z_t, y, t)
    want_t, want_n = _np_dkd(z_s.detach().numpy(), z_t.numpy(), y.numpy(), t)
    assert tckd.item() == pytest.approx(want_t, rel=1e-9)
    assert nckd.item() == pytest.approx(want_n, rel=1e-9)
    cfg = DKDConfig(alpha=1.5, beta=8.0, temperature=t)
    got = dkd_objective(z_s, z_t, y, cfg, weight=0.25)
    ce = -special.log_softmax(z_s.detach().numpy(), axis=1)[np.arange(16), y.numpy()].mean()
    assert got["loss"].item() == pytest.approx(ce + 0.25 * (1.5 * want_t + 8.0 * want_n), rel=1e-9)
    (grad_t,) = torch.autograd.grad(got["loss"], z_s)
    assert torch.isfinite(grad_t).all()


def test_dkd_decomposes_kd_per_sample() -> None:
    """KL(p_t || p_s) = TCKD + (1 - p_t[y]) NCKD for each sample (the paper's Eq. 4)."""
    z_s, z_t, y = _logits(6, 7, seed=3)
    t = 2.0
    for i in range(6):
        tckd, nckd = decoupled_kd(z_s[i:i + 1], z_t[i:i + 1], y[i:i + 1], t)
        p_t = F.softmax(z_t[i] / t, 0)
        kl = t * t * (p_t * (F.log_softmax(z_t[i] / t, 0) - F.log_softmax(z_s[i] / t, 0))).sum()
        assert (tckd + (1 - p_t[y[i]]) * nckd).item() == pytest.approx(kl.item(), rel=1e-9)


def test_dkd_warmup_reaches_one_after_warmup_epochs() -> None:
    assert warmup_weight(_ctx(0, 3, 4), 20.0) == pytest.approx(1 / 20)
    assert warmup_weight(_ctx(9, 1, 4), 20.0) == pytest.approx(9.5 / 20)
    assert warmup_weight(_ctx(19, 3, 4), 20.0) == 1.0 and warmup_weight(_ctx(30, 0, 4), 20.0) == 1.0
    assert warmup_weight(_ctx(0, 0, 4), 0.0) == 1.0
    cfg = RunSpec.from_flat("dkd", {}, 0).resolved()[1]
    assert (cfg.alpha, cfg.beta, cfg.temperature, cfg.warmup) == (1.0, 8.0, 4.0, 20.0)


# --- dist and cmkd fidelity knobs --------------------------------------------


def test_dist_defaults_to_the_released_t_squared_loss() -> None:
    cfg = RunSpec.from_flat("dist", {}, 0).resolved()[1]
    assert cfg.tau_squared is True and cfg.scale == pytest.approx(2.0 * 16)
    off = RunSpec.from_flat("dist", {"tau_squared": "false"}, 0).resolved()[1]
    assert off.scale == pytest.approx(2.0)
    z_s, z_t, y = _logits()
    ys, yt = special.softmax(z_s.detach().numpy() / 4, axis=1), special.softmax(z_t.numpy() / 4, axis=1)

    def one_minus_pearson(a: np.ndarray, b: np.ndarray) -> float:
        return 1 - float(np.mean([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)]))

    rel = one_minus_pearson(ys, yt) + one_minus_pearson(ys.T, yt.T)
    got = dist_objective(z_s, z_t, y, cfg)
    assert (got["loss"] - got["ce"]).item() == pytest.approx(2.0 * 16 * rel, rel=1e-9)
    with pytest.raises(UsageError, match="variant"):
        RunSpec.from_flat("dist", {"variant": "code"}, 0)


@pytest.mark.parametrize("kind", ["entropy", "margin"])
def test_cmkd_difficulty_temperature(kind: str) -> None:
    z_s, z_t, y = _logits(8, 5, seed=1)
    t_d = 4.0
    p = special.softmax(z_t.numpy() / t_d, axis=1)
    want = (-(p * np.log(p)).sum(1) / math.log(5) if kind == "entropy"
            else 1 - p[np.arange(8), y.numpy()])
    np.testing.assert_allclose(sample_difficulty(z_t, y, kind, t_d).numpy(), want, rtol=1e-12)
    got = cmkd_objective(z_s, z_t, y, CMKDConfig(difficulty=kind, difficulty_temperature=t_d))
    assert got["difficulty"].item() == pytest.approx(want.mean(), rel=1e-12)
    # The default keeps the plain softmax the difficulty was measured on before it was a knob.
    assert CMKDConfig().difficulty_temperature == 1.0
    plain = special.softmax(z_t.numpy(), axis=1)
    base = cmkd_objective(z_s, z_t, y, CMKDConfig(difficulty=kind))
    want_1 = (-(plain * np.log(plain)).sum(1) / math.log(5) if kind == "entropy"
              else 1 - plain[np.arange(8), y.numpy()])
    assert base["difficulty"].item() == pytest.approx(want_1.mean(), rel=1e-12)
    assert base["loss"].item() != pytest.approx(got["loss"].item(), rel=1e-6)
