"""Sweeps on a multi-node Ray cluster: a head and two worker nodes on this one machine
(``ray.cluster_utils.Cluster``), each with its own CPU, driven through the real command
line with ``--address``. Placement is read back from the MLflow tags the trials leave."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, private_ray_tmpdir, run_cli, runs_in, sqlite_uri

pytestmark = pytest.mark.slow

# No ASHA stop before the last epoch: every trial must run for as long as the test expects.
SPACE = """\
swept:
  lr: {type: choice, values: [0.05, 0.1]}
asha: {grace_period: 5}
"""


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, with the dashboard that Train V2 needs) and two 1-CPU worker nodes.

    Ray writes the newest cluster's address where any plain ``ray.init()`` on the machine
    would pick it up and join; a private, short temp directory (its socket paths must fit
    in 107 bytes) keeps this cluster out of every other test's way."""
    from ray.cluster_utils import Cluster
    with private_ray_tmpdir("kdmn"):
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
        try:
            for _ in range(2):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            yield c
        finally:
            c.shutdown()


def _node_ids(c) -> set[str]:
    return {c.head_node.node_id, *(n.node_id for n in c.worker_nodes)}


def _sweep_args(tmp_path: Path, c, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return ["platform.sweep", "ce", "--no-confirm", "--space", str(space), "--address", c.address,
            "--tracking-uri", sqlite_uri(tmp_path / "mlruns.db"), "--out", str(tmp_path / "res"), "--quiet", *extra]


def _children(uri: str) -> list:
    runs = runs_in(uri)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def _history(uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient
    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def test_in_process_trials_land_on_several_nodes(cluster, tmp_path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    out = run_cli(*_sweep_args(tmp_path, cluster, "--samples", "2", "--epochs", "1", "--max-concurrent", "2"))
    assert out.returncode == 0, out.stderr[-3000:]
    children = _children(uri)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    placed = [c.data.tags["node_id"] for c in children]
    # One CPU per node and two trials at once: Ray has to put them on different nodes.
    assert len(set(placed)) == 2 and set(placed) <= _node_ids(cluster)
    assert all("train_worker_nodes" not in c.data.tags for c in children)  # no TorchTrainer in-process


def test_train_workers_of_one_trial_sit_on_different_nodes(cluster, tmp_path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    # The trial's own driver takes 0.01 CPU of one node, so two 1-CPU workers cannot share a node.
    out = run_cli(*_sweep_args(tmp_path, cluster, "--samples", "1", "--epochs", "1",
                               "--workers-per-trial", "2", "--cpus-per-trial", "1"))
    assert out.returncode == 0, out.stderr[-3000:]
    (child,) = _children(uri)
    assert child.info.status == "FINISHED"
    workers = child.data.tags["train_worker_nodes"].split(",")
    assert len(workers) == 2 and len(set(workers)) == 2 and set(workers) <= _node_ids(cluster)
    assert child.data.tags["node_id"] in workers  # rank 0's node
    assert [m.step for m in _history(uri, child.info.run_id, "epoch")] == [1]


def _placements(db: Path) -> dict[str, str]:
    """run id -> node id of every trial that has reported at least one epoch."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db) as con:
            return dict(con.execute("select run_uuid, value from tags where key = 'node_id'").fetchall())
    except sqlite3.OperationalError:  # tables not created yet
        return {}


def test_sweep_survives_losing_a_worker_node(cluster, tmp_path):
    cluster.add_node(num_cpus=1)  # a free node for the retried trial to land on
    cluster.wait_for_nodes()
    db = tmp_path / "mlruns.db"
    uri = sqlite_uri(db)
    # Five short epochs: the node goes after a trial's first one, with most of its work still to do.
    proc = subprocess.Popen([sys.executable, "-m", *_sweep_args(tmp_path, cluster, "--samples", "2", "--epochs", "5",
                                                                 "--max-concurrent", "2")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        workers = {n.node_id: n for n in cluster.worker_nodes}
        deadline = time.time() + 300
        victim = None
        while victim is None and time.time() < deadline and proc.poll() is None:
            victim = next(((run, node) for run, node in _placements(db).items() if node in workers), None)
            time.sleep(0.3)
        assert victim is not None, "no trial reported an epoch from a worker node"
        run_id, node = victim
        t_fault = time.time()
        cluster.remove_node(workers[node])
        output, _ = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    end = time.time()
    assert proc.returncode == 0, output[-3000:]
    children = _children(uri)
    assert len(children) == 2  # every trial accounted for, none duplicated
    for c in children:
        assert c.info.status in ("FINISHED", "FAILED")
        if c.info.status == "FAILED":
            assert c.data.tags.get("error")
    moved = next(c for c in children if c.info.run_id == run_id)
    # Tune's FailureConfig retried the trial on a surviving node, from its last checkpoint.
    assert moved.info.status == "FINISHED" and moved.data.tags["trial_outcome"] == "completed"
    assert moved.data.tags["node_id"] != node and moved.data.tags["node_id"] in _node_ids(cluster)
    epochs = _history(uri, run_id, "epoch")
    assert [m.step for m in epochs] == [1, 2, 3, 4, 5]
    # Resumed, not restarted: at most the epoch in flight when the node went was trained again.
    assert int(moved.data.tags.get("epochs_replayed", 0)) <= 1
    after = [m for m in epochs if m.timestamp >= t_fault * 1000]
    recovery = after[0].timestamp / 1000 - t_fault
    print(f"\n[recovery] worker node removed: trial {moved.data.tags['ray.trial_id']} reported epoch "
          f"{after[0].step} on another node {recovery:.1f}s later; sweep ended {end - t_fault:.1f}s after the loss")
