"""The confirmation stage end to end, on a real local Ray cluster, a real Optuna study and a
real sqlite MLflow store: a sweep whose swept knob breaks training names a winner, and one
whose swept knob changes nothing says its configurations are indistinguishable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import runs_in, sqlite_uri

pytestmark = pytest.mark.slow


def _sweep(tmp_path, name, swept, capsys):
    from kd_platform.cli import _sweep
    space = tmp_path / f"{name}.yaml"
    space.write_text(f"method: ce\nsamples: 2\nepochs: 1\nswept:\n{swept}")
    uri = sqlite_uri(tmp_path / f"{name}.db")
    code = _sweep(["ce", "--space", str(space), "--tracking-uri", uri, "--out", str(tmp_path / "res"),
                   "--name", name, "--confirm-top", "2", "--confirm-seeds", "2", "--quiet"])
    out = capsys.readouterr().out
    runs = runs_in(uri)
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return code, out, parent, children


def test_a_knob_that_breaks_training_gives_a_winner(ray_local, tmp_path, capsys):
    # TPE's first two samples of this choice are 0.1 and 0.0 (seeded): lr=0 never trains.
    code, out, parent, children = _sweep(tmp_path, "breaks", "  lr: {type: choice, values: [0.1, 0.0]}\n", capsys)
    assert code == 0, out
    confirm = [c for c in children if c.data.tags.get("stage") == "confirm"]
    search = [c for c in children if c.data.tags.get("stage") == "search"]
    assert len(search) == 2 and len(confirm) == 4  # lr=0.1 is also the defaults: 2 configurations x 2 seeds
    assert sorted(c.data.params["seed"] for c in confirm) == ["1", "1", "2", "2"]
    assert all(c.info.status == "FINISHED" and c.data.tags["trial_outcome"] == "completed" for c in confirm)
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["confirm.verdict"] == "winner" and float(tags["best.lr"]) == 0.1
    assert "Winner: top" in out and "(= defaults)" in out
    good = [c.data.metrics["val/acc/students_mean"] for c in confirm if float(c.data.params["lr"]) == 0.1]
    assert metrics["best/val/acc/students_mean"] == pytest.approx(sum(good) / 2)
    assert metrics["best/val/acc/students_mean/ci_low"] < metrics["best/val/acc/students_mean"] \
        < metrics["best/val/acc/students_mean/ci_high"]
    assert set(tags["best_run_ids"].split(",")) == {c.info.run_id for c in confirm
                                                     if float(c.data.params["lr"]) == 0.1}
    assert "search_best.lr" in tags and "search_best/val/acc/students_mean" in metrics
    from mlflow.tracking import MlflowClient
    uri = sqlite_uri(tmp_path / "breaks.db")
    assert "confirmation.md" in {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    # The report states the noise these confirmation runs measured, and that lr's effect exceeds it.
    from kd_platform.analysis.cli import main
    assert main(["--sweep", parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "**Seed noise**" in report and "pooled over 2 configurations, 4 confirmation runs" in report
    effects = (tmp_path / "rep" / "effects_vs_noise.csv").read_text().splitlines()
    assert effects[0].startswith("knob,marginal_effect,noise_threshold,exceeds_noise")
    assert effects[1].startswith("lr,") and ",yes," in effects[1]
    assert "Marginal effects larger than the seed noise: `lr`" in report


def test_a_knob_that_changes_nothing_gives_no_winner(ray_local, tmp_path, capsys):
    code, out, parent, children = _sweep(
        tmp_path, "same", "  label_smoothing: {type: choice, values: [0.0, 0.0001]}\n", capsys)
    assert code == 0, out
    assert parent.data.tags["confirm.verdict"] == "indistinguishable"
    assert "configurations are indistinguishable at this budget: seed std" in out
    assert "Winner" not in out
    assert len([c for c in children if c.data.tags.get("stage") == "confirm"]) == 4


def test_a_sweep_killed_in_its_confirmation_resumes_it(tmp_path):
    """Each (configuration, seed) of the confirmation is trained once, whatever the kill interrupted."""
    from conftest import REPO, finished_runs, kill_session, run_cli
    db, res = tmp_path / "m.db", tmp_path / "res"
    space = tmp_path / "s.yaml"
    space.write_text("method: ce\nswept:\n  lr: {type: choice, values: [0.1, 0.05]}\n")
    args = ["ce", "--space", str(space), "--samples", "2", "--epochs", "2", "--max-concurrent", "1",
            "--confirm-top", "2", "--confirm-seeds", "2", "--tracking-uri", sqlite_uri(db), "--out", str(res),
            "--name", "ce-confirm", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "platform.sweep", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while finished_runs(db, "confirm") < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before its confirmation could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_session(proc.pid)
    out = run_cli("platform.sweep", "ce", "--resume", str(res / "ce-confirm"), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Confirmation: 3 configurations x 2 fresh seeds" in out.stdout or \
        "Confirmation: 2 configurations x 2 fresh seeds" in out.stdout
    runs = runs_in(sqlite_uri(db))
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["confirm.verdict"] in ("winner", "indistinguishable")
    live = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert not [r for r in live if r.info.status == "RUNNING"]
    confirm = [r for r in live if r.data.tags.get("stage") == "confirm" and r.info.status == "FINISHED"]
    cells = [(r.data.params["lr"], r.data.params["seed"]) for r in confirm]
    assert len(cells) == len(set(cells)) and {s for _, s in cells} == {"1", "2"}
    assert len(cells) in (4, 6)  # two or three configurations (the defaults may be a search best)

