"""Checks of the correlation and KD losses against computations that do not use the code under test."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special, stats

from kd_platform.losses import (
    dist_inter,
    dist_intra,
    exact_rank,
    kd_loss,
    pearson_rows,
    soft_rank,
    spearman_rows,
    standardize_rows,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _np_pearson(u: np.ndarray, v: np.ndarray) -> float:
    """Textbook Pearson: centred dot product over the product of centred norms."""
    uc, vc = u - u.mean(), v - v.mean()
    return float((uc * vc).sum() / np.sqrt((uc**2).sum() * (vc**2).sum()))


# --- pearson ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 5), (7, 3), (16, 100), (64, 10)])
def test_pearson_rows_matches_scipy(shape: tuple[int, int]) -> None:
    rng = _rng(sum(shape))
    a = rng.normal(size=shape)
    # Mix in a share of a so the correlations are spread over (-1, 1), not all near 0.
    b = 0.7 * a * rng.choice([-1.0, 1.0], size=(shape[0], 1)) + rng.normal(size=shape)
    got = pearson_rows(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    want = np.array([stats.pearsonr(a[i], b[i])[0] for i in range(shape[0])])
    assert got.shape == (shape[0],)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_pearson_constant_row_is_zero_with_finite_grad() -> None:
    a = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 4.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[3.0, 1.0, 2.0], [2.0, 2.0, 2.0]], dtype=torch.float64)
    r = pearson_rows(a, b)
    r.sum().backward()
    assert torch.equal(r.detach(), torch.zeros(2, dtype=torch.float64))
    assert torch.isfinite(a.grad).all()


# --- DIST ------------------------------------------------------------------

# Hand-made 3 x 4 example (rows = samples, columns = classes).
YS = np.array(
    [
        [0.1, 0.2, 0.3, 0.4],
        [0.4, 0.3, 0.2, 0.1],
        [0.1, 0.4, 0.1, 0.4],
    ]
)
YT = np.array(
    [
        [0.2, 0.3, 0.4, 0.1],
        [0.1, 0.2, 0.3, 0.4],
        [0.1, 0.4, 0.2, 0.3],
    ]
)


def test_dist_inter_hand_example() -> None:
    # By hand: row 0 centred ys = [-.15,-.05,.05,.15], yt = [-.05,.05,.15,-.15],
    # dot = -0.01, both squared norms 0.05, so r = -0.2. Row 1 is yt reversed:
    # r = -1. Row 2: dot = 0.06, squared norms 0.09 and 0.05, r = 2/sqrt(5).
    hand = [-0.2, -1.0, 2.0 / np.sqrt(5.0)]
    numpy_rows = [_np_pearson(YS[i], YT[i]) for i in range(3)]
    np.testing.assert_allclose(numpy_rows, hand, rtol=1e-12)
    expected = 1.0 - np.mean(hand)
    got = dist_inter(torch.from_numpy(YS), torch.from_numpy(YT)).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_dist_intra_hand_example() -> None:
    # Columns (classes) across the batch of 3, each correlated explicitly.
    # Column 2 is ys=[.3,.2,.1], yt=[.4,.3,.2] = ys + 0.1, so r = 1 by hand.
    cols = [_np_pearson(YS[:, c], YT[:, c]) for c in range(4)]
    np.testing.assert_allclose(cols, [np.corrcoef(YS[:, c], YT[:, c])[0, 1] for c in range(4)], rtol=1e-12)
    assert cols[2] == pytest.approx(1.0, rel=1e-12)
    expected = 1.0 - np.mean(cols)
    got = dist_intra(torch.from_numpy(YS), torch.from_numpy(YT)).item()
    assert got == pytest.approx(expected, rel=1e-10)
    # intra is not inter: the example is not symmetric under transposition.
    assert got != pytest.approx(dist_inter(torch.from_numpy(YS), torch.from_numpy(YT)).item())


def test_dist_terms_detach_teacher() -> None:
    ys = torch.from_numpy(YS).requires_grad_(True)
    yt = torch.from_numpy(YT).requires_grad_(True)
    (dist_inter(ys, yt) + dist_intra(ys, yt)).backward()
    assert yt.grad is None
    assert ys.grad is not None and torch.isfinite(ys.grad).all() and ys.grad.abs().sum() > 0


# --- ranks -----------------------------------------------------------------


def test_exact_rank_matches_scipy_rankdata_with_ties() -> None:
    x = np.array([[3.0, 1.0, 2.0, 2.0, 5.0], [0.0, 0.0, 0.0, 1.0, -1.0]])
    got = exact_rank(torch.from_numpy(x)).numpy()
    want = np.stack([stats.rankdata(r) for r in x])
    np.testing.assert_array_equal(got, want)


def test_soft_rank_tends_to_exact_rank() -> None:
    x = torch.from_numpy(_rng(1).normal(size=(8, 12)))
    exact = torch.from_numpy(np.stack([stats.rankdata(r) for r in x.numpy()]))
    errors = [(soft_rank(x, eps) - exact).abs().max().item() for eps in (1.0, 1e-1, 1e-3, 1e-6)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6


def test_soft_rank_accepts_per_row_eps() -> None:
    x = torch.from_numpy(_rng(2).normal(size=(4, 6)))
    eps = torch.tensor([1e-1, 1.0, 1e-2, 5e-1], dtype=torch.float64)
    rowwise = torch.stack([soft_rank(x[i : i + 1], float(eps[i])).squeeze(0) for i in range(4)])
    torch.testing.assert_close(soft_rank(x, eps), rowwise)
    torch.testing.assert_close(soft_rank(x, eps.unsqueeze(1)), rowwise)


def test_spearman_rows_converges_to_scipy() -> None:
    rng = _rng(3)
    s = rng.normal(size=(32, 20))
    t = 0.6 * s + rng.normal(size=(32, 20))
    want = np.array([stats.spearmanr(s[i], t[i])[0] for i in range(32)])
    s_t, t_t = torch.from_numpy(s), torch.from_numpy(t)
    errs = {}
    for rank_eps in (1e-1, 1e-2, 1e-4):
        got = spearman_rows(s_t, t_t, rank_eps).numpy()
        errs[rank_eps] = np.abs(got - want)
    # A soft rank cannot separate two values closer than about rank_eps * range,
    # so the tight bound is for rows whose smallest gap is 10x that resolution;
    # near-tied rows only enter the (looser) mean.
    srt = np.sort(s, axis=1)
    rel_gap = np.diff(srt, axis=1).min(axis=1) / (srt[:, -1] - srt[:, 0])
    separated = rel_gap >= 10 * 1e-4
    assert separated.sum() >= 16
    assert errs[1e-4][separated].max() < 1e-3
    assert errs[1e-4].mean() < 1e-3
    means = [errs[e].mean() for e in (1e-1, 1e-2, 1e-4)]
    assert means[0] > means[1] > means[2], means


def test_spearman_rows_gradient_student_only() -> None:
    rng = _rng(4)
    student = torch.from_numpy(rng.normal(size=(6, 10))).requires_grad_(True)
    teacher = torch.from_numpy(rng.normal(size=(6, 10))).requires_grad_(True)
    (1.0 - spearman_rows(student, teacher, 0.01)).mean().backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_spearman_rows_constant_row_no_nan() -> None:
    student = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.4, 0.2, 0.3]], requires_grad=True)
    teacher = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    r = spearman_rows(student, teacher, 0.01)
    r.sum().backward()
    assert torch.isfinite(r).all() and torch.isfinite(student.grad).all()
    assert r.detach().abs().max() == 0


# --- standardize -----------------------------------------------------------


def test_standardize_rows_matches_scipy_zscore() -> None:
    x = _rng(5).normal(loc=3.0, scale=2.0, size=(5, 9))
    got = standardize_rows(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, stats.zscore(x, axis=1), rtol=1e-10, atol=1e-12)


def test_standardize_constant_row() -> None:
    x = torch.full((2, 4), 0.25, requires_grad=True)
    z = standardize_rows(x)
    z.sum().backward()
    assert torch.equal(z.detach(), torch.zeros(2, 4))
    assert torch.isfinite(x.grad).all()


# --- Hinton KD -------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_numpy(temperature: float) -> None:
    rng = _rng(6)
    zs = rng.normal(scale=3.0, size=(8, 7))
    zt = rng.normal(scale=3.0, size=(8, 7))
    log_ps = special.log_softmax(zs / temperature, axis=1)
    log_pt = special.log_softmax(zt / temperature, axis=1)
    kl_rows = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    want = temperature**2 * kl_rows.mean()
    # Cross-check the KL itself with scipy's elementwise definition.
    np.testing.assert_allclose(kl_rows, special.rel_entr(np.exp(log_pt), np.exp(log_ps)).sum(axis=1), rtol=1e-10)

    s = torch.from_numpy(zs).requires_grad_(True)
    t = torch.from_numpy(zt).requires_grad_(True)
    loss = kd_loss(s, t, temperature)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    loss.backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0
    # d/dz_s of T^2 * mean KL = T * (p_s - p_t) / N.
    grad_want = temperature * (np.exp(log_ps) - np.exp(log_pt)) / zs.shape[0]
    np.testing.assert_allclose(s.grad.numpy(), grad_want, rtol=1e-8, atol=1e-12)
