"""The offline methods (kd, dist, cmkd, iekd) against computations that do not use their code."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DataStub
from scipy import special, stats

from kd_platform.methods.base import Batch, StepContext
from kd_platform.methods.cmkd import CMKDConfig, cmkd_objective, correlation_weights, sample_difficulty
from kd_platform.methods.dist import DISTConfig, dist_objective
from kd_platform.methods.ie_parts import FactorAutoEncoder, to_factor
from kd_platform.methods.iekd import fit_autoencoder
from kd_platform.methods.kd import KDConfig, kd_objective
from kd_platform.models import build_model
from kd_platform.run.engine import RunSpec, build_method
from kd_platform.run.spec import Assets
from kd_platform.teachers import TeacherProvider

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(n: int = 16, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z_s = (2 * torch.randn(n, c, generator=g, dtype=torch.float64)).requires_grad_(True)
    z_t = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    return z_s, z_t, torch.randint(0, c, (n,), generator=g)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's teacher checkpoint (resnet8, untrained): the methods build without training one."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    torch.save(build_model("resnet8", 10, 1).state_dict(), path)
    return path


def _method(name: str, teacher: Path, cache: Path, seed: int = 0, **knobs):
    spec = RunSpec.from_flat(name, {"teacher_arch": "resnet8", **knobs}, seed,
                             Assets(teacher_cache=str(cache), teacher_checkpoint=str(teacher)))
    torch.manual_seed(seed)
    return build_method(spec, DataStub(), CPU, TeacherProvider(spec, DataStub(), CPU))


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- kd ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.9), (1.0, 0.5), (2.5, 0.0)])
def test_kd_matches_numpy(temperature: float, alpha: float) -> None:
    z_s, z_t, y = _logits()
    got = kd_objective(z_s, z_t, y, KDConfig(temperature=temperature, alpha=alpha))
    s, t, labels = z_s.detach().numpy(), z_t.numpy(), y.numpy()
    ce = -special.log_softmax(s, axis=1)[np.arange(len(labels)), labels].mean()
    log_ps, log_pt = special.log_softmax(s / temperature, axis=1), special.log_softmax(t / temperature, axis=1)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean()
    assert float(got["kd"]) == pytest.approx(temperature ** 2 * kl, rel=1e-9)
    assert got["loss"].item() == pytest.approx((1 - alpha) * ce + alpha * temperature ** 2 * kl, rel=1e-9)


# --- dist and cmkd ------------------------------------------------------------


def test_cmkd_fixed_without_spearman_equals_dist() -> None:
    z_s, z_t, y = _logits(32, 10)
    cm = cmkd_objective(z_s, z_t, y, CMKDConfig(weighting="fixed", spearman_share=0.0, temperature=4.0,
                                                w_kd=2.0, g_intra=1.0))
    (g_cm,) = torch.autograd.grad(cm["loss"], z_s)
    di = dist_objective(z_s, z_t, y, DISTConfig(tau_squared=True, temperature=4.0, w=2.0, beta=1.0, gamma=1.0))
    (g_di,) = torch.autograd.grad(di["loss"], z_s)
    assert cm["loss"].item() == pytest.approx(di["loss"].item(), rel=1e-12)
    torch.testing.assert_close(g_cm, g_di)


def test_dist_tau_squared_multiplies_by_t_squared() -> None:
    z_s, z_t, y = _logits()
    plain = dist_objective(z_s, z_t, y, DISTConfig(tau_squared=False, temperature=3.0))
    squared = dist_objective(z_s, z_t, y, DISTConfig(tau_squared=True, temperature=3.0))
    default = dist_objective(z_s, z_t, y, DISTConfig(temperature=3.0))
    rel_plain, rel_squared = (plain["loss"] - plain["ce"]).item(), (squared["loss"] - squared["ce"]).item()
    assert rel_squared == pytest.approx(9.0 * rel_plain, rel=1e-12)
    assert default["loss"].item() == pytest.approx(squared["loss"].item(), rel=1e-12)


def test_dist_matches_scipy_pearson() -> None:
    z_s, z_t, y = _logits(12, 7)
    cfg = DISTConfig(temperature=2.0, w=1.5, beta=0.7, gamma=1.3)  # the default t^2 scaling
    got = dist_objective(z_s, z_t, y, cfg)
    ys, yt = special.softmax(z_s.detach().numpy() / 2, axis=1), special.softmax(z_t.numpy() / 2, axis=1)
    inter = 1 - np.mean([stats.pearsonr(a, b)[0] for a, b in zip(ys, yt)])
    intra = 1 - np.mean([stats.pearsonr(a, b)[0] for a, b in zip(ys.T, yt.T)])
    ce = -special.log_softmax(z_s.detach().numpy(), axis=1)[np.arange(12), y.numpy()].mean()
    assert got["loss"].item() == pytest.approx(ce + 1.5 * 4 * (0.7 * inter + 1.3 * intra), rel=1e-9)


def test_cmkd_difficulty_by_hand() -> None:
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    z_t, y = p.log(), torch.tensor([1, 0])
    entropy_0 = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)) / math.log(4)
    torch.testing.assert_close(sample_difficulty(z_t, y, "entropy"),
                               torch.tensor([entropy_0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(sample_difficulty(z_t, y, "margin"), torch.tensor([0.9, 0.75], dtype=torch.float64))


def test_cmkd_weightings_by_hand() -> None:
    d = torch.tensor([0.0, 0.2, 1.0])
    w_p, w_s = correlation_weights(d, "difficulty", 0.3)
    torch.testing.assert_close((w_p, w_s), (torch.tensor([1.0, 0.8, 0.0]), torch.tensor([0.0, 0.2, 1.0])))
    w_p, w_s = correlation_weights(d, "inverse", 0.3)
    torch.testing.assert_close((w_p, w_s), (torch.tensor([0.0, 0.2, 1.0]), torch.tensor([1.0, 0.8, 0.0])))
    w_p, w_s = correlation_weights(d, "fixed", 0.3)
    torch.testing.assert_close((w_p, w_s), (torch.full((3,), 0.7), torch.full((3,), 0.3)))


def test_cmkd_weighted_terms_match_scipy() -> None:
    """Per-sample Pearson and (sharp soft-rank) Spearman terms, difficulty-weighted, as scipy computes them."""
    z_s, z_t, y = _logits(10, 6, seed=3)
    cfg = CMKDConfig(weighting="difficulty", difficulty="margin", temperature=2.0, w_kd=1.0, g_intra=0.0,
                     rank_eps=1e-4)
    got = cmkd_objective(z_s, z_t, y, cfg)
    s, t = z_s.detach().numpy(), z_t.numpy()
    ys, yt = special.softmax(s / 2, axis=1), special.softmax(t / 2, axis=1)
    lp = np.array([1 - stats.pearsonr(a, b)[0] for a, b in zip(ys, yt)])
    ls = np.array([1 - stats.spearmanr(a, b)[0] for a, b in zip(ys, yt)])
    d = 1 - special.softmax(t, axis=1)[np.arange(10), y.numpy()]
    ce = -special.log_softmax(s, axis=1)[np.arange(10), y.numpy()].mean()
    assert got["loss"].item() == pytest.approx(ce + 4 * np.mean((1 - d) * lp + d * ls), rel=1e-6)


def test_cmkd_standardize_changes_only_the_intra_term() -> None:
    z_s, z_t, y = _logits()
    plain = cmkd_objective(z_s, z_t, y, CMKDConfig(standardize=False))
    z = cmkd_objective(z_s, z_t, y, CMKDConfig(standardize=True))
    # Row correlations and row ranks do not change under a per-row affine map; columns do.
    assert float(z["pearson"]) == pytest.approx(float(plain["pearson"]), abs=1e-9)
    assert float(z["spearman"]) == pytest.approx(float(plain["spearman"]), abs=1e-6)
    assert abs(float(z["intra"]) - float(plain["intra"])) > 1e-4


# --- the methods themselves ------------------------------------------------------


@pytest.mark.parametrize("name", ["kd", "dist", "cmkd", "iekd"])
def test_step_trains_the_student_only(name: str, teacher_file: Path, tmp_path: Path) -> None:
    m = _method(name, teacher_file, tmp_path, ae_epochs=0) if name == "iekd" else _method(name, teacher_file, tmp_path)
    assert m.students == ("student",) and set(m.eval_networks()) == {"student", "teacher"}
    terms = m.training_step(Batch([_images()], torch.arange(8) % 10), StepContext(0, 1, 0, 1, 0))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert all(p.grad is not None for p in m.student.parameters())
    assert not m.teacher.training and not any(p.requires_grad for p in m.teacher.parameters())


# --- iekd --------------------------------------------------------------------------


@pytest.mark.parametrize("split,n_inherit", [(0.5, 32), (0.25, 16), (0.01, 1), (0.99, 63)])
def test_iekd_natural_split_takes_the_first_channels(split: float, n_inherit: int, teacher_file: Path,
                                                    tmp_path: Path) -> None:
    m = _method("iekd", teacher_file, tmp_path, ae_epochs=0, split=split, split_mode="natural")
    fmap = torch.randn(4, 64, 2, 2)  # resnet8's last stage on 8x8 digits
    f_i, f_e = m.split(fmap)
    k = 32  # rate 0.5 of the teacher's 64 channels
    assert f_i.shape == f_e.shape == (4, k * 2 * 2)
    torch.testing.assert_close(f_i, to_factor(m.split.inherit(fmap[:, :n_inherit])))
    torch.testing.assert_close(f_e, to_factor(m.split.explore(fmap[:, n_inherit:])))


def test_iekd_random_split_is_a_fixed_permutation(teacher_file: Path, tmp_path: Path) -> None:
    a = _method("iekd", teacher_file, tmp_path, ae_epochs=0, split_mode="random", seed=5)
    b = _method("iekd", teacher_file, tmp_path, ae_epochs=0, split_mode="random", seed=5)
    order = a.split.order
    assert sorted(order.tolist()) == list(range(64)) and order.tolist() != list(range(64))
    assert torch.equal(order, b.split.order)  # same seed, same permutation
    fmap = torch.randn(4, 64, 2, 2)
    first, again = a.split(fmap), a.split(fmap)
    torch.testing.assert_close(first, again)  # same across calls
    torch.testing.assert_close(first[0], to_factor(a.split.inherit(fmap[:, order[:32]])))
    torch.testing.assert_close(first[1], to_factor(a.split.explore(fmap[:, order[32:]])))


@pytest.mark.parametrize("distance", ["l1", "l2", "cos"])
def test_iekd_steps_pull_inheritance_and_push_exploration(distance: str, teacher_file: Path,
                                                          tmp_path: Path) -> None:
    m = _method("iekd", teacher_file, tmp_path, ae_epochs=0, distance=distance)
    x, y = _images(16, seed=1), torch.arange(16) % 10
    batch, ctx = Batch([x], y), StepContext(0, 1, 0, 1, 0)

    def distances() -> tuple[float, float]:
        with torch.no_grad():
            inherit, explore = m.factor_distances(m.student.features(x), x)
        return float(inherit), float(explore)

    inherit0, explore0 = distances()
    # One step of the method's own loss on each encoder alone: CE does not reach them, so
    # the move comes from the inheritance term (+) and the exploration term (-) only.
    for part in (m.split.inherit, m.split.explore):
        opt = torch.optim.SGD(part.parameters(), lr=0.01)
        opt.zero_grad()
        m.training_step(batch, ctx)["loss"].backward()
        opt.step()
    inherit1, explore1 = distances()
    assert inherit1 < inherit0
    assert explore1 > explore0


def test_autoencoder_reconstruction_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    ae = FactorAutoEncoder(16, 8)
    fmap = torch.relu(torch.randn(8, 16, 4, 4))

    def loss_now() -> float:
        with torch.no_grad():
            return float(ae(fmap)[1])

    before = loss_now()
    history = fit_autoencoder(ae, lambda epoch: [fmap] * 5, epochs=4, lr=0.1)
    after = loss_now()
    assert len(history) == 4 and history[-1] < history[0]
    assert after < 0.8 * before
