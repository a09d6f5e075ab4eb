"""What a researcher sees: README command 1's console, the report on the parent run, and a
``--resume`` of a finished sweep that changes nothing. Real local Ray, Optuna and sqlite MLflow."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest
from conftest import run_cli, runs_in, sqlite_uri

pytestmark = pytest.mark.slow

MAX_LINES = 60


def _store(db):
    """Every run, metric, param and tag of the store, as rows: what "unchanged" is checked on."""
    with sqlite3.connect(db) as con:
        return {table: sorted(map(repr, con.execute(f"select * from {table}").fetchall()))
                for table in ("runs", "metrics", "latest_metrics", "params", "tags")}


def _files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_default_sweep_prints_a_readable_console_and_logs_its_report(tmp_path):
    db, res = tmp_path / "mlruns.db", tmp_path / "res"
    out = run_cli("platform.sweep", "okdph", "--tracking-uri", sqlite_uri(db), "--out", str(res), "--name", "d",
                  timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) <= MAX_LINES, "\n".join(lines)
    text = "\n".join(lines)
    assert "Trial status" not in text and "╭" not in text and "Reporting training result" not in text
    for knob in ("omega", "beta", "gamma", "fusion_interval", "fusion_unit", "temperature"):
        assert f"{knob}=" in text
    assert sum(line.lstrip().startswith("search ") for line in lines) == 8
    assert sum(line.lstrip().startswith("confirm ") for line in lines) == 9
    assert "configurations are indistinguishable at this budget" in text or "Winner:" in text
    assert lines[-1].lstrip().startswith("sweep run ") and "Open the MLflow UI on it:" in lines[-4:][0] + text
    runs = runs_in(sqlite_uri(db))
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert not [c for c in children if c.data.tags.get("identical_peers") == "true"]
    from mlflow.tracking import MlflowClient
    logged = {a.path for a in MlflowClient(sqlite_uri(db)).list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged

    # Resuming the finished sweep: one line, exit 0, and nothing in MLflow or on disk changes.
    before, files = _store(db), _files(res)
    again = run_cli("platform.sweep", "okdph", "--resume", str(res / "d"), "--tracking-uri", sqlite_uri(db))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip().splitlines() == [again.stdout.strip()] and "is finished" in again.stdout
    assert parent.info.run_id in again.stdout
    assert _store(db) == before and _files(res) == files
    # With no directory named, --resume looks for an interrupted sweep and finds none.
    none = run_cli("platform.sweep", "okdph", "--resume", "--out", str(res), "--tracking-uri", sqlite_uri(db))
    assert none.returncode == 2 and "no interrupted sweep of 'okdph'" in none.stderr


def test_help_lists_the_methods_and_presets():
    for command in ("platform.sweep", "platform.train"):
        out = run_cli(command, "--help")
        assert out.returncode == 0
        assert "online" in out.stdout and "okdph" in out.stdout and "cifar100-resnet32" in out.stdout
    listing = run_cli("platform.sweep", "--list")
    assert listing.returncode == 0 and "okdph" in listing.stdout and "omega [0.3, 0.95]" in listing.stdout


def test_a_report_that_fails_is_one_line_and_not_the_sweeps_failure(tmp_path, capsys):
    from types import SimpleNamespace

    from kd_platform.cli import _report
    missing = SimpleNamespace(tracking_uri=sqlite_uri(tmp_path / "gone" / "m.db"), sweep_dir=tmp_path / "d")
    _report(missing, SimpleNamespace(parent_run_id="0" * 32))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("Report not written (") and "python -m analysis.ablation" in out[0]
    assert not (tmp_path / "d").exists()
