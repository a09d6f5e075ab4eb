"""The epoch loop: exact resumption from a checkpoint, and the GPU-path options on CPU."""
from __future__ import annotations

import pytest

from kd_platform.run.engine import RunSpec, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(spec, resume_from=None, keep=None):
    history = []

    def report(metrics, save):
        history.append(metrics)
        if keep is not None and metrics["epoch"] == keep[0]:
            save(keep[1])
    train(spec, report, resume_from=resume_from)
    return history


@pytest.mark.parametrize("method", ["ce", "okdph"])
def test_resuming_from_a_checkpoint_continues_the_same_run(method, tmp_path):
    # OKDPH draws Dirichlet weights from the global generator: its state is in the checkpoint too.
    spec = RunSpec.from_flat(method, {"epochs": 3}, seed=2)
    straight = _run(spec, keep=(1, tmp_path))
    resumed = _run(spec, resume_from=tmp_path)
    assert [m["epoch"] for m in resumed] == [2, 3]
    for a, b in zip(straight[1:], resumed):
        assert a["val/acc/students_mean"] == pytest.approx(b["val/acc/students_mean"], abs=1e-9)
        assert a["train/loss/loss"] == pytest.approx(b["train/loss/loss"], rel=1e-5)


def test_bf16_autocast_and_channels_last_train_on_cpu():
    spec = RunSpec.from_flat("ce", {"epochs": 2, "amp": "bf16", "channels_last": "true"}, seed=0)
    history = _run(spec)
    assert history[-1]["val/acc/students_mean"] > 50.0
    assert spec.resolved()[0].autocast_dtype(__import__("torch").device("cpu")) is not None


def test_an_unreadable_checkpoint_trains_the_run_again_from_its_first_epoch(tmp_path, caplog):
    """A checkpoint cut short (a full disk, a node killed mid-write by hand) must not fail every
    retry of its trial: the run starts over, says so, and ends as a run from scratch ends."""
    import logging

    from kd_platform.run.checkpoint import STATE_FILE
    spec = RunSpec.from_flat("ce", {"epochs": 2}, seed=1)
    straight = _run(spec, keep=(1, tmp_path))
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[:2000])
    with caplog.at_level(logging.WARNING, logger="kd_platform.run.engine"):
        again = _run(spec, resume_from=tmp_path)
    assert [m["epoch"] for m in again] == [1, 2]
    assert again[-1]["val/acc/students_mean"] == pytest.approx(straight[-1]["val/acc/students_mean"], abs=1e-9)
    assert any("corrupt or truncated" in r.message and "starts again" in r.message for r in caplog.records)
