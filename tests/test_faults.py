"""Reliability: crashed workers, NaN losses and interrupted checkpoint writes.

The sweeps run through the real command line (a fresh local Ray cluster each, so the
``KD_PLATFORM_FAULT`` of ``kd_platform.launch.faults`` reaches every Ray process); each prints
how long the platform took to recover, for the record.
"""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, runs_in, sqlite_uri

from kd_platform.errors import UsageError
from kd_platform.launch import faults
from kd_platform.run.checkpoint import STATE_FILE, load_checked, save_atomic

SPACE = """\
swept:
  lr: {type: choice, values: [0.1, 0.05]}
asha: {grace_period: 3}
"""


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)  # no ASHA stop: every trial runs all its epochs unless it fails
    return path


def _children(uri: str) -> tuple:
    runs = runs_in(uri)
    (parent,) = [r for r in runs if r.data.tags.get("kind") in ("sweep", "ablation")]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _history(uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient
    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


@pytest.mark.slow
def test_killed_train_worker_resumes_from_its_last_checkpoint(tmp_path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    once = tmp_path / "fault-fired"
    out = run_cli("platform.sweep", "ce", "--space", str(_space(tmp_path)), "--samples", "1", "--epochs", "3",
                  "--no-confirm",
                  "--use-train", "--tracking-uri", uri, "--out", str(tmp_path / "res"), "-v",  # the workers' logs
                  env={"KD_PLATFORM_FAULT": "exit@2", "KD_PLATFORM_FAULT_ONCE": str(once)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert once.exists(), "the worker was never killed"
    # Ray Train's own FailureConfig restarted the worker group (the Tune trial never failed)...
    assert "[FailurePolicy] RETRY" in log
    # ...and the new worker picked up the checkpoint of epoch 1 instead of starting over.
    assert log.count("resumed from ") == 1 and "at epoch 1" in log.split("resumed from ", 1)[1].splitlines()[0]
    parent, (child,) = _children(uri)
    assert parent.info.status == "FINISHED"
    assert child.info.status == "FINISHED" and child.data.tags["trial_outcome"] == "completed"
    epochs = _history(uri, child.info.run_id, "epoch")
    assert [m.step for m in epochs] == [1, 2, 3]  # each epoch logged once, none repeated
    assert [m.step for m in _history(uri, child.info.run_id, "val/acc/students_mean")] == [1, 2, 3]
    assert "epochs_replayed" not in child.data.tags  # Tune saw every epoch once
    fault_at = once.stat().st_mtime
    recovery = epochs[1].timestamp / 1000 - fault_at
    assert recovery > 0
    print(f"\n[recovery] Train worker killed at the start of epoch 2: epoch 2 reported {recovery:.1f}s later")


@pytest.mark.slow
def test_a_nan_trial_fails_alone_and_the_sweep_goes_on(tmp_path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    # An ablation runs its grid in order, one trial at a time: the NaN trial (lr=0.1) first.
    out = run_cli("platform.sweep", "ce", "--space", str(_space(tmp_path)), "--ablate", "lr", "--epochs", "3",
                  "--max-concurrent", "1", "--tracking-uri", uri, "--out", str(tmp_path / "res"), "--quiet",
                  env={"KD_PLATFORM_FAULT": "nan@2:lr=0.1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 failed" in out.stdout
    parent, children = _children(uri)
    assert parent.info.status == "FINISHED" and len(children) == 2
    bad = next(c for c in children if float(c.data.params["lr"]) == 0.1)
    good = next(c for c in children if float(c.data.params["lr"]) == 0.05)
    assert bad.info.status == "FAILED" and bad.data.tags["trial_outcome"] == "failed"
    assert "non-finite training loss at epoch 2" in bad.data.tags["error"]
    # It stopped in the epoch where the loss went bad: epoch 1 kept, nothing after.
    assert [m.step for m in _history(uri, bad.info.run_id, "epoch")] == [1]
    assert good.info.status == "FINISHED" and good.data.tags["trial_outcome"] == "completed"
    assert [m.step for m in _history(uri, good.info.run_id, "epoch")] == [1, 2, 3]
    assert good.info.start_time >= bad.info.end_time  # started after the failure: the sweep went on
    print(f"\n[recovery] NaN trial failed; the next trial started "
          f"{(good.info.start_time - bad.info.end_time) / 1000:.1f}s later")


def test_conditional_fault_fires_only_for_the_matching_knob(monkeypatch):
    loss = torch.tensor(1.0)
    monkeypatch.setenv(faults.ENV, "nan@2:lr=0.1")
    faults.bind({"lr": 0.05, "seed": 0})
    assert torch.isfinite(faults.corrupt_loss(1, loss))
    faults.bind({"lr": 0.1, "seed": 0})
    assert torch.isnan(faults.corrupt_loss(1, loss))  # epoch index 1 is epoch 2
    assert torch.isfinite(faults.corrupt_loss(0, loss))
    monkeypatch.setenv(faults.ENV, "nan@1:hwm_grad=true")
    faults.bind({"hwm_grad": True})
    assert torch.isnan(faults.corrupt_loss(0, loss))
    faults.bind({})


def _state(value: float) -> dict:
    return {"weights": torch.full((64, 64), value), "epoch": int(value)}


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / STATE_FILE
    save_atomic(_state(1.0), path)
    real_save = torch.save

    def half_then_crash(obj, fh, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_atomic(_state(2.0), path)
    monkeypatch.undo()
    assert load_checked(path)["epoch"] == 1
    assert torch.equal(load_checked(path)["weights"], _state(1.0)["weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temp file left behind


def test_a_killed_writer_never_replaces_the_previous_checkpoint(tmp_path):
    """A process that dies mid-write (no exception handler runs) leaves the old file whole."""
    path = tmp_path / STATE_FILE
    save_atomic(_state(1.0), path)
    script = (
        "import os, sys, torch\n"
        "from kd_platform.run.checkpoint import save_atomic\n"
        "def die(obj, fh, *a, **k):\n"
        "    fh.write(b'PK' * 1000); fh.flush(); os._exit(9)\n"
        "torch.save = die\n"
        "save_atomic({'epoch': 2}, sys.argv[1])\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 9, done.stderr[-2000:]
    assert load_checked(path)["epoch"] == 1


def _truncated_checkpoint(directory: Path) -> Path:
    path = directory / STATE_FILE
    save_atomic(_state(1.0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = _truncated_checkpoint(tmp_path)
    with pytest.raises(UsageError) as err:
        load_checked(path)
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_resuming_from_a_truncated_checkpoint_names_the_file_and_starts_over(tmp_path, caplog):
    """A restarted trial whose checkpoint is cut short trains again from its first epoch, and its
    log names the file, rather than failing at every retry."""
    import logging

    from kd_platform.run.engine import RunSpec, train
    path = _truncated_checkpoint(tmp_path)
    spec = RunSpec.from_flat("ce", {"dataset": "digits", "arch": "resnet8", "epochs": 1}, 0)
    epochs = []
    with caplog.at_level(logging.WARNING, logger="kd_platform.run.engine"):
        train(spec, lambda metrics, save: epochs.append(metrics["epoch"]), resume_from=tmp_path)
    assert epochs == [1]
    assert any(str(path) in r.message and "corrupt or truncated" in r.message for r in caplog.records)


class _Trial:
    """What the MLflow callback reads of a Tune trial."""

    def __init__(self, trial_id: str, lr: float) -> None:
        self.trial_id, self.config, self.error_file = trial_id, {"lr": lr}, None


def _logger(uri: str, experiment_id: str, parent_id: str):
    """A fresh driver-side callback, as a (re)started sweep driver builds it."""
    from kd_platform.tracking.mlflow_callback import MlflowTrialLogger
    return MlflowTrialLogger(uri, experiment_id, parent_id, "ce", {"dataset": "digits", "arch": "resnet8", "epochs": 3},
                             0, 3, tags={"method": "ce", "kind": "trial"})


def _tracked_sweep(tmp_path: Path) -> tuple:
    from kd_platform import tracking
    uri = sqlite_uri(tmp_path / "mlruns.db")
    experiment_id = tracking.ensure_experiment(uri, "ce")
    parent = tracking.client(uri).create_run(experiment_id, tags={"kind": "sweep"}).info.run_id
    return uri, experiment_id, parent


def _result(epoch: int, node: str = "node-a") -> dict:
    return {"epoch": epoch, "val/acc/students_mean": 10.0 * epoch, "node_id": node}


def test_an_epoch_trained_again_after_a_driver_restart_is_logged_once(tmp_path):
    uri, experiment_id, parent = _tracked_sweep(tmp_path)
    trial = _Trial("t1", 0.1)
    first = _logger(uri, experiment_id, parent)
    first.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        first.on_trial_result(0, [], trial, _result(epoch))
    # The driver died before Tune persisted the epoch-2 checkpoint: the resumed trial trains
    # epoch 2 again, on the new driver's cluster.
    second = _logger(uri, experiment_id, parent)
    second.on_trial_start(0, [], trial)
    for epoch in (2, 3):
        second.on_trial_result(0, [], trial, _result(epoch, node="node-b"))
    second.on_trial_complete(0, [], trial)
    (run,) = [r for r in runs_in(uri) if r.data.tags.get("ray.trial_id") == "t1"]
    assert run.info.status == "FINISHED" and run.data.tags["epochs_run"] == "3"
    assert [m.step for m in _history(uri, run.info.run_id, "epoch")] == [1, 2, 3]
    assert [m.step for m in _history(uri, run.info.run_id, "val/acc/students_mean")] == [1, 2, 3]
    assert run.data.tags["epochs_replayed"] == "1"
    assert run.data.tags["node_id"] == "node-b"  # where it trains now


def test_a_trial_lost_with_the_driver_is_closed_and_trashed(tmp_path):
    uri, experiment_id, parent = _tracked_sweep(tmp_path)
    done, lost, replacement = _Trial("done", 0.1), _Trial("lost", 0.05), _Trial("again", 0.05)
    first = _logger(uri, experiment_id, parent)
    first.on_trial_start(0, [], done)
    first.on_trial_result(0, [], done, _result(3))
    first.on_trial_complete(0, [], done)
    first.on_trial_start(0, [], lost)  # started, then the driver died before Tune's next snapshot
    second = _logger(uri, experiment_id, parent)
    second.on_trial_start(0, [], replacement)
    second.on_trial_result(0, [], replacement, _result(3))
    second.on_trial_complete(0, [], replacement)
    second.on_experiment_end([done, replacement])
    children = [r for r in runs_in(uri) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["ray.trial_id"] for r in children) == ["again", "done"]
    assert all(r.info.status == "FINISHED" for r in children)
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    (trashed,) = MlflowClient(uri).search_runs([experiment_id], "tags.`ray.trial_id` = 'lost'",
                                               run_view_type=ViewType.DELETED_ONLY)
    assert trashed.info.status == "KILLED" and trashed.data.tags["trial_outcome"] == "lost"


def test_an_error_wrapping_a_traceback_is_reported_by_the_error_it_wraps():
    """Tune ends a sweep whose trial died with ``TuneError(<the trial's whole traceback>)``:
    its first line is ``Traceback (most recent call last):``, which says nothing."""
    import errno
    import traceback

    from ray.tune.error import TuneError

    from kd_platform.errors import error_line
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        wrapped = TuneError(traceback.format_exc())
    assert error_line(wrapped) == "OSError: [Errno 28] No space left on device"
    assert error_line(ValueError("bad knob\nmore")) == "ValueError: bad knob"
    assert error_line(RuntimeError()) == "RuntimeError"


@contextmanager
def _tmpfs(tmp_path, free_mib: float):
    """A 40 MiB tmpfs with ``free_mib`` left: the disk under --out, run out on purpose."""
    import shutil
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    (mount / "filler").write_bytes(bytes(shutil.disk_usage(mount).free - int(free_mib * 2 ** 20)))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """1 MiB left: less than two of the sweep's checkpoints."""
    with _tmpfs(tmp_path, 1) as mount:
        yield mount


@pytest.fixture
def filling_disk(tmp_path):
    """5.5 MiB left against a 5 MiB margin: the first checkpoint crosses it, with room to spare."""
    with _tmpfs(tmp_path, 5.5) as mount:
        yield mount


SPACE = "method: ce\nswept:\n  lr: {type: choice, values: [0.1, 0.05]}\n"


def _disk_sweep(tmp_path, out, margin_mib: float):
    space = tmp_path / "s.yaml"
    space.write_text(SPACE)
    return run_cli("platform.sweep", "ce", "--space", str(space), "--samples", "2", "--epochs", "3", "--no-confirm",
                   "--no-report", "--out", str(out), "--name", "full", "--tracking-uri", sqlite_uri(tmp_path / "m.db"),
                   env={"KD_MIN_FREE_MB": str(margin_mib)})


def _outcomes(uri):
    parent, children = _children(uri)
    return parent, children, [(x.info.status, x.data.tags.get("trial_outcome"), x.data.tags.get("error"))
                              for x in children]


def test_a_disk_below_the_margin_stops_the_sweep_with_its_state_saved_and_resumes(tmp_path, filling_disk):
    import re
    uri, out = sqlite_uri(tmp_path / "m.db"), filling_disk / "res"
    r = _disk_sweep(tmp_path, out, 5)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(r"disk nearly full under .*res.* \(\d+ MiB free, 5 MiB kept .*KD_MIN_FREE_MB"
                                          r".*then --resume", errors[0]), r.stderr
    parent, children, seen = _outcomes(uri)
    # Stopped like Ctrl-C, before anything was cut short: every run KILLED or finished, none FAILED.
    assert parent.info.status == "KILLED" and children, seen
    assert all(s in ("KILLED", "FINISHED") for s, _, _ in seen), seen
    (filling_disk / "filler").unlink()
    again = run_cli("platform.sweep", "ce", "--resume", str(out / "full"), "--no-report", "--quiet",
                    env={"KD_MIN_FREE_MB": "5"})
    assert again.returncode == 0, again.stderr[-3000:]
    parent, children, seen = _outcomes(uri)
    assert parent.info.status == "FINISHED"
    assert sorted(s for s, _, _ in seen) == ["FINISHED", "FINISHED"], seen


def test_a_disk_already_below_the_margin_is_one_line_and_nothing_written(tmp_path, small_disk):
    out = small_disk / "res"
    r = _disk_sweep(tmp_path, out, 5)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: disk nearly full under {out / 'full'} (1 MiB free, 5 MiB needed; "
                                             f"KD_MIN_FREE_MB sets the margin): free space first"], r.stderr
    assert not out.exists() and not runs_in(sqlite_uri(tmp_path / "m.db"))


def test_a_disk_that_fills_at_once_is_one_line_closes_every_run_and_resumes_or_says_why_not(tmp_path, small_disk):
    """With the margin off, the disk fills under a trial's checkpoint or under Tune's own files;
    which, depends on the moment. A Tune file cut short cannot be resumed from: --resume says so
    in one line and changes nothing, rather than resuming what it can into fewer trials."""
    import re
    uri, out = sqlite_uri(tmp_path / "m.db"), small_disk / "res"
    r = _disk_sweep(tmp_path, out, 0)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(r"disk full under .*full \(\d+ KiB free\)", errors[0]), r.stderr
    runs = runs_in(uri)
    assert runs and not [x for x in runs if x.info.status == "RUNNING"]
    assert next(x for x in runs if x.data.tags.get("kind") == "sweep").info.status == "FAILED"
    (small_disk / "filler").unlink()
    before = _outcomes(uri)[2]
    again = run_cli("platform.sweep", "ce", "--resume", str(out / "full"), "--no-report", "--quiet",
                    env={"KD_MIN_FREE_MB": "0"})
    parent, children, seen = _outcomes(uri)
    if again.returncode == 2:
        line = again.stderr.strip()
        assert re.fullmatch(r"error: --resume: Ray Tune's state file '.*full/[a-z_-]+[-0-9_]*\.(json|pkl)' is damaged "
                            r"\(\d+ bytes; .*\): this experiment cannot resume\. .*", line), line
        assert seen == before and parent.info.status == "FAILED"
        return
    assert again.returncode == 0, again.stderr[-3000:]
    # Both samples finished; a trial whose state the full disk kept Tune from saving was asked for
    # again, and its first run stays FAILED with the reason. None is left RUNNING.
    assert parent.info.status == "FINISHED"
    assert len([x for x in children if x.info.status == "FINISHED"]) == 2, seen
    assert all(x.info.status == "FINISHED" or (x.info.status == "FAILED" and x.data.tags.get("error"))
               for x in children), seen
    # A reopened run that finished keeps its interrupted attempt's error aside, not as its own.
    assert not [x for x in children + [parent] if x.info.status == "FINISHED" and "error" in x.data.tags], seen


def test_a_tune_state_file_cut_short_is_named(tmp_path):
    import pickle

    from kd_platform.sweep.disk import check_tune_state
    (tmp_path / "experiment_state-2026.json").write_text('{"trial_data": []}')
    (tmp_path / "searcher-state-2026.pkl").write_bytes(pickle.dumps({"a": 1}))
    check_tune_state(str(tmp_path))
    (tmp_path / "search_gen_state-2026.json").write_bytes(pickle.dumps({"counter": 2})[:5])
    with pytest.raises(UsageError, match=r"search_gen_state-2026\.json' is damaged \(5 bytes"):
        check_tune_state(str(tmp_path))
    check_tune_state("s3://bucket/sweep")  # remote storage is Tune's to check


def test_the_disk_margin_grows_with_the_largest_checkpoint(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from kd_platform.sweep.disk import MIB, DiskGuard
    monkeypatch.setenv("KD_MIN_FREE_MB", "1")
    guard = DiskGuard([str(tmp_path), "s3://bucket/prefix"], concurrent=3)
    assert guard.needed() == MIB and guard.folders == [tmp_path]
    checkpoint = tmp_path / "checkpoint_000001"
    checkpoint.mkdir()
    (checkpoint / "state.pt").write_bytes(bytes(2 * MIB))
    guard.on_checkpoint(1, [], None, SimpleNamespace(path=str(checkpoint)))
    # Every running trial may write a new checkpoint before its old one is deleted.
    assert guard.needed() == 2 * 3 * 2 * MIB and guard.low is None
    monkeypatch.setenv("KD_MIN_FREE_MB", "0")
    assert DiskGuard([str(tmp_path)], 3).needed() == 0
    monkeypatch.setenv("KD_MIN_FREE_MB", "lots")
    with pytest.raises(UsageError, match="KD_MIN_FREE_MB='lots' is not a number of MiB"):
        DiskGuard([str(tmp_path)], 3)
