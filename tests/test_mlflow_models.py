"""Trained networks as MLflow models, the sweep's registered best, and system metrics, against a
real local Ray cluster and a real sqlite MLflow store: every model is loaded back with
``mlflow.pytorch.load_model`` and its accuracy on the run's test split checked against the
run's own ``test/acc/<network>``."""
from __future__ import annotations

import pytest
import torch
from conftest import runs_in, sqlite_uri

pytestmark = pytest.mark.slow


def _test_accuracy(model: torch.nn.Module, run) -> float:
    """The model's accuracy on the test split of the data ``run`` trained on (rebuilt from its params)."""
    from kd_platform.data import build_data
    from kd_platform.run.spec import RunSpec, data_recipe
    params = dict(run.data.params)
    seed = int(params.pop("seed"))
    spec = RunSpec.split(run.data.tags["method"], params, seed)
    data = build_data(data_recipe(spec), seed, torch.device("cpu"))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in data.eval_batches("test"):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def _check_model(uri: str, model_uri: str, run, network: str) -> None:
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    with _use_tracking_uri(uri):
        model = mlflow.pytorch.load_model(model_uri)
    assert isinstance(model, torch.nn.Module)
    assert _test_accuracy(model, run) == pytest.approx(run.data.metrics[f"test/acc/{network}"], abs=0.1)


def _sweep(tmp_path, name: str, *extra: str) -> tuple[int, str]:
    from kd_platform.cli import _sweep
    space = tmp_path / f"{name}.yaml"
    space.write_text("method: okdph\nsamples: 2\nepochs: 2\nswept:\n  omega: {type: choice, values: [0.5, 0.8]}\n")
    uri = sqlite_uri(tmp_path / f"{name}.db")
    code = _sweep(["okdph", "--space", str(space), "--tracking-uri", uri, "--out", str(tmp_path / "res"),
                   "--name", name, "--quiet", "--no-report", *extra])
    return code, uri


