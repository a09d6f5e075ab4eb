"""The MLflow store under faults and concurrency: a real ``mlflow server`` on 127.0.0.1 that the
tests stop and restart, and real sqlite files shared by two sweeps at once."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, runs_in, sqlite_uri

SPACE = """\
swept:
  lr: {type: choice, values: [0.1, 0.05]}
asha: {grace_period: 20}
"""
LOCK_S = 26  # longer than the 20 s that MLflow's sqlite sessions wait for a lock (busy_timeout)


class Server:
    """``mlflow server`` on a sqlite file: started, stopped (SIGTERM) and started again on its port."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.db = root / "server.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlite_uri(self.db), "--host",
             "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "a"),
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not start in {timeout}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with pytest.raises(OSError):  # really down
            urllib.request.urlopen(f"{self.uri}/health", timeout=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    yield s
    s.stop()


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def _new_run(uri: str) -> str:
    from kd_platform import tracking
    experiment_id = tracking.ensure_experiment(uri, "store-faults")
    return tracking.client(uri).create_run(experiment_id).info.run_id


def test_writes_held_while_the_server_is_down_are_sent_exactly_once(server, tmp_path):
    from kd_platform import tracking
    from kd_platform.tracking.mlflow_writer import BufferedClient
    run_id = _new_run(server.uri)
    spill = tmp_path / "unsent.jsonl"
    buffered = BufferedClient(tracking.raw_client(server.uri), spill_to=spill)
    tracking.log_metrics(buffered, run_id, {"epoch": 1, "val/acc": 10.0}, step=1)
    assert not buffered.pending and _steps(server.uri, run_id, "val/acc") == [1]
    server.stop()
    slowest = 0.0
    for epoch in range(2, 6):
        t0 = time.monotonic()
        tracking.log_metrics(buffered, run_id, {"epoch": epoch, "val/acc": 10.0 * epoch}, step=epoch)
        slowest = max(slowest, time.monotonic() - t0)
    tracking.set_tags(buffered, run_id, {"trial_outcome": "completed"})
    buffered.set_terminated(run_id, status="FINISHED")
    assert slowest < 3, f"a write held the caller {slowest:.1f}s while the store was down"
    assert len(buffered.pending) == 6
    assert buffered.flush(patience=2) == 6  # bounded: gives up, keeps everything
    assert len(spill.read_text().splitlines()) == 6  # on disk too, for a driver killed now
    server.start()
    # A resumed sweep sends what the file kept, and the first client sends its queue as well:
    # every write goes twice, and each epoch is still in MLflow once.
    again = BufferedClient(tracking.raw_client(server.uri))
    assert again.load(spill) == 6 and again.flush(patience=60) == 0
    assert buffered.flush(patience=60) == 0 and not spill.exists()
    for key in ("epoch", "val/acc"):
        assert _steps(server.uri, run_id, key) == [1, 2, 3, 4, 5]
    run = tracking.client(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial_outcome"] == "completed"
    assert run.data.metrics["val/acc"] == 50.0


def test_a_lock_longer_than_sqlites_busy_wait_is_waited_out(tmp_path):
    from mlflow.tracking import MlflowClient

    from kd_platform import tracking
    uri = sqlite_uri(tmp_path / "mlruns.db")
    run_id = _new_run(uri)
    held = threading.Event()

    def hold_lock(seconds: float) -> None:  # another writer: a backup, a third sweep, an sqlite shell
        con = sqlite3.connect(tmp_path / "mlruns.db", isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        held.set()
        time.sleep(seconds)
        con.execute("COMMIT")
        con.close()

    thread = threading.Thread(target=hold_lock, args=(LOCK_S,))
    thread.start()
    held.wait()
    t0 = time.monotonic()
    with pytest.raises(Exception, match="database is locked"):  # MLflow alone waits 20 s, then fails
        MlflowClient(uri).set_tag(run_id, "k", "v")
    assert time.monotonic() - t0 < LOCK_S
    tracking.set_tags(tracking.client(uri), run_id, {"k": "v"})  # retried until the lock is gone
    assert time.monotonic() - t0 >= LOCK_S - 1
    thread.join()
    assert tracking.client(uri).get_run(run_id).data.tags["k"] == "v"


def _sweep(tmp_path: Path, uri: str, out: str, epochs: int) -> subprocess.Popen:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)  # no ASHA stop: every trial runs all its epochs
    return subprocess.Popen(
        [sys.executable, "-m", "platform.sweep", "ce", "--no-confirm", "--space", str(space), "--samples", "2", "--epochs",
         str(epochs), "--tracking-uri", uri, "--out", str(tmp_path / out), "--quiet"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _epochs_logged(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from metrics where key = 'epoch'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _check_sweep(uri: str, parent, runs: list, epochs: int) -> list:
    """The parent FINISHED, two FINISHED children, each with every epoch exactly once."""
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["epochs_run"] == str(epochs)
        for key in ("epoch", "val/acc/students_mean", "train/loss/loss"):
            assert _steps(uri, child.info.run_id, key) == list(range(1, epochs + 1)), (key, child.info.run_id)
    return children


@pytest.mark.slow
def test_a_sweep_outlives_a_30s_server_outage_with_every_epoch_once(server, tmp_path):
    epochs = 8
    before = _epochs_logged(server.db)
    sweep = _sweep(tmp_path, server.uri, "res", epochs)
    try:
        _wait_for(lambda: _epochs_logged(server.db) > before or sweep.poll() is not None, 300, "the first epoch")
        stopped = time.time()
        server.stop()
        time.sleep(30)
        server.start()
        restarted = time.time()
        out, err = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, err[-3000:]
    from mlflow.tracking import MlflowClient
    c = MlflowClient(server.uri)
    sweep_dir = next((tmp_path / "res").iterdir())
    (parent,) = [r for r in runs_in(server.uri) if r.data.tags.get("kind") == "sweep"]
    children = _check_sweep(server.uri, parent, runs_in(server.uri), epochs)
    # Epochs trained while the server was down were held and sent after it came back.
    held = [m for ch in children for m in c.get_metric_history(ch.info.run_id, "epoch")
            if stopped * 1000 < m.timestamp < restarted * 1000]
    assert held, "no epoch finished during the outage: the test proved nothing"
    assert "holding" in err and "back after" in err and "Traceback" not in err
    assert not (sweep_dir / "mlflow_unsent.jsonl").exists()
    print(f"\n{len(held)} epoch(s) held during the 30 s outage; sweep wall time in MLflow "
          f"{parent.data.metrics['sweep/wall_s']:.0f}s")
    print("\n".join(line for line in err.splitlines() if "MLflow store" in line))


@pytest.mark.slow
def test_two_sweeps_at_once_on_one_sqlite_file(tmp_path):
    db = tmp_path / "mlruns.db"  # new: both sweeps race to create its tables and the experiment
    uri, epochs = sqlite_uri(db), 4
    sweeps = [_sweep(tmp_path, uri, out, epochs) for out in ("a", "b")]
    try:
        # A third writer holds the database for longer than MLflow's busy wait while both train.
        _wait_for(lambda: _epochs_logged(db) > 0 or any(p.poll() is not None for p in sweeps), 300, "an epoch")
        con = sqlite3.connect(db, isolation_level=None, timeout=30)
        con.execute("BEGIN EXCLUSIVE")
        time.sleep(LOCK_S)
        con.execute("COMMIT")
        con.close()
        outputs = [p.communicate(timeout=600) for p in sweeps]
    finally:
        for p in sweeps:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(sweeps, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "locked" not in (out + err).lower() and "Traceback" not in err
    assert any("holding" in err for _, err in outputs), "the lock met no write: the test proved nothing"
    runs = runs_in(uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 2 and len({r.info.experiment_id for r in runs}) == 1
    for parent in parents:
        _check_sweep(uri, parent, runs, epochs)


class _Trial:
    """What the MLflow callback reads of a Tune trial."""

    def __init__(self, trial_id: str, lr: float) -> None:
        self.trial_id, self.config, self.error_file = trial_id, {"lr": lr}, None


def test_a_store_that_never_comes_back_is_one_line_and_a_resumed_sweep_sends_the_rest(server, tmp_path,
                                                                                        monkeypatch):
    from kd_platform import tracking
    from kd_platform.tracking.mlflow_callback import MlflowTrialLogger
    from kd_platform.tracking.mlflow_writer import StoreUnavailable
    experiment_id = tracking.ensure_experiment(server.uri, "store-gone")
    parent = tracking.client(server.uri).create_run(experiment_id, tags={"kind": "sweep"}).info.run_id
    unsent = tmp_path / "sweep" / "mlflow_unsent.jsonl"

    def logger():  # as a (resumed) sweep driver builds it
        return MlflowTrialLogger(server.uri, experiment_id, parent, "ce",
                                 {"dataset": "digits", "arch": "resnet8", "epochs": 3}, 0, 3,
                                 tags={"method": "ce", "kind": "trial"}, unsent=unsent)

    monkeypatch.setenv("KD_PLATFORM_MLFLOW_PATIENCE_S", "2")
    first, trial = logger(), _Trial("t1", 0.1)
    server.stop()  # before the trial starts: its run cannot even be created
    first.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        first.on_trial_result(0, [], trial, {"epoch": epoch, "val/acc/students_mean": 10.0 * epoch})
    first.on_trial_complete(0, [], trial)
    first.on_experiment_end([trial])
    with pytest.raises(StoreUnavailable) as err:
        first.close()
    kept = len(unsent.read_text().splitlines())
    message = str(err.value)
    assert "\n" not in message and f"{kept} write(s) unsent" in message and str(unsent) in message
    assert kept == 6  # the run's opening, three epochs, the outcome tags, the end
    server.start()
    logger().close()  # the resumed driver's callback reads the file first
    assert not unsent.exists()
    (run,) = [r for r in runs_in(server.uri) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert run.info.status == "FINISHED" and run.data.tags["epochs_run"] == "3"
    assert run.data.params["lr"] == "0.1" and run.data.tags["ray.trial_id"] == "t1"
    assert _steps(server.uri, run.info.run_id, "val/acc/students_mean") == [1, 2, 3]
