"""Trial packing: how many trials run at once, and fractional GPUs shared by several trials.

The end-to-end test declares a GPU on a CPU machine (Ray only counts it; torch sees no CUDA,
so the trials train on the CPU) and checks from MLflow that four 0.25-GPU trials really ran
at the same time on that one GPU."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import private_ray_tmpdir, run_cli, runs_in, sqlite_uri

from kd_platform.launch.launcher import Launch
from kd_platform.sweep.tuner import plan_packing

# Both epochs for every trial: ASHA must not stop one before the others have started.
SPACE = """\
swept:
  omega: {type: uniform, low: 0.3, high: 0.9}
asha: {grace_period: 5}
"""


def test_fractional_gpus_pack_trials_onto_one_gpu():
    p = plan_packing(Launch(cpus=1, gpus=0.25), 8, {"CPU": 4.0, "GPU": 1.0})
    assert (p.max_concurrent, p.trials_per_gpu) == (4, 4)
    assert p.line == ("Packing: 4 trials per GPU (0.25 GPU and 1 CPU each); 1 GPU and 4 CPUs in the cluster: "
                      "up to 4 trials at once")
    assert plan_packing(Launch(cpus=1, gpus=0.5), 8, {"CPU": 8.0, "GPU": 2.0}).max_concurrent == 4


def test_the_scarcer_resource_and_the_samples_bound_concurrency():
    p = plan_packing(Launch(cpus=1, gpus=0.25), 8, {"CPU": 2.0, "GPU": 1.0})
    assert p.max_concurrent == 2 and p.line.endswith("up to 2 trials at once (the CPUs are the limit)")
    assert plan_packing(Launch(cpus=1, gpus=0.25), 3, {"CPU": 16.0, "GPU": 2.0}).max_concurrent == 3
    # A fractional request never spans two GPUs: 0.4 GPU fits twice on each, not five times on two.
    assert plan_packing(Launch(cpus=1, gpus=0.4), 8, {"CPU": 16.0, "GPU": 2.0}).max_concurrent == 4
    assert plan_packing(Launch(cpus=2, gpus=2), 8, {"CPU": 16.0, "GPU": 4.0}).trials_per_gpu == 0.5


def test_cpu_trials_and_train_workers():
    p = plan_packing(Launch(cpus=1), 8, {"CPU": 2.0})
    assert (p.max_concurrent, p.trials_per_gpu, p.line) == (2, None, "")
    assert plan_packing(Launch(cpus=4), 8, {"CPU": 2.0}).max_concurrent == 1  # never below one
    # Two 1-CPU workers plus the trial driver's 0.01 CPU: three CPUs hold one such trial.
    assert plan_packing(Launch(cpus=1, workers=2), 8, {"CPU": 3.0}).max_concurrent == 1
    p = plan_packing(Launch(cpus=1, gpus=0.5, workers=2), 8, {"CPU": 8.0, "GPU": 2.0})
    assert (p.max_concurrent, p.trials_per_gpu) == (2, 1)


def test_an_explicit_limit_wins_and_the_autoscaler_ceiling_counts():
    p = plan_packing(Launch(cpus=1, gpus=0.25), 8, {"CPU": 4.0, "GPU": 1.0}, max_concurrent=2)
    assert p.max_concurrent == 2 and p.line.endswith("4 fit at once, --max-concurrent runs up to 2")
    # An autoscaling cluster whose GPU nodes have not started yet (cluster.yaml's CPU head).
    p = plan_packing(Launch(cpus=1, gpus=0.5), 64, {"CPU": 8.0}, max_resources={"CPU": 40.0, "GPU": 8.0})
    assert p.max_concurrent == 16 and "up to 8 GPUs and 40 CPUs as the autoscaler adds nodes" in p.line
    p = plan_packing(Launch(cpus=1, gpus=0.5), 64, {"CPU": 8.0})
    assert p.max_concurrent == 8 and "no GPU yet" in p.line


@pytest.fixture
def gpu_cluster():
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs and one declared GPU, in a private
    temp directory so that no plain ``ray.init()`` elsewhere in the session joins it."""
    from ray.cluster_utils import Cluster
    with private_ray_tmpdir("kdgpu"):
        c = None
        try:
            c = Cluster(initialize_head=True, head_node_args={
                # No dashboard: its fixed port may be taken by another test's cluster, and
                # in-process trials do not need it (Train V2 does).
                "num_cpus": 2, "num_gpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
            c.wait_for_nodes()
            yield c
        finally:
            if c is not None:
                c.shutdown()


@pytest.mark.slow
def test_four_quarter_gpu_trials_share_one_gpu_at_once(gpu_cluster, tmp_path: Path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    t0 = time.perf_counter()
    out = run_cli("platform.sweep", "okdph", "--no-confirm", "--space", str(space), "--gpus-per-trial", "0.25",
                  "--cpus-per-trial", "0.5", "--samples", "4", "--epochs", "2", "--address", gpu_cluster.address,
                  "--tracking-uri", uri, "--out", str(tmp_path / "res"), "--quiet",
                  # On Linux a driver replaces a loopback address by the machine's own IP, where
                  # this cluster does not listen; Ray's single-machine mode keeps 127.0.0.1.
                  env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, timeout=240)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("Packing: 4 trials per GPU (0.25 GPU and 0.5 CPU each); 1 GPU and 2 CPUs in the cluster: "
            "up to 4 trials at once") in out.stdout
    runs = runs_in(uri)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert parent.data.params["max_concurrent"] == "4" and parent.data.params["trials_per_gpu"] == "4"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    assert all(c.info.status == "FINISHED" and c.data.tags["trial_outcome"] == "completed" for c in children)
    assert [c.data.tags["gpu_ids"] for c in children] == ["0"] * 4
    # Each child run opens when Tune starts its trial and closes when the trial ends:
    # every one started before any finished, so all four held the GPU at the same time.
    last_start = max(c.info.start_time for c in children)
    first_end = min(c.info.end_time for c in children)
    assert last_start < first_end, [(c.info.start_time, c.info.end_time) for c in children]
    print(f"\n[packing] 4 trials on one declared GPU, all running together for "
          f"{(first_end - last_start) / 1000:.1f}s; the sweep command took {wall:.0f}s")