def test_a_sweep_logs_its_students_and_registers_the_confirmed_best(ray_local, tmp_path, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    code, uri = _sweep(tmp_path, "models", "--confirm-top", "1", "--confirm-seeds", "2")
    out = capsys.readouterr().out
    assert code == 0, out
    runs = runs_in(uri)
    parent = next(r for r in runs if r.data.tags.get("kind") == "sweep")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    completed = [r for r in trials if r.data.tags.get("trial_outcome") == "completed"]
    assert completed
    for run in completed:  # each student and the mean HWM, with their sizes
        assert {k for k in run.data.tags if k.startswith("model.")} == {"model.student1", "model.student2", "model.hwm"}
        assert run.data.metrics["model/params/student1"] > 1000 and run.data.metrics["model/size_mb/hwm"] > 0
    client = MlflowClient(uri)
    with _use_tracking_uri(uri):
        logged = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert len(logged) == 3 * len(completed)
    assert {m.source_run_id for m in logged} == {r.info.run_id for r in completed}
    assert {"method", "arch", "dataset", "knobs_hash", "network"} <= set(logged[0].tags)
    child = completed[0]
    _check_model(uri, child.data.tags["model.student1"], child, "student1")
    _check_model(uri, child.data.tags["model.hwm"], child, "hwm")

    name = "kd-okdph-digits-resnet8"
    assert f"Registered {name} version 1" in out, out
    version = client.get_model_version(name, "1")
    tags = version.tags
    assert tags["sweep_run_id"] == parent.info.run_id and tags["confirm.seeds"] == "1,2"
    assert tags["metric"] == "val/acc/students_mean" and tags["val/acc/students_mean.ci95"].startswith("[")
    best_run = client.get_run(tags["run_id"])
    assert best_run.info.run_id in parent.data.tags["best_run_ids"].split(",")
    _check_model(uri, f"models:/{name}/1", best_run, tags["network"])


def test_a_fused_run_logs_plain_students(ray_local, tmp_path, capsys):
    # A plain run, fused: its students are stacked tensors in training and plain networks in MLflow.
    from kd_platform.cli import _train
    uri = sqlite_uri(tmp_path / "fused.db")
    code = _train(["okdph", "--set", "fused=true", "--set", "epochs=2", "--tracking-uri", uri,
                   "--out", str(tmp_path / "res"), "--no-system-metrics"])
    assert code == 0, capsys.readouterr().out
    (run,) = runs_in(uri)
    assert run.data.params["fused"] == "true"
    from kd_platform.models import build_model
    for network in ("student1", "student2", "hwm"):
        _check_model(uri, run.data.tags[f"model.{network}"], run, network)
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    with _use_tracking_uri(uri):
        s2 = mlflow.pytorch.load_model(run.data.tags["model.student2"])
    assert type(s2) is type(build_model("resnet8", 10, 1))
    assert not any(k.startswith("system/") for k in run.data.metrics)  # --no-system-metrics


def test_trial_runs_log_system_metrics_and_stopped_trials_no_models(ray_local, tmp_path, capsys):
    code, uri = _sweep(tmp_path, "system", "--no-confirm", "--log-models", "none")
    assert code == 0, capsys.readouterr().out
    trials = [r for r in runs_in(uri) if r.data.tags.get("kind") == "trial"]
    assert trials
    for run in trials:
        cpu = run.data.metrics["system/cpu_utilization_percentage"]
        assert 0 <= cpu <= 100 and run.data.metrics["system/system_memory_usage_megabytes"] > 0
        assert "system/disk_usage_percentage" in run.data.metrics
        assert not any(k.startswith("model.") for k in run.data.tags)  # --log-models none


def test_no_registry_is_one_line(tmp_path, monkeypatch):
    """A store whose registry cannot be reached: registering says so in one line and raises nothing."""
    from mlflow.tracking import MlflowClient

    from kd_platform.tracking.models import register
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "unsupported-registry://nowhere")
    line = register(MlflowClient(sqlite_uri(tmp_path / "m.db")), "kd-x", "m-123", "run", {"a": 1})
    assert line.startswith("Model registry: not available on this store") and "\n" not in line


@pytest.mark.parametrize("argv, message", [
    (["--log-models", "all"], "--log-models"),
])
def test_bad_log_models_is_one_line(tmp_path, capsys, argv, message):
    from kd_platform.cli import sweep_main
    uri = sqlite_uri(tmp_path / "m.db")
    assert sweep_main(["okdph", "--tracking-uri", uri, "--out", str(tmp_path / "res"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "res").exists()


def test_unwritable_artifact_location_is_one_line(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from kd_platform.cli import sweep_main
    blocker = tmp_path / "blocker"  # a file where the artifacts' directory should be: unwritable even for root
    blocker.write_text("")
    uri = sqlite_uri(tmp_path / "m.db")
    MlflowClient(uri).create_experiment("okdph", artifact_location=(blocker / "art").as_uri())
    code = sweep_main(["okdph", "--tracking-uri", uri, "--out", str(tmp_path / "res")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "artifact location" in err and len(err.splitlines()) == 1
    assert runs_in(uri) == [] and not (tmp_path / "res").exists()


def test_best_trials_put_accuracy_beside_size():
    import pandas as pd

    from kd_platform.analysis.tables import best_trials
    runs = pd.DataFrame({"run_id": ["a", "b"], "val/acc/students_mean": [90.0, 95.0], "seed": [0, 0],
                         "epochs_run": [4, 4], "test/acc/student1": [88.0, 93.0],
                         "model/params/student1": [2e6, 4e6], "model/size_mb/student1": [8.0, 16.0]})
    table = best_trials(runs, "val/acc/students_mean", "max", [])
    assert list(table["run_id"]) == ["b", "a"]
    assert table["test/acc_per_mparam/student1"].tolist() == [pytest.approx(23.25), pytest.approx(44.0)]
    assert table["model/size_mb/student1"].tolist() == [16.0, 8.0]
