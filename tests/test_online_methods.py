"""DML, KDCL, PCL, DKEL and IE-DML against explicit, independent computations."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_method

from kd_platform.losses import mean_kd_to_peers
from kd_platform.methods.base import Batch, StepContext
from kd_platform.methods.ie_parts import to_factor

STEPS_PER_EPOCH = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 16, seed: int = 1, views: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch([torch.randn(n, 1, 8, 8, generator=g) for _ in range(views)],
                 torch.randint(0, 10, (n,), generator=g))


def _ctx(global_step: int = 0) -> StepContext:
    return StepContext(global_step // STEPS_PER_EPOCH, 4, global_step % STEPS_PER_EPOCH, STEPS_PER_EPOCH,
                       global_step)


def _optimiser(method) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(method.trainable_parameters()), lr=0.1, momentum=0.9)


def _step(method, opt, global_step: int, seed: int = 1) -> dict:
    """One step the way the engine takes it: forward, backward, optimiser step, ``after_step``."""
    ctx = _ctx(global_step)
    method.train()
    terms = method(_batch(seed=seed, views=method.num_views()), ctx)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    opt.step()
    method.after_step(ctx)
    return terms


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _kd(zs: torch.Tensor, zt: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 KL(p_t || p_s), batch mean, written out from the definition."""
    p_t = torch.softmax(zt.detach() / t, 1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(zs / t, 1))).sum(1).mean() * t * t


# ---------------------------------------------------------------------------
# Every method: one engine step runs and every named network gives logits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,knobs", [
    ("dml", {}), ("dml", {"n_students": 3}), ("kdcl", {}), ("pcl", {}), ("pcl", {"views": "per_network"}),
    ("dkel", {}), ("dkel", {"variant": "code", "views": "per_network", "branches": 2}), ("iedml", {}),
    ("iedml", {"split_mode": "random", "distance": "cos"}),
])
def test_one_step_and_evaluation(name, knobs):
    m = make_method(name, **knobs)
    terms = _step(m, _optimiser(m), 0)
    assert torch.isfinite(terms["loss"]) and terms["loss"].requires_grad
    m.eval()
    x = _batch(n=5).x
    with torch.no_grad():
        outs = {k: fn(x) for k, fn in m.eval_networks().items()}
    assert set(m.students) <= set(outs)
    assert all(v.shape == (5, 10) for v in outs.values())


def test_trainable_parameters_exclude_temporal_copies_and_teachers():
    for name, frozen in (("pcl", "temporal"), ("dkel", "teacher")):
        m = make_method(name)
        trainable = {id(p) for p in m.trainable_parameters()}
        assert trainable and not trainable & {id(p) for p in getattr(m, frozen).parameters()}
        assert {id(p) for p in m.net.parameters()} <= trainable


# ---------------------------------------------------------------------------
# DML and KDCL
# ---------------------------------------------------------------------------

