"""``python -m platform.compare``: the table's statistics against an independent computation, the
published figures, bad input, and comparisons run for real (Ray, MLflow) on digits and on
CIFAR-format files, killed halfway and resumed."""
from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, finished_runs, kill_session, run_cli, runs_in, sqlite_uri
from scipy import stats as sps

from kd_platform.compare.plan import PRIMARY, Column
from kd_platform.compare.references import REFERENCE_FILE, Published, load_references
from kd_platform.compare.table import BEST_VAL, Record, build_table, frame, markdown


def _records(values: dict[str, list[float]], column: str = "resnet8") -> list[Record]:
    return [Record(m, column, seed, {PRIMARY: v, BEST_VAL: v + 0.5, "test/acc/teacher": 80.0})
            for m, vs in values.items() for seed, v in enumerate(vs)]


def _holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment written out directly, for comparison."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        out[i] = min(1.0, running)
    return out


VALUES = {"ce": [70.1, 70.9, 70.4, 70.6, 69.8], "kd": [73.0, 73.6, 72.8, 73.3, 73.9],
          "dkd": [71.0, 69.9, 70.8, 71.9, 70.2], "dist": [74.9, 75.3, 75.1, 74.7, 75.6]}


def test_table_statistics_match_an_independent_computation():
    col = Column("resnet8", "digits", "digits", "resnet8")
    table = build_table(_records(VALUES), [col], list(VALUES), "ce", {})
    rows = {r.method: r for r in table.rows}
    others = ["kd", "dkd", "dist"]
    raw = [sps.ttest_ind(VALUES[m], VALUES["ce"], equal_var=False).pvalue for m in others]
    for m, p_raw, p_holm in zip(others, raw, _holm(raw)):
        assert rows[m].p_raw == pytest.approx(p_raw, rel=1e-9)
        assert rows[m].p_holm == pytest.approx(p_holm, rel=1e-9)
    for m, vs in VALUES.items():
        a = np.array(vs)
        low, high = sps.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=sps.sem(a))
        assert rows[m].mean == pytest.approx(a.mean())
        assert rows[m].std == pytest.approx(a.std(ddof=1))
        assert rows[m].interval == pytest.approx((low, high))
        assert rows[m].best_val_mean == pytest.approx(a.mean() + 0.5)
        assert rows[m].extras["teacher"] == 80.0
    # Ranks: every pair of methods tested, Holm across the six pairs; a method's rank counts
    # the methods with a higher mean that a corrected test separates from it.
    names = list(VALUES)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    adj = _holm([sps.ttest_ind(VALUES[a], VALUES[b], equal_var=False).pvalue for a, b in pairs])
    for m in names:
        beaten = sum(1 for (a, b), p in zip(pairs, adj) if p < 0.05 and m in (a, b)
                     and np.mean(VALUES[b if m == a else a]) > np.mean(VALUES[m]))
        assert rows[m].rank == 1 + beaten
    assert rows["dist"].rank == 1 and rows["ce"].rank == rows["dkd"].rank  # ce and dkd: no test separates them
    assert any("better than ce: kd, dist" in line for line in table.verdicts())
    assert any("not separated from ce: dkd" in line for line in table.verdicts())


def test_published_figures_are_placed_and_judged_against_the_interval():
    col = Column("resnet32x4:resnet8x4", "cifar100-resnet32x4-resnet8x4", "cifar100", "resnet8x4", "resnet32x4",
                 True)
    refs = load_references()
    values = {"ce": [72.1, 72.6, 72.4], "kd": [73.1, 73.5, 73.4], "dist": [74.0, 74.2, 73.9]}
    table = build_table(_records(values, col.label), [col], list(values), "ce", refs)
    rows = {r.method: r for r in table.rows}
    assert rows["kd"].reference == refs[("cifar100", "resnet32x4:resnet8x4", "kd")]
    assert rows["kd"].reference.top1 == 73.33 and rows["kd"].reference.verified
    assert rows["kd"].diff == pytest.approx(np.mean(values["kd"]) - 73.33)
    assert rows["kd"].reference_inside is True
    assert rows["dist"].reference_inside is False and not rows["dist"].reference.verified
    assert rows["ce"].reference is None
    md = markdown(table, ["protocol line"], "t")
    assert "73.33 (" in md and "76.31* (" in md and "unverified" in md
    df = frame(table)
    assert list(df["method"]) == ["ce", "kd", "dist"] and df.loc[1, "published"] == 73.33


