"""Fused peers: N students as one stacked model compute what N separate networks compute.

Every comparison runs in float64 on tiny inputs, against the unfused form built from the same
seed, so any difference beyond rounding (1e-10) is a real difference in the mathematics.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DataStub

from kd_platform.errors import UsageError
from kd_platform.methods.base import Batch, StepContext
from kd_platform.models import build_model, model_names
from kd_platform.models.stacked import StackedNet, is_stackable, member_state_dict, side_by_side
from kd_platform.run.engine import RunSpec, build_method, train

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-10, atol=1e-10)
CPU = torch.device("cpu")


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _stackable_archs() -> list[str]:
    return [a for a in model_names() if is_stackable(build_model(a, 2, 3))]


def test_which_architectures_stack():
    archs = _stackable_archs()
    assert {"resnet8", "resnet32", "resnet110_bottleneck", "wrn_16_2", "vgg8", "resnet18", "mobilenetv2"} <= set(archs)
    # Channel concatenation (DenseNet) and channel shuffles (ShuffleNet) would mix the members.
    assert not {"densenet40_12", "shufflenetv1", "shufflenetv2"} & set(archs)
    with pytest.raises(ValueError, match="cannot be stacked"):
        StackedNet([build_model("densenet40_12", 10, 3)])


@pytest.mark.parametrize("arch", _stackable_archs())
def test_stacked_forward_backward_and_batchnorm_equal_separate_networks(arch, float64):
    torch.manual_seed(0)
    nets = [build_model(arch, 5, 3) for _ in range(2)]
    separate = copy.deepcopy(nets)
    stacked = StackedNet(nets)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    y = torch.randint(0, 5, (4,), generator=g)
    for x_in, per_view in ((side_by_side(views[:1], 2), views[:1] * 2), (side_by_side(views, 2), views)):
        out = stacked(x_in)
        ref = torch.stack([n(v) for n, v in zip(separate, per_view)])
        torch.testing.assert_close(out, ref, **TOL)
        sum(F.cross_entropy(o, y) for o in out).backward()
        sum(F.cross_entropy(r, y) for r in ref).backward()
    for i, net in enumerate(separate):
        for name, p in net.named_parameters():
            torch.testing.assert_close(stacked.get_parameter("body." + name).grad[i], p.grad, **TOL, msg=name)
        # Two training forwards moved every member's BatchNorm statistics: each its own.
        for name, b in net.named_buffers():
            torch.testing.assert_close(stacked.get_buffer("body." + name)[i], b, **TOL, msg=name)
    stacked.eval(), [n.eval() for n in separate]
    torch.testing.assert_close(stacked(views[0]), torch.stack([n(views[0]) for n in separate]), **TOL)


def test_a_member_loads_into_the_plain_architecture(float64):
    torch.manual_seed(0)
    nets = [build_model("resnet8", 10, 1) for _ in range(2)]
    stacked = StackedNet(nets)
    plain = build_model("resnet8", 10, 1)
    plain.load_state_dict(member_state_dict(stacked.state_dict(), 1))
    x = torch.randn(3, 1, 8, 8)
    stacked.eval(), plain.eval()
    torch.testing.assert_close(plain(x), stacked(x)[1], **TOL)


def _pair(name: str, **knobs):
    """The same method fused and unfused, built from the same seed (so the same weights)."""
    methods = []
    for fused in ("true", "false"):
        spec = RunSpec.from_flat(name, {**knobs, "fused": fused}, 0)
        torch.manual_seed(0)
        methods.append(build_method(spec, DataStub(), CPU))
    assert methods[0].peers.fused and not methods[1].peers.fused
    return methods


def _steps(method, batches, lr=0.1):
    """A few optimiser steps as the engine takes them; returns the losses and the gradients."""
    opt = torch.optim.SGD(list(method.trainable_parameters()), lr=lr, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(5)  # OKDPH's Dirichlet draws
    history = []
    for step, batch in enumerate(batches):
        ctx = StepContext(0, 1, step, len(batches), step)
        terms = method(batch, ctx)
        opt.zero_grad()
        terms["loss"].backward()
        history.append(({k: v.detach().clone() for k, v in terms.items()}, _peer_grads(method)))
        opt.step()
        method.after_step(ctx)
    method.after_epoch(StepContext(0, 1, len(batches) - 1, len(batches), len(batches) - 1))
    return history


def _peer_grads(method) -> dict[str, torch.Tensor]:
    peers = method.peers
    if peers.fused:
        return {k[len("body."):]: p.grad.clone() for k, p in peers.stack.named_parameters()}
    names = [n for n, _ in peers.nets[0].named_parameters()]
    return {n: torch.stack([dict(net.named_parameters())[n].grad for net in peers.nets]) for n in names}


def _peer_states(method) -> list[dict[str, torch.Tensor]]:
    return [method.peers.member_state_dict(i) for i in range(method.peers.n)]


def _batches(views: int, n: int = 3, size: int = 12):
    g = torch.Generator().manual_seed(2)
    return [Batch([torch.randn(size, 1, 8, 8, generator=g) for _ in range(views)],
                  torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


CASES = {
    "okdph paper": ("okdph", {"n_students": 3, "same_init": False}),
    "okdph code variant": ("okdph", {"variant": "code", "same_init": False, "view_augments": ""}),
    "okdph fusion every batch": ("okdph", {"n_students": 2, "same_init": False, "fusion_unit": "batch",
                                           "fusion_interval": 1, "gamma": 0.5}),
    "okdph per-network views, detached hwm": ("okdph", {"views": "per_network", "hwm_grad": "false",
                                                        "same_init": False}),
    "dml": ("dml", {"n_students": 3}),
    "kdcl": ("kdcl", {"n_students": 2}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_training_equals_separate_training(case, float64):
    name, knobs = CASES[case]
    fused, separate = _pair(name, **knobs)
    batches = _batches(fused.num_views())
    for (terms_f, grads_f), (terms_s, grads_s) in zip(_steps(fused, batches), _steps(separate, batches)):
        for k in terms_s:
            torch.testing.assert_close(terms_f[k], terms_s[k], **TOL, msg=k)
        for k in grads_s:
            torch.testing.assert_close(grads_f[k], grads_s[k], **TOL, msg=k)
    # Parameters and every student's own BatchNorm statistics (and fusion, where it ran).
    for a, b in zip(_peer_states(fused), _peer_states(separate)):
        assert a.keys() == b.keys()
        for k in b:
            torch.testing.assert_close(a[k], b[k], **TOL, msg=k)
    fused.eval(), separate.eval()
    x = batches[0].views[0]
    ev_f, ev_s = fused.eval_networks(), separate.eval_networks()
    assert ev_f.keys() == ev_s.keys()
    for k in ev_s:  # students, ensemble and (OKDPH) the mean HWM
        torch.testing.assert_close(ev_f[k](x), ev_s[k](x), **TOL, msg=k)


def test_okdph_hybrid_and_fusion_match_the_unfused_ones(float64):
    fused, separate = _pair("okdph", n_students=3, same_init=False)
    r = torch.tensor([0.2, 0.5, 0.3])
    a, b = fused.peers.mixed_state(r, keep_grad=True), separate.peers.mixed_state(r, keep_grad=True)
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=k)
    fused.fuse(), separate.fuse()
    for sa, sb in zip(_peer_states(fused), _peer_states(separate)):
        for k in sb:
            torch.testing.assert_close(sa[k], sb[k], **TOL, msg=k)


def _one_epoch(fused: str, tmp=None):
    history = []

    def report(metrics, save):
        history.append(metrics)
        if tmp is not None:
            save(tmp)
    spec = RunSpec.from_flat("okdph", {"epochs": 1, "fused": fused, "fusion_unit": "batch",
                                       "fusion_interval": 5}, seed=3)
    train(spec, report)
    return history[-1]


def test_fused_and_unfused_runs_give_the_same_metrics_on_digits(tmp_path, float64):
    # In float64 through the whole engine (the data follows the default dtype): float32's other
    # kernels for grouped convolutions round differently, and one epoch of training at lr 0.1
    # amplifies that into a flipped prediction or two.
    a, b = _one_epoch("true", tmp_path), _one_epoch("false")
    for key in ("val/acc/students_mean", "val/acc/ensemble", "val/acc/hwm", "test/acc/students_mean"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert a["train/loss/loss"] == pytest.approx(b["train/loss/loss"], rel=1e-9)
    # The checkpoint records the layout: a resume that would resolve it otherwise is refused.
    spec = RunSpec.from_flat("okdph", {"epochs": 2, "fused": "false"}, seed=3)
    with pytest.raises(UsageError, match="fused=true"):
        train(spec, lambda m, s: None, resume_from=tmp_path)


def test_fused_needs_homogeneous_peers_and_a_stackable_architecture():
    with pytest.raises(UsageError, match="knob 'fused'.*'pcl'"):
        RunSpec.from_flat("pcl", {"fused": "true"}, 0)
    with pytest.raises(UsageError, match="knob 'fused'.*densenet40_12"):
        RunSpec.from_flat("okdph", {"fused": "true", "arch": "densenet40_12"}, 0)
    # auto never refuses: an unstackable architecture simply trains unfused.
    spec = RunSpec.from_flat("dml", {"fused": "auto", "arch": "densenet40_12"}, 0)
    assert not build_method(spec, DataStub(), CPU).peers.fused


@pytest.mark.slow
def test_compiled_fused_training_step_trains(tmp_path):
    history = []
    spec = RunSpec.from_flat("okdph", {"epochs": 1, "fused": "true", "compile": "on"}, seed=0)
    train(spec, lambda m, s: history.append(m))
    assert history[-1]["val/acc/students_mean"] > 20.0