def _count_calls(modules) -> list[int]:
    counts = [0] * len(modules)
    for i, mod in enumerate(modules):
        mod.register_forward_hook(lambda mod, inp, out, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("name,n", [("dml", 2), ("dml", 3), ("kdcl", 2), ("kdcl", 4), ("iedml", 2)])
def test_exactly_one_forward_per_network_per_batch(name, n):
    """Counted at both ends of each network (stem and classifier), as IE-DML calls
    ``features`` then ``classify`` instead of the network itself."""
    m = make_method(name) if name == "iedml" else make_method(name, n_students=n)
    nets = m.nets if name == "iedml" else m.peers.nets
    stems = _count_calls([net.stem for net in nets])
    heads = _count_calls([net.fc for net in nets])
    m.training_step(_batch(), _ctx())
    assert stems == heads == [1] * n


def _hook_logits(nets) -> list:
    """Replace each network's output by a leaf tensor, so ``.grad`` is dL/dz of that network."""
    leaves: list = [None] * len(nets)

    def hook(mod, inp, out, i):
        leaves[i] = out.detach().requires_grad_(True)
        return leaves[i]
    for i, net in enumerate(nets):
        net.register_forward_hook(lambda mod, inp, out, i=i: hook(mod, inp, out, i))
    return leaves


@pytest.mark.parametrize("n", [2, 3])
def test_dml_targets_are_detached(n):
    """dL/dz_j must be the gradient of network j's own loss alone: no other network's KD term
    may send gradient into z_j through its target, and the loss is the sum of the N losses."""
    t = 2.0
    m = make_method("dml", n_students=n, temperature=t)
    leaves = _hook_logits(m.peers.nets)
    b = _batch()
    terms = m.training_step(b, _ctx())
    terms["loss"].backward()
    for j in range(n):
        z = [leaf.detach() for leaf in leaves]
        zj = z[j].clone().requires_grad_(True)
        own = F.cross_entropy(zj, b.y) + sum(_kd(zj, z[k], t) for k in range(n) if k != j) / (n - 1)
        (expected,) = torch.autograd.grad(own, zj)
        torch.testing.assert_close(leaves[j].grad, expected)


def test_dml_net1_loss_gives_net2_no_gradient():
    m = make_method("dml", temperature=1.0)
    b = _batch()
    z1, z2 = m.peers.nets[0](b.x), m.peers.nets[1](b.x)
    loss1 = F.cross_entropy(z1, b.y) + mean_kd_to_peers([z1, z2], 0, 1.0)
    loss1.backward()
    assert all(p.grad is None for p in m.peers.nets[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.peers.nets[0].parameters())


@pytest.mark.parametrize("n", [2, 3])
def test_kdcl_loss_and_detached_ensemble_target(n):
    a, t = 0.3, 4.0
    m = make_method("kdcl", n_students=n, alpha=a, temperature=t)
    leaves = _hook_logits(m.peers.nets)
    b = _batch()
    terms = m.training_step(b, _ctx())
    z = [leaf.detach() for leaf in leaves]
    ens = torch.stack(z).mean(0)
    expected_loss = sum((1 - a) * F.cross_entropy(zi, b.y) + a * _kd(zi, ens, t) for zi in z)
    torch.testing.assert_close(terms["loss"].detach(), expected_loss)
    terms["loss"].backward()
    for j in range(n):
        zj = z[j].clone().requires_grad_(True)
        own = (1 - a) * F.cross_entropy(zj, b.y) + a * _kd(zj, ens, t)
        (expected,) = torch.autograd.grad(own, zj)
        torch.testing.assert_close(leaves[j].grad, expected)


# ---------------------------------------------------------------------------
# Multi-branch student (PCL, DKEL)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,branches", [("pcl", 3), ("pcl", 2), ("dkel", 3), ("dkel", 4)])
def test_multibranch_shapes_and_ensemble_head_sees_every_branch(name, branches):
    m = make_method(name, branches=branches).eval()
    x = _batch(n=6).x
    with torch.no_grad():
        fmaps = m.net.features(x)
        z, z_en = m.net.classify(fmaps)
        assert len(fmaps) == len(z) == branches
        assert all(zb.shape == (6, 10) for zb in z) and z_en.shape == (6, 10)
        for b in range(branches):
            moved = list(fmaps)
            moved[b] = moved[b] + torch.rand_like(moved[b])
            z2, z2_en = m.net.classify(moved)
            assert not torch.allclose(z2_en, z_en), f"ensemble head ignores branch {b}"
            for j in range(branches):
                assert torch.equal(z2[j], z[j]) == (j != b)
    assert m.students == tuple(f"student{b + 1}" for b in range(branches))


def test_pcl_loss_matches_the_formula():
    t, r_len = 3.0, 4.0
    m = make_method("pcl", temperature=t, rampup_epochs=r_len)
    with torch.no_grad():  # make the temporal mean differ from the student
        for p in m.temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = _batch()
    ctx = _ctx(2 * STEPS_PER_EPOCH + 3)  # epoch index 2
    m.train()
    student, temporal = copy.deepcopy(m.net), copy.deepcopy(m.temporal)
    terms = m.training_step(b, ctx)
    z, z_en = student(b.x)
    with torch.no_grad():
        mt, _ = temporal(b.x)
    r = math.exp(-5 * (1 - 2 / r_len) ** 2)
    expected = F.cross_entropy(z_en, b.y)
    for i, zb in enumerate(z):
        peers = [_kd(zb, mt[j], t) for j in range(len(z)) if j != i]
        expected = expected + F.cross_entropy(zb, b.y) + r * _kd(zb, z_en, t) + r * sum(peers) / len(peers)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)


def test_pcl_temporal_mean_is_not_overwritten_and_follows_the_ema():
    m = make_method("pcl")
    opt = _optimiser(m)
    start = _params(m.temporal)
    torch.testing.assert_close(start, _params(m.net))  # a copy of the student to begin with
    _step(m, opt, 0)
    after0 = _params(m.temporal)
    student0 = _params(m.net)
    assert any(not torch.allclose(a, s) for a, s in zip(after0, student0)), "step 0 overwrote the copy"
    for old, s, new in zip(start, student0, after0):
        torch.testing.assert_close(new, 0.999 * old + 0.001 * s)
    _step(m, opt, 1, seed=2)
    for old, s, new in zip(after0, _params(m.net), _params(m.temporal)):
        torch.testing.assert_close(new, 0.999 * old + 0.001 * s)


def test_pcl_rampup_values():
    m = make_method("pcl")  # R = 80
    for e in (0, 1, 40, 79, 80, 200):
        assert m.rampup(e) == pytest.approx(math.exp(-5 * (1 - min(e, 80) / 80) ** 2), rel=1e-12)


# ---------------------------------------------------------------------------
# DKEL
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("lam,r_len,epochs", [(1.0, 80.0, (0, 1, 20, 40, 79, 80, 81, 299)),
                                              (0.1, 10.0, (0, 3, 10, 11))])
def test_dkel_paper_rampup(lam, r_len, epochs):
    m = make_method("dkel", variant="paper", lam=lam, rampup_epochs=r_len)
    for e in epochs:
        assert m.rampup(e) == pytest.approx(lam * math.exp(-5 * (1 - min(e, r_len) / r_len) ** 2), rel=1e-12)
    assert m.rampup(0) == pytest.approx(lam * math.exp(-5))
    assert m.rampup(r_len) == pytest.approx(lam)


def test_dkel_code_rampup():
    m = make_method("dkel", variant="code", lam=1.0, rampup_epochs=10.0)  # neither applies under code
    assert m.rampup(0) == pytest.approx(0.1 * math.exp(-5))
    for e in (1, 2, 40, 80):
        assert m.rampup(e) == pytest.approx(0.1 * math.exp(-5 * (1 - e / 0.1) ** 2), abs=1e-300)
        assert m.rampup(e) < 1e-100
    for e in (81, 150, 299):
        assert m.rampup(e) == pytest.approx(0.1)


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("k,expected", [
    (0.5, {0: 1.0, 1: math.exp(-0.5), 4: math.exp(-2.0), 9: math.exp(-4.5), 10: 0.0, 50: 0.0}),
    (1.0, {0: 1.0, 2: math.exp(-2.0), 4: math.exp(-4.0), 5: 0.0}),
    (0.05, {10: math.exp(-0.5), 92: math.exp(-4.6), 93: 0.0}),
])
def test_dkel_ensemble_weight(variant, k, expected):
    m = make_method("dkel", variant=variant, decay=k)
    for e, w in expected.items():
        assert m.ensemble_weight(e) == pytest.approx(w, rel=1e-12, abs=0.0)


def test_dkel_loss_matches_the_formula():
    t, k, lam, r_len = 3.0, 0.5, 1.0, 4.0
    m = make_method("dkel", temperature=t, decay=k, lam=lam, rampup_epochs=r_len, init_steps=0)
    b = _batch()
    ctx = _ctx(STEPS_PER_EPOCH + 1)  # epoch index 1
    m.train()
    student, teacher = copy.deepcopy(m.net), copy.deepcopy(m.teacher)
    terms = m.training_step(b, ctx)
    z, z_en = student(b.x)
    with torch.no_grad():
        mt, _ = teacher(b.x)
    r = lam * math.exp(-5 * (1 - 1 / r_len) ** 2)
    w = math.exp(-k * 1)
    expected = F.cross_entropy(z_en, b.y)
    for i, zb in enumerate(z):
        others = [mt[j] for j in range(len(z)) if j != i]
        to_mean = _kd(zb, torch.stack(others).mean(0), t)
        each = sum(_kd(zb, o, t) for o in others) / len(others)
        expected = expected + F.cross_entropy(zb, b.y) + r * _kd(zb, z_en, t) + r * (w * to_mean + (1 - w) * each)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)


