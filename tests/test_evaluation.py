"""Calibration and diversity metrics against hand computations, and on real runs."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from kd_platform.run.engine import RunSpec, train
from kd_platform.run.evaluation import (
    calibration_bins,
    expected_calibration_error,
    pairwise_divergence,
    relative_parameter_distance,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _log(p: list[list[float]]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


def test_ece_matches_a_hand_computation():
    # Confidences 0.9, 0.9, 0.6, 0.5 (bins 14, 14, 8, 7 of 15); correct, wrong, correct, wrong.
    probs = [[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.5, 0.5]]
    y = torch.tensor([0, 0, 0, 1])  # argmax of a tie is class 0, so the last one is wrong
    bins = calibration_bins(_log(probs), y)
    assert bins[0].tolist().count(0) == 12 and bins[0, 13] == 2 and bins[0, 8] == 1 and bins[0, 7] == 1
    # Bin 0.9: accuracy 1/2, confidence 0.9; bin 0.6: 1 vs 0.6; bin 0.5: 0 vs 0.5.
    expected = (2 * abs(0.5 - 0.9) + abs(1 - 0.6) + abs(0 - 0.5)) / 4
    assert expected_calibration_error(bins) == pytest.approx(100 * expected)
    # A confidence of exactly m/15 belongs to bin m (intervals closed on the right).
    edge = calibration_bins(_log([[2 / 3, 1 / 3]]), torch.tensor([0]))
    assert edge[0, 9] == 1


def test_identical_peers_have_no_diversity():
    lp = torch.randn(20, 5).log_softmax(1)
    d, kl = pairwise_divergence([lp, lp.clone(), lp.clone()])
    assert d.tolist() == [0, 0, 0] and kl.abs().max() < 1e-12
    stack = torch.randn(1, 4, 3).expand(3, 4, 3).contiguous()
    assert relative_parameter_distance({"w": stack}) == 0.0


def test_disagreement_and_symmetric_kl_against_explicit_sums():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 7, generator=g).log_softmax(1), torch.randn(50, 7, generator=g).log_softmax(1)
    d, kl = pairwise_divergence([a, b])
    assert int(d[0]) == int((a.argmax(1) != b.argmax(1)).sum())
    pa, pb = a.exp().numpy(), b.exp().numpy()
    want = sum(entropy(pa[i], pb[i]) + entropy(pb[i], pa[i]) for i in range(50))
    assert float(kl[0]) == pytest.approx(want, rel=1e-9)
    # Known disagreement counts: 3 of 4 samples differ between the first pair only.
    x = _log([[0.9, 0.1]] * 4)
    z = _log([[0.1, 0.9]] * 3 + [[0.9, 0.1]])
    d, _ = pairwise_divergence([x, z, x])
    assert d.tolist() == [3, 0, 3]


def test_relative_parameter_distance_of_known_vectors():
    w = torch.tensor([[3.0, 4.0], [0.0, 5.0]])  # norms 5 and 5, distance sqrt(9 + 1)
    b = torch.tensor([[0.0], [0.0]])
    assert relative_parameter_distance({"w": w, "b": b}) == pytest.approx(math.sqrt(10) / 5)


def _final(knobs: dict, caplog=None) -> dict:
    history = []
    train(RunSpec.from_flat("okdph", {"epochs": 1, **knobs}, seed=0), lambda m, s: history.append(m))
    return history[-1]


# OKDPH's degenerate corner: the command line refuses it (``Method.degenerate``), so these specs
# are built without ``from_flat``'s checks, as a collapse the checks did not foresee would be.
COLLAPSING = RunSpec("okdph", {"same_init": True, "views": "shared", "hwm_grad": "false"}, {"epochs": 1}, 0)


def test_every_network_gets_calibration_and_the_students_diversity():
    m = _final({})
    for split in ("val", "test"):
        for net in ("student1", "student2", "ensemble", "hwm"):
            assert 0 <= m[f"{split}/ece/{net}"] <= 100 and m[f"{split}/nll/{net}"] > 0
        assert 0 < m[f"{split}/diversity/disagreement"] <= 100 and m[f"{split}/diversity/kl"] > 0
        assert m[f"{split}/diversity/param_dist"] > 0 and m[f"{split}/diversity/identical"] == 0


def test_the_degenerate_okdph_corner_is_flagged(caplog):
    # Same initialisation, one shared view and no HWM gradient (whatever the mixing weights):
    # both students see the same gradients and stay the same network for the whole run.
    history: list = []
    with caplog.at_level(logging.WARNING, logger="kd_platform.run.engine"):
        train(COLLAPSING, lambda metrics, save: history.append(metrics))
    m = history[-1]
    assert m["val/diversity/param_dist"] == 0.0 and m["val/diversity/identical"] == 1.0
    assert m["val/diversity/disagreement"] == 0.0
    assert sum("students are identical" in r.message for r in caplog.records) == 1
    assert np.isfinite(m["val/ece/student1"])


def test_a_run_of_identical_students_is_tagged(tmp_path):
    from conftest import sqlite_uri
    from mlflow.tracking import MlflowClient

    from kd_platform.launch.launcher import Launch
    from kd_platform.launch.single import run_single
    uri = sqlite_uri(tmp_path / "m.db")
    result = run_single(COLLAPSING, Launch(), uri, "okdph", tmp_path / "res")
    run = MlflowClient(tracking_uri=uri).get_run(result["run_id"])
    assert run.data.tags.get("identical_peers") == "true"
    assert run.data.metrics["val/diversity/param_dist"] == 0.0 and "val/ece/student1" in run.data.metrics
