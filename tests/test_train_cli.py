"""`python -m platform.train` trains one run and logs it to MLflow like a sweep's trial."""
from __future__ import annotations

import pytest
from conftest import run_cli, runs_in, sqlite_uri

pytestmark = pytest.mark.slow


def test_single_run_logged_to_mlflow(tmp_path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    out = run_cli("platform.train", "okdph", "--set", "omega=0.5", "--set", "fusion_interval=5",
                  "--epochs", "2", "--seed", "1", "--tracking-uri", uri, "--out", str(tmp_path / "res"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "val/acc/students_mean" in out.stdout and "mlflow ui --backend-store-uri" in out.stdout
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["omega"] == "0.5" and run.data.params["fusion_interval"] == "5"
    assert run.data.params["seed"] == "1" and run.data.tags["method"] == "okdph"
    assert run.data.metrics["val/acc/students_mean"] > 10.0  # better than chance on 10 classes
    assert "test/acc/hwm" in run.data.metrics and "train/loss/ce_hwm" in run.data.metrics
    assert list((tmp_path / "res").glob("okdph-*/checkpoint/state.pt"))


def test_mlflow_tracking_uri_environment_is_honoured(tmp_path):
    uri = sqlite_uri(tmp_path / "env.db")
    out = run_cli("platform.train", "ce", "--epochs", "1", "--out", str(tmp_path / "res"),
                  env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = runs_in(uri)
    assert run.data.tags["method"] == "ce" and run.info.status == "FINISHED"


def test_two_ddp_workers_through_ray_train(tmp_path):
    from mlflow.tracking import MlflowClient
    curves = {}
    for workers in ("2", "1"):
        uri = sqlite_uri(tmp_path / f"w{workers}.db")
        out = run_cli("platform.train", "okdph", "--workers-per-trial", workers, "--epochs", "3",
                      "--tracking-uri", uri, "--out", str(tmp_path / "res"))
        assert out.returncode == 0, out.stderr[-3000:]
        # A DDP run prints what a one-worker run prints: no per-rank reports, no Train notes.
        text = out.stdout + out.stderr
        assert "TrainingReport" not in text and "PreemptionWatcher" not in text and "pid=" not in text, text
        assert (out.stdout.strip().splitlines()[-1].lstrip().startswith("train run ")), out.stdout
        (run,) = runs_in(uri)
        assert run.info.status == "FINISHED"
        history = MlflowClient(uri).get_metric_history(run.info.run_id, "val/acc/students_mean")
        assert sorted(m.step for m in history) == [1, 2, 3]  # once per epoch: rank 0 logs, not both
        curves[workers] = [m.value for m in sorted(history, key=lambda m: m.step)]
    # Two gloo workers (each half of every batch, gradients averaged) follow the one-worker
    # trajectory within noise; BatchNorm statistics per half-batch are the expected difference.
    assert curves["2"][-1] > 80.0 and abs(curves["2"][-1] - curves["1"][-1]) < 8.0, curves


def _rank_means(rank: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from kd_platform.run.engine import _epoch_means
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sums = {"loss": torch.tensor(2.0 + 4.0 * rank), "kd": torch.tensor(1.0 * rank)}
    queue.put((rank, _epoch_means(sums, 2, 2)))
    dist.destroy_process_group()


def test_ddp_loss_terms_are_the_mean_over_every_rank():
    """Rank 0 summed 2.0 over its 2 steps, rank 1 summed 6.0: the epoch's loss is 8 / 4 = 2.0 on
    both ranks, not rank 0's own 1.0."""
    import multiprocessing as mp

    from conftest import free_port
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_means, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert got[0] == got[1] == {"kd": 0.25, "loss": 2.0}