def test_dkel_teacher_is_independent_of_the_student():
    m = make_method("dkel")
    assert any(not torch.equal(a, s) for a, s in zip(_params(m.teacher), _params(m.net)))


def test_dkel_code_variant_overwrites_the_teacher_on_the_first_step():
    m = make_method("dkel", variant="code")
    opt = _optimiser(m)
    _step(m, opt, 0)
    for t, s in zip(_params(m.teacher), _params(m.net)):
        assert torch.equal(t, s)
    before, _ = _params(m.teacher), _step(m, opt, 1, seed=2)
    for old, s, new in zip(before, _params(m.net), _params(m.teacher)):  # second update: a = 1 - 1/2
        torch.testing.assert_close(new, 0.5 * old + 0.5 * s)
    assert int(m.ema_updates) == 2


def test_dkel_paper_variant_initialises_the_teacher_then_follows_the_ema():
    lr, scale, a = 0.1, 0.01, 0.999
    m = make_method("dkel", variant="paper", lr=lr, init_lr_scale=scale, ema_decay=a)
    opt = _optimiser(m)
    b = _batch()
    # The initialisation step, taken independently: plain SGD on the mean branch CE.
    twin = copy.deepcopy(m.teacher).train()
    for p in twin.parameters():
        p.requires_grad_(True)
    z, _ = twin(b.x)
    grads = torch.autograd.grad(torch.stack([F.cross_entropy(zb, b.y) for zb in z]).mean(), list(twin.parameters()),
                                allow_unused=True)
    initialised = [p.detach() - lr * scale * (g if g is not None else 0) for p, g in zip(twin.parameters(), grads)]
    _step(m, opt, 0)
    assert int(m.teacher_init_steps) == 1 and int(m.ema_updates) == 1
    student = _params(m.net)
    for t, s in zip(_params(m.teacher), student):
        assert not torch.allclose(t, s)
    for init, s, t in zip(initialised, student, _params(m.teacher)):
        torch.testing.assert_close(t, a * init + (1 - a) * s)
    before = _params(m.teacher)
    _step(m, opt, 1, seed=2)
    for old, s, new in zip(before, _params(m.net), _params(m.teacher)):
        torch.testing.assert_close(new, a * old + (1 - a) * s)


