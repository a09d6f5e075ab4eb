"""Sweeps end to end on a real local Ray cluster, a real sqlite MLflow store and a real Optuna study."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, finished_runs, kill_session, run_cli, runs_in, sqlite_uri

pytestmark = pytest.mark.slow


def _children(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_two_trial_sweep_lands_in_mlflow(ray_local, tmp_path):
    from kd_platform.cli import sweep_settings
    from kd_platform.run.engine import RunSpec
    from kd_platform.sweep.tuner import run_sweep
    uri = sqlite_uri(tmp_path / "mlruns.db")
    s = sweep_settings(["okdph", "--samples", "2", "--epochs", "2", "--no-confirm", "--tracking-uri", uri,
                        "--out", str(tmp_path / "res"), "--seed", "3", "--quiet"])
    outcome = run_sweep(s)
    runs = runs_in(uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = _children(runs, parent.info.run_id)
    assert len(children) == 2 == outcome.trials
    all_knobs = set(RunSpec.from_flat("okdph", {}, 0).all_knobs())
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert child.info.status == "FINISHED"
        assert tags["method"] == "okdph" and tags["seed"] == "3" and tags["ray.trial_id"]
        assert len(tags["git_commit"]) >= 7
        assert set(params) == all_knobs and params["epochs"] == "2"
        ran = int(tags["epochs_run"])
        assert tags["trial_outcome"] == ("asha_stopped" if ran < 2 else "completed")
        for net in ("student1", "student2", "hwm", "ensemble", "students_mean"):
            hist = _history(uri, child.info.run_id, f"val/acc/{net}")
            assert [step for step, _ in hist] == list(range(1, ran + 1))
            assert all(0 <= v <= 100 for _, v in hist)
        assert [s for s, _ in _history(uri, child.info.run_id, "train/loss/kd")] == list(range(1, ran + 1))
        if ran == 2:
            assert "test/acc/students_mean" in child.data.metrics
    best = max(c.data.metrics["val/acc/students_mean"] for c in children
               if int(c.data.tags["epochs_run"]) == 2)
    assert parent.data.metrics["best/val/acc/students_mean"] == pytest.approx(best)
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    assert (tmp_path / "res" / s.name / "optuna.db").is_file()
    # The default space samples no degenerate corner: no trial trains identical students.
    assert not [c for c in children if c.data.tags.get("identical_peers") == "true"]


def test_failed_trials_end_as_failed_runs_with_the_error(tmp_path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    space = tmp_path / "space.yaml"  # ASHA may not stop a trial before its loss turns NaN
    space.write_text("swept:\n  omega: {type: uniform, low: 0.3, high: 0.9}\nasha: {grace_period: 3}\n")
    out = run_cli("platform.sweep", "okdph", "--space", str(space), "--samples", "2", "--epochs", "2", "--no-confirm",
                  "--tracking-uri", uri, "--out", str(tmp_path / "res"), "--quiet",
                  env={"KD_PLATFORM_FAULT": "nan@2"})
    assert out.returncode == 1, out.stderr[-3000:]
    runs = runs_in(uri)
    parent = [r for r in runs if r.data.tags.get("kind") == "sweep"][0]
    children = _children(runs, parent.info.run_id)
    assert len(children) == 2 and parent.info.status == "FAILED"
    for child in children:
        assert child.info.status == "FAILED"
        assert "non-finite training loss at epoch 2" in child.data.tags["error"]
        # The first epoch was fine and is kept.
        assert [s for s, _ in _history(uri, child.info.run_id, "val/acc/students_mean")] == [1]


def test_resume_after_the_driver_is_killed(tmp_path):
    db = tmp_path / "mlruns.db"
    uri = sqlite_uri(db)
    res = tmp_path / "res"
    args = ["okdph", "--samples", "3", "--epochs", "3", "--max-concurrent", "1", "--no-confirm", "--tracking-uri", uri,
            "--out", str(res), "--name", "okdph-resume", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "platform.sweep", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while finished_runs(db) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    kill_session(proc.pid)
    finished_before = finished_runs(db)
    assert 1 <= finished_before < 3

    resume_started = time.time()
    out = run_cli("platform.sweep", "okdph", "--resume", str(res / "okdph-resume"), "--quiet")
    done = time.time()
    assert out.returncode == 0, out.stderr[-3000:]
    runs = runs_in(uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # reopened, not duplicated
    children = _children(runs, parents[0].info.run_id)
    trial_ids = [c.data.tags["ray.trial_id"] for c in children]
    assert len(children) == 3 and len(set(trial_ids)) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    assert len(runs) == 4  # no orphan runs outside the sweep
    from mlflow.tracking import MlflowClient
    logged_after = []
    for child in children:
        # Each epoch logged exactly once: the interrupted trial went on from its checkpoint
        # rather than training (and logging) again from the start.
        history = MlflowClient(uri).get_metric_history(child.info.run_id, "epoch")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, int(child.data.tags["epochs_run"]) + 1)), (trial_ids, steps)
        # At most the epoch in flight at the kill was trained a second time (then not logged again).
        assert int(child.data.tags.get("epochs_replayed", 0)) <= 1
        logged_after += [m.timestamp / 1000 for m in history if m.timestamp / 1000 >= resume_started]
    print(f"\n[recovery] sweep driver SIGKILLed with {finished_before}/3 trials done: first epoch reported "
          f"{min(logged_after) - killed_at:.1f}s after the kill, resumed sweep finished {done - killed_at:.1f}s "
          f"after it (the --resume command alone {done - resume_started:.1f}s)")
    import optuna
    study = optuna.load_study(study_name="okdph-resume", storage=f"sqlite:///{res / 'okdph-resume' / 'optuna.db'}")
    # The trial running at the kill was asked for again after the restore; its first study
    # trial can never be told and is closed as FAIL, so TPE only learns from real results.
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert optuna.trial.TrialState.RUNNING not in states


def test_ablation_grid_with_seeds(ray_local, tmp_path):
    from kd_platform.cli import sweep_settings
    from kd_platform.sweep.tuner import run_sweep
    uri = sqlite_uri(tmp_path / "mlruns.db")
    s = sweep_settings(["okdph", "--ablate", "fusion_unit", "--seeds", "2", "--epochs", "1", "--tracking-uri", uri,
                        "--out", str(tmp_path / "res"), "--seed", "5", "--quiet"])
    assert s.samples == 4 and s.ablation.defaults == {"fusion_unit": "epoch"}
    run_sweep(s)
    runs = runs_in(uri)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "ablation"]
    assert parent.data.params["ablate"] == "fusion_unit" and parent.data.params["default.fusion_unit"] == "epoch"
    assert parent.data.params["pinned.omega"] == "0.8"  # other swept knobs sit at their declared defaults
    children = _children(runs, parent.info.run_id)
    cells = sorted((c.data.params["fusion_unit"], c.data.tags["seed"]) for c in children)
    assert cells == [("batch", "5"), ("batch", "6"), ("epoch", "5"), ("epoch", "6")]
    assert all(c.data.params["omega"] == "0.8" and c.data.tags["trial_outcome"] == "completed" for c in children)
    assert {c.data.params["seed"] for c in children} == {"5", "6"}


def test_ablation_rejects_a_range_without_values(tmp_path):
    out = run_cli("platform.sweep", "okdph", "--ablate", "nosuch", "--out", str(tmp_path / "res"),
                  "--tracking-uri", sqlite_uri(tmp_path / "m.db"))
    assert out.returncode == 2 and "unknown knob 'nosuch'" in out.stderr
    out = run_cli("platform.sweep", "okdph", "--seeds", "3", "--out", str(tmp_path / "res"),
                  "--tracking-uri", sqlite_uri(tmp_path / "m.db"))
    assert out.returncode == 2 and "--seeds only applies" in out.stderr
    assert not (tmp_path / "m.db").exists()


def test_ctrl_c_ends_a_sweep_resumably(tmp_path):
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) closes the runs of the
    trials it stopped as KILLED, says how to resume, and --resume then finishes every sample once."""
    import optuna
    db, res = tmp_path / "m.db", tmp_path / "res"
    space = tmp_path / "s.yaml"
    space.write_text("method: ce\nswept:\n  lr: {type: choice, values: [0.1, 0.05]}\n")
    args = ["ce", "--space", str(space), "--samples", "4", "--epochs", "8", "--max-concurrent", "1", "--no-confirm",
            "--no-report", "--tracking-uri", sqlite_uri(db), "--out", str(res), "--name", "ctrl-c"]
    proc = subprocess.Popen([sys.executable, "-m", "platform.sweep", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while finished_runs(db) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    kill_session(proc.pid)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and f"--resume {res / 'ctrl-c'}" in out
    runs = runs_in(sqlite_uri(db))
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert next(r for r in runs if r.data.tags.get("kind") == "sweep").info.status == "KILLED"

    again = run_cli("platform.sweep", "ce", "--resume", str(res / "ctrl-c"), "--quiet", "--no-report")
    assert again.returncode == 0, again.stderr[-3000:]
    runs = runs_in(sqlite_uri(db))
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    children = _children(runs, parent.info.run_id)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    study = optuna.load_study(study_name="ctrl-c", storage=f"sqlite:///{res / 'ctrl-c' / 'optuna.db'}")
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
