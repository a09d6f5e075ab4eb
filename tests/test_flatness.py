"""Flatness measures against exact answers on a tiny model, restoration of weights and random
state, the ``flatness=final`` knob, and ``python -m analysis.flatness`` on a real run."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli, sqlite_uri
from torch import nn

from kd_platform.run import flatness

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(seed: int = 0) -> tuple[nn.Module, flatness.Batches]:
    """A float64 two-layer net (~150 parameters) on random data, trained a little towards a minimum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, [(x[:40], y[:40]), (x[40:], y[40:])]


def _exact_hessian(net: nn.Module, batches: flatness.Batches) -> torch.Tensor:
    from torch.func import functional_call
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            params[name] = theta[i:i + n].view(shape)
            i += n
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
    return torch.autograd.functional.hessian(loss, flat)


def test_hutchinson_trace_and_power_iteration_match_the_exact_hessian(one_thread):
    net, batches = _tiny()
    h = _exact_hessian(net, batches)
    exact_trace = float(torch.trace(h))
    few = flatness.hessian_trace(net, batches, probes=8, seed=1)
    assert few.stderr > 0
    assert abs(few.value - exact_trace) < 4 * few.stderr
    many = flatness.hessian_trace(net, batches, probes=400, seed=2)
    assert abs(many.value - exact_trace) < 4 * many.stderr
    assert abs(many.value - exact_trace) < 0.1 * abs(exact_trace)
    eig = torch.linalg.eigvalsh(h)
    dominant = float(eig[eig.abs().argmax()])
    assert dominant == pytest.approx(float(eig.max()))  # near a minimum the dominant one is the top
    top = flatness.top_eigenvalue(net, batches, iters=1000, seed=3, tol=1e-10)
    assert top == pytest.approx(dominant, rel=1e-6)


def test_sharpness_is_nonnegative_zero_at_rho_zero_and_restores_the_weights(one_thread):
    net, batches = _tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    s = flatness.sharpness(net, batches, rho=0.05)
    assert s > 0.0
    assert flatness.sharpness(net, batches, rho=0.0) == 0.0
    assert flatness.sharpness(net, batches, rho=1e-9) >= 0.0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert flatness.sharpness(net, batches, rho=0.2) >= s  # a larger ball holds at least as sharp a point


def test_interpolation_endpoints_are_the_networks_own_losses(one_thread):
    a, batches = _tiny(0)
    b, _ = _tiny(1)
    b[0].weight.data += 0.3
    curve = flatness.interpolate([a, b], ["a", "b"], batches, points=5)
    assert curve.t == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert curve.loss[0] == flatness.loss_and_accuracy(a, batches)[0]
    assert curve.loss[-1] == flatness.loss_and_accuracy(b, batches)[0]
    assert curve.accuracy[-1] == flatness.loss_and_accuracy(b, batches)[1]
    path = flatness.interpolate([a, b, a], ["a", "b", "a"], batches, points=3)
    assert path.t == (0.0, 0.5, 1.0, 1.5, 2.0)
    assert path.loss[2] == curve.loss[-1] and path.loss[-1] == curve.loss[0]