def test_dkel_ema_waits_for_every_initialisation_step():
    m = make_method("dkel", variant="paper", init_steps=3)
    opt = _optimiser(m)
    for step in range(3):
        _step(m, opt, step, seed=step + 1)
        assert int(m.teacher_init_steps) == step + 1
        assert int(m.ema_updates) == (1 if step == 2 else 0)
    _step(m, opt, 3, seed=9)
    assert int(m.teacher_init_steps) == 3 and int(m.ema_updates) == 2


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_dkel_checkpoint_restores_teacher_and_counters(variant):
    m = make_method("dkel", variant=variant, init_steps=2)
    opt = _optimiser(m)
    for step in range(3):
        _step(m, opt, step, seed=step + 1)
    state = copy.deepcopy(m.state_dict())
    fresh = make_method("dkel", variant=variant, init_steps=2, seed=5)
    fresh.load_state_dict(state)
    assert int(fresh.teacher_init_steps) == 2 and int(fresh.ema_updates) == 2
    for t, u in zip(_params(m.teacher), _params(fresh.teacher)):
        assert torch.equal(t, u)
    assert fresh.ema_decay_now() == m.ema_decay_now()


def test_dkel_evaluates_teacher_branches_their_mean_students_and_ensemble():
    m = make_method("dkel", branches=3).eval()
    names = set(m.eval_networks())
    assert names == {"student1", "student2", "student3", "ensemble",
                     "teacher_branch1", "teacher_branch2", "teacher_branch3", "teacher_mean"}
    x = _batch(n=4).x
    with torch.no_grad():
        nets = m.eval_networks()
        mt, _ = m.teacher(x)
        torch.testing.assert_close(nets["teacher_mean"](x), torch.stack(mt).mean(0))
        torch.testing.assert_close(nets["ensemble"](x), m.net(x)[1])