def test_too_few_seeds_is_said_plainly():
    col = Column("resnet8", "digits", "digits", "resnet8")
    table = build_table(_records({"ce": [70.0, 71.0], "kd": [72.0, 73.0]}), [col], ["ce", "kd"], "ce", {})
    assert table.verdicts()[0].startswith("Too few seeds for a conclusion")


def test_reference_file_is_well_formed_and_every_pair_names_known_networks():
    from kd_platform.models import model_names
    refs = load_references()
    assert ("cifar100", "resnet32x4:resnet8x4", "dkd") in refs
    for (dataset, pair, method), pub in refs.items():
        assert all(arch in model_names() for arch in pair.split(":")), pair
        assert 0 < pub.top1 < 100 and pub.source
    assert REFERENCE_FILE.parent.parent.name == "presets"


def test_a_malformed_reference_file_is_one_line(tmp_path):
    from kd_platform.errors import UsageError
    bad = tmp_path / "published.yaml"
    bad.write_text("sources: {a: x}\nreferences:\n  - {dataset: d, pair: p, method: kd, top1: 1, source: b}\n")
    with pytest.raises(UsageError, match="source 'b' is not under 'sources'"):
        load_references(bad)
    assert isinstance(Published(1.0, "x").note(), str)


@pytest.mark.parametrize("argv, message", [
    (["okdph", "nosuch"], "unknown method 'nosuch'"),
    (["kd", "ce", "--pairs", "resnet32x4:nosuch"], "unknown architecture 'nosuch'"),
    (["kd", "ce", "--pairs", "resnet32x4"], "is not TEACHER:STUDENT"),
    (["kd", "ce", "--pairs", "resnet20:resnet8"], "no preset trains resnet20:resnet8"),
    (["kd", "okdph", "--preset", "cifar100-resnet32"], "is a recipe for"),
    (["okdph", "ce", "--seeds", "0"], "--seeds"),
    (["okdph", "ce", "--baseline", "kd"], "--baseline 'kd' is not among"),
    (["okdph", "ce", "--tuned"], "--tuned: no finished sweep of 'okdph'"),
    (["okdph", "ce", "--pairs", "resnet32x4:resnet8x4"], "'okdph' is an online method"),
    (["okdph", "ce", "--set", "nosuch=1"], "unknown knob 'nosuch'"),
    (["okdph", "ce", "--register", "--log-models", "none"], "--register needs the runs' models"),
    ([], "name the methods to compare"),
    (["--resume"], "no interrupted comparison"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    from kd_platform.compare.cli import main
    uri = sqlite_uri(tmp_path / "mlruns.db")
    out = tmp_path / "res"
    code = main([*argv, "--tracking-uri", uri, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
    assert runs_in(uri) == []


def _children(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_embedded_comparison_lands_in_mlflow_and_its_report_rebuilds(ray_local, tmp_path, capsys):
    from kd_platform.compare.cli import main, settings
    from kd_platform.compare.runner import print_table, run_compare
    uri = sqlite_uri(tmp_path / "mlruns.db")
    s = settings(["okdph", "dml", "ce", "--seeds", "3", "--epochs", "2", "--tracking-uri", uri,
                  "--out", str(tmp_path / "res"), "--name", "cmp", "--quiet", "--register"])
    outcome = run_compare(s)
    runs = runs_in(uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "comparison"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.params["methods"] == "okdph,dml,ce" and parent.data.params["seeds"] == "3"
    assert parent.data.params["baseline"] == "ce" and "val_fraction 0.1" in parent.data.params["protocol.1"]
    children = _children(runs, parent.info.run_id)
    assert sorted((c.data.tags["method"], c.data.tags["seed"]) for c in children) == sorted(
        (m, str(s)) for m in ("okdph", "dml", "ce") for s in range(3))
    assert {c.data.tags["pair"] for c in children} == {"resnet8"}
    assert all(c.info.status == "FINISHED" and c.data.params["epochs"] == "2" for c in children)
    # The table's means are the child runs' own last-epoch figures.
    table = {r["method"]: r for r in _read_csv(outcome.report.with_suffix(".csv"))}
    for m in ("okdph", "dml", "ce"):
        mine = [c.data.metrics[PRIMARY] for c in children if c.data.tags["method"] == m]
        assert float(table[m]["mean"]) == pytest.approx(np.mean(mine))
        assert int(table[m]["n"]) == 3
        best_val = [c.data.metrics[BEST_VAL] for c in children if c.data.tags["method"] == m]
        assert float(table[m]["best_val_epoch_mean"]) == pytest.approx(np.mean(best_val))
    assert math.isfinite(float(table["okdph"]["hwm_mean"])) and math.isfinite(float(table["dml"]["ensemble_mean"]))
    from mlflow.tracking import MlflowClient
    listed = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "comparison")}
    assert listed == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/comparison.png"}
    # --register: the first-ranked method's best network, tagged with the comparison and its interval.
    assert len(outcome.registered) == 1 and outcome.registered[0].startswith("Registered kd-"), outcome.registered
    versions = MlflowClient(uri).search_model_versions("name LIKE 'kd-%-digits-resnet8'")
    assert len(versions) == 1 and versions[0].tags["comparison_run_id"] == parent.info.run_id
    winner = versions[0].tags["method"]
    assert next(r for r in outcome.table.rows if r.method == winner).rank == 1
    assert versions[0].tags["seeds"] == "0,1,2" and versions[0].tags[f"{PRIMARY}.ci95"].startswith("[")
    print_table(outcome.table, s.protocol)
    shown = capsys.readouterr().out
    assert "Protocol:" in shown and "okdph" in shown and "95% [" in shown
    # --report rebuilds the same table from MLflow alone.
    assert main(["--report", parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "again")]) == 0
    rebuilt = _read_csv(tmp_path / "again" / "cmp" / "comparison" / "comparison.csv")
    assert [(r["method"], r["mean"], r["p_holm"]) for r in rebuilt] == [
        (r["method"], r["mean"], r["p_holm"]) for r in _read_csv(outcome.report.with_suffix(".csv"))]


@pytest.mark.slow
def test_cifar_fixture_comparison_shares_one_teacher_per_seed(ray_local, tmp_path):
    from dataset_files import write_cifar100

    from kd_platform.compare.cli import settings
    from kd_platform.compare.runner import run_compare
    write_cifar100(tmp_path / "data")
    uri = sqlite_uri(tmp_path / "mlruns.db")
    s = settings(["kd", "dkd", "ce", "--preset", "cifar100-resnet32x4-resnet8x4", "--pairs", "resnet8:resnet8",
                  "--seeds", "2", "--epochs", "1", "--set", f"data_dir={tmp_path / 'data'}",
                  "--set", "teacher_epochs=1", "--set", "val_fraction=0.25", "--set", "batch_size=32",
                  "--set", "teacher_batch_size=32", "--tracking-uri", uri, "--out", str(tmp_path / "res"), "--quiet"])
    outcome = run_compare(s)
    children = _children(runs_in(uri), outcome.parent_run_id)
    assert len(children) == 6 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["pair"] for c in children} == {"resnet8:resnet8"}
    offline = [c for c in children if c.data.tags["method"] in ("kd", "dkd")]
    for seed in ("0", "1"):
        sources = sorted(c.data.tags["teacher.source"] for c in offline if c.data.tags["seed"] == seed)
        assert sources == ["cache", "trained"], sources  # trained once per seed, then loaded
        teacher_acc = {c.data.metrics["test/acc/teacher"] for c in offline if c.data.tags["seed"] == seed}
        assert len(teacher_acc) == 1
    assert all(c.data.params["teacher_arch"] == "resnet8" and c.data.params["arch"] == "resnet8" for c in offline)
    rows = {r.method: r for r in outcome.table.rows}
    assert "teacher" in rows["kd"].extras and "teacher" not in rows["ce"].extras and rows["ce"].rank is not None


@pytest.mark.slow
def test_a_comparison_killed_halfway_resumes_without_training_a_cell_twice(tmp_path):
    db = tmp_path / "mlruns.db"
    uri = sqlite_uri(db)
    res = tmp_path / "res"
    args = ["dml", "ce", "--seeds", "2", "--epochs", "3", "--max-concurrent", "1", "--tracking-uri", uri,
            "--out", str(res), "--name", "cmp-resume", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "platform.compare", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while finished_runs(db) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the comparison ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_session(proc.pid)
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    before = {r.info.run_id: r.info.end_time for r in runs_in(uri)
              if r.info.status == "FINISHED" and r.data.tags.get("trial_outcome") == "completed"}
    assert 2 <= len(before) < 4

    out = run_cli("platform.compare", "--resume", str(res / "cmp-resume"), "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = runs_in(uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "comparison"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = _children(runs, parents[0].info.run_id)
    assert sorted((r.data.tags["method"], r.data.tags["seed"]) for r in children) == [
        ("ce", "0"), ("ce", "1"), ("dml", "0"), ("dml", "1")]
    for r in children:
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "epoch"))
        assert steps == [1, 2, 3], steps
        # A cell finished before the kill trains no epoch again (Tune may not have recorded its end
        # yet: it then restores the last checkpoint, which is the last epoch's, and closes the run);
        # the cell in flight goes on from its checkpoint, at most the epoch it was in trained again.
        replayed = int(r.data.tags.get("epochs_replayed", 0))
        assert replayed == 0 if r.info.run_id in before else replayed <= 1, (r.data.tags, replayed)
    assert "ce" in out.stdout and "95%" in out.stdout
    again = run_cli("platform.compare", "--resume", str(res / "cmp-resume"))
    assert again.returncode == 0 and "nothing to resume" in again.stdout
    assert f"/runs/{parents[0].info.run_id}" in again.stdout, again.stdout  # the UI page of the parent run


def _fake_sweep(c, experiment_id: str, method: str, best: dict[str, str], finished: bool = True) -> str:
    """A sweep's parent run as a finished sweep leaves it: kind=sweep and its best.* tags."""
    run = c.create_run(experiment_id, tags={"kind": "sweep", "method": method,
                                            **{f"best.{k}": v for k, v in best.items()}})
    c.set_terminated(run.info.run_id, status="FINISHED" if finished else "FAILED")
    return run.info.run_id


def test_tuned_takes_each_methods_newest_or_named_sweep(tmp_path):
    from mlflow.tracking import MlflowClient

    from kd_platform.compare.cli import settings
    uri = sqlite_uri(tmp_path / "mlruns.db")
    c = MlflowClient(uri)
    exp = c.create_experiment("okdph")
    older = _fake_sweep(c, exp, "okdph", {"omega": "0.5"})
    time.sleep(0.02)
    newer = _fake_sweep(c, exp, "okdph", {"omega": "0.7", "beta": "0.3"})
    _fake_sweep(c, exp, "okdph", {"omega": "0.9"}, finished=False)  # a failed sweep is never taken
    dml = _fake_sweep(c, c.create_experiment("dml"), "dml", {"temperature": "2"})
    common = ["--seeds", "2", "--tracking-uri", uri, "--out", str(tmp_path / "res")]
    s = settings(["okdph", "dml", "--tuned", *common])
    cells = {cell.method: cell for cell in s.cells}
    assert cells["okdph"].fixed["omega"] == "0.7" and cells["okdph"].fixed["beta"] == "0.3"
    assert cells["okdph"].knobs_from == f"sweep {newer}" and cells["dml"].knobs_from == f"sweep {dml}"
    assert any(f"okdph from sweep {newer}" in line for line in s.protocol)
    s = settings(["okdph", "ce", "--tuned", older, *common])  # named: ce keeps its preset knobs
    cells = {cell.method: cell for cell in s.cells}
    assert cells["okdph"].fixed["omega"] == "0.5" and cells["ce"].knobs_from == "preset"
    from kd_platform.errors import UsageError
    with pytest.raises(UsageError, match="is a sweep of 'dml', which is not compared here"):
        settings(["okdph", "ce", "--tuned", dml, *common])
    assert not (tmp_path / "res").exists()