def test_surface_and_plots(one_thread, tmp_path):
    net, batches = _tiny()
    before = [p.clone() for p in net.parameters()]
    surf = flatness.surface(net, batches, grid=3, seed=0)
    assert len(surf.loss) == 3 and len(surf.loss[0]) == 3
    assert surf.loss[1][1] == pytest.approx(flatness.loss_and_accuracy(net, batches)[0])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    curve = flatness.interpolate([net, net], ["x", "y"], batches, points=3)
    for path in (flatness.plot_surface(surf, "net", tmp_path / "s.png"),
                 flatness.plot_interpolation([curve], tmp_path / "i.png")):
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_flatness_final_adds_metrics_and_leaves_the_method_as_it_was(one_thread):
    from kd_platform.data import build_data
    from kd_platform.run import engine
    spec = engine.RunSpec.from_flat("okdph", {"epochs": 1, "flatness": "final", "flatness_samples": 48,
                                              "flatness_probes": 2}, 0)
    final = engine.train(spec, lambda metrics, save: None)
    for net in ("student1", "student2", "hwm"):
        for measure in ("hessian_trace", "top_eig", "sharpness", "hessian_trace_se", "loss"):
            assert math.isfinite(final[f"flat/{measure}/{net}"]), (measure, net)
        assert final[f"flat/sharpness/{net}"] >= 0

    off = engine.train(engine.RunSpec.from_flat("okdph", {"epochs": 1}, 0), lambda metrics, save: None)
    assert not any(k.startswith("flat/") for k in off)

    data = build_data(engine.data_recipe(spec), 0, torch.device("cpu"))
    method = engine.build_method(spec, data, torch.device("cpu"))
    method.train()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    metrics = flatness.final_metrics(spec, method, data, torch.device("cpu"))
    assert "flat/top_eig/student1" in metrics
    assert all(torch.equal(v, state[k]) for k, v in method.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert method.training and all(m.training for m in method.modules())
    assert all(p.grad is None for p in method.parameters())


def test_fused_and_unfused_peers_give_the_same_analysis_networks(one_thread):
    from conftest import DataStub, make_method

    from kd_platform.run.engine import RunSpec, build_method
    pair = []
    for fused in ("false", "true"):
        spec = RunSpec.from_flat("okdph", {"fused": fused}, 0)  # checking fused=true draws weights
        torch.manual_seed(3)
        pair.append(build_method(spec, DataStub(), torch.device("cpu")))
    plain, fused = pair
    x = torch.randn(5, 1, 8, 8)
    a, b = plain.analysis_networks(), fused.analysis_networks()
    assert set(a) == set(b) == {"student1", "student2", "hwm"}
    assert a["student1"] is plain.peers.nets[0]
    for name in a:
        a[name].eval(), b[name].eval()
        torch.testing.assert_close(a[name](x), b[name](x), rtol=1e-4, atol=1e-5)
    assert set(make_method("ce").analysis_networks()) == {"net"}
    assert set(make_method("dml").analysis_networks()) == {"student1", "student2"}


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def test_flatness_cli_logs_to_the_run(tmp_path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    env = {"MLFLOW_TRACKING_URI": uri}
    out = tmp_path / "out"
    r = run_cli("platform.train", "okdph", "--epochs", "1", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    c = _client(uri)
    [exp] = [e for e in c.search_experiments() if e.name != "Default"]
    [run] = c.search_runs([exp.experiment_id])
    run_id = run.info.run_id
    assert (tmp_path / "out").resolve().as_posix() in run.data.tags["checkpoint_dir"]

    r = run_cli("analysis.flatness", "--run", run_id, "--samples", "64", "--probes", "2", "--grid", "3",
                "--points", "3", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = c.get_run(run_id)
    for net in ("student1", "student2", "hwm"):
        for measure in ("hessian_trace", "top_eig", "sharpness"):
            assert f"flat/{measure}/{net}" in run.data.metrics
    assert "flat/barrier/student1-student2" in run.data.metrics
    assert "flat/barrier/student1-hwm-student2" in run.data.metrics
    assert run.data.tags["flatness.samples"] == "64"
    assert run.data.tags["flatness.probes"] == "2"
    assert run.data.tags["flatness.seed"] == "0"
    files = {f.path for f in c.list_artifacts(run_id, "flatness")}
    assert {"flatness/interpolation.png", "flatness/surface_student1.png",
            "flatness/surface_student2.png"} <= files
    local = c.download_artifacts(run_id, "flatness/interpolation.png", str(tmp_path / "dl"))
    assert open(local, "rb").read(8) == PNG_MAGIC

    # Bad input: one line, exit 2, nothing written.
    before = len(c.get_metric_history(run_id, "flat/top_eig/student1"))
    r = run_cli("analysis.flatness", "--run", "0" * 32, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "0" * 32 in r.stderr
    r = run_cli("analysis.flatness", "--run", run_id, "--networks", "student9", env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "student9" in r.stderr
    r = run_cli("analysis.flatness", "--run", run_id, "--rho", "inf", env=env)  # would log a meaningless 0
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "'inf'" in r.stderr, r.stderr
    ckpt = run.data.tags["checkpoint_dir"]
    import pathlib
    (pathlib.Path(ckpt) / "state.pt").unlink()
    r = run_cli("analysis.flatness", "--run", run_id, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "state.pt" in r.stderr, r.stderr
    bare = c.create_run(exp.experiment_id, tags={"method": "okdph"}).info.run_id
    r = run_cli("analysis.flatness", "--run", bare, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "checkpoint" in r.stderr
    assert len(c.get_metric_history(run_id, "flat/top_eig/student1")) == before
    assert not c.get_run(bare).data.metrics