# ---------------------------------------------------------------------------
# IE-DML
# ---------------------------------------------------------------------------

def test_iedml_target_factor_is_detached():
    m = make_method("iedml").train()
    b = _batch()
    fmaps = [net.features(b.x) for net in m.nets]
    inh, exp, recon = m.ie_terms(fmaps)
    (inh[0] - exp[0]).backward()  # network 1's IE terms, whose target is network 2's code
    assert all(p.grad is None for p in m.nets[1].parameters())
    assert all(p.grad is None for p in m.autoencoders[1].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.nets[0].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.splits[0].parameters())


def test_iedml_reconstruction_trains_only_the_autoencoders():
    m = make_method("iedml").train()
    b = _batch()
    fmaps = [net.features(b.x) for net in m.nets]
    _, _, recon = m.ie_terms(fmaps)
    sum(recon).backward()
    assert all(p.grad is None for net in m.nets for p in net.parameters())
    assert all(p.grad is not None for ae in m.autoencoders for p in ae.parameters())


def test_iedml_loss_matches_the_formula():
    l_inh, l_exp, t = 7.0, 3.0, 2.0
    m = make_method("iedml", l_inh=l_inh, l_exp=l_exp, temperature=t).train()
    b = _batch()
    clone = copy.deepcopy(m)
    terms = m.training_step(b, _ctx())
    fmaps = [net.features(b.x) for net in clone.nets]
    z = [net.classify(f) for net, f in zip(clone.nets, fmaps)]
    codes = [ae.encoder(f.detach()) for ae, f in zip(clone.autoencoders, fmaps)]
    recon = [(ae.decoder(c) - f.detach()).abs().mean() for ae, c, f in zip(clone.autoencoders, codes, fmaps)]
    expected = sum(recon)
    for i in range(2):
        target = to_factor(codes[1 - i]).detach()
        split = clone.splits[i]
        half = split.n_inherit
        f_i = F.normalize(split.inherit(fmaps[i][:, :half]).flatten(1), dim=1)
        f_e = F.normalize(split.explore(fmaps[i][:, half:]).flatten(1), dim=1)
        expected = expected + F.cross_entropy(z[i], b.y) + _kd(z[i], z[1 - i], t) \
            + l_inh * (f_i - target).abs().mean() - l_exp * (f_e - target).abs().mean()
    assert half == fmaps[0].shape[1] // 2
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-5)


def test_iedml_random_split_is_a_fixed_permutation_kept_in_the_state():
    m = make_method("iedml", split_mode="random")
    order = m.splits[0].order
    assert sorted(order.tolist()) == list(range(m.nets[0].feature_channels))
    assert not torch.equal(order, torch.arange(len(order)))
    assert "splits.0.order" in m.state_dict()
