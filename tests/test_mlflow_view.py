"""What makes MLflow 3's UI open the platform's runs as model training (not GenAI): the experiment
tag, the query on every printed URL, and each run's dataset input. Real sqlite stores."""
from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli, runs_in, sqlite_uri

QUERY = "?workflowType=machine_learning"
URL = re.compile(r"https?://\S+")


def _kind(uri: str, experiment_id: str) -> str | None:
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags.get("mlflow.experimentKind")


def _expected_dataset(method: str, knobs: dict, seed: int):
    from kd_platform.run.engine import RunSpec, data_recipe
    from kd_platform.tracking import describe_data
    return describe_data(data_recipe(RunSpec.from_flat(method, knobs, seed)), seed)


def _dataset_input(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient
    (inp,) = MlflowClient(tracking_uri=uri).get_run(run_id).inputs.dataset_inputs
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
    return inp.dataset


def test_experiments_are_created_and_reused_as_model_training(tmp_path):
    from mlflow.tracking import MlflowClient

    from kd_platform.tracking import ensure_experiment
    uri = sqlite_uri(tmp_path / "mlruns.db")
    c = MlflowClient(tracking_uri=uri)
    new = ensure_experiment(uri, "okdph")
    assert _kind(uri, new) == "custom_model_development"
    assert ensure_experiment(uri, "okdph") == new
    # One made elsewhere (by hand, an older platform, or tagged as GenAI) is tagged when reused,
    # and a deleted one is restored with the tag.
    plain = c.create_experiment("dml")
    genai = c.create_experiment("kdcl", tags={"mlflow.experimentKind": "genai_development"})
    c.delete_experiment(genai)
    for exp_id, name in ((plain, "dml"), (genai, "kdcl")):
        assert ensure_experiment(uri, name) == exp_id
        assert _kind(uri, exp_id) == "custom_model_development"
        assert c.get_experiment(exp_id).lifecycle_stage == "active"


def test_ui_urls_open_the_model_training_view():
    from kd_platform.tracking import ui_url
    local = "sqlite:////data/mlruns.db"
    assert ui_url(local, "3") == "http://127.0.0.1:5000/#/experiments/3/runs" + QUERY
    assert ui_url(local, "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc" + QUERY
    assert ui_url(local, "3", "abc", page="artifacts/report") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc/artifacts/report" + QUERY
    # A tracking server is its own UI.
    assert ui_url("http://10.0.0.5:5000/", "7", "r") == "http://10.0.0.5:5000/#/experiments/7/runs/r" + QUERY


def test_dataset_description_digest_and_split_sizes():
    a = _expected_dataset("okdph", {}, 0)
    assert a.name == "digits" and len(a.digest) == 16 and a.source_type == "code"
    profile = json.loads(a.profile)
    assert (profile["train_size"], profile["val_size"], profile["test_size"]) == (1295, 143, 359)
    assert profile["num_rows"] == 1797 and profile["num_classes"] == 10
    assert _expected_dataset("okdph", {"omega": 0.3}, 0).digest == a.digest  # knobs beside the data: same data
    assert _expected_dataset("okdph", {}, 1).digest != a.digest  # another seed holds out another val split
    whole = _expected_dataset("okdph", {"val_fraction": 0.0}, 0)
    assert whole.digest != a.digest
    assert (json.loads(whole.profile)["train_size"], json.loads(whole.profile)["val_size"]) == (1438, 0)


@pytest.mark.slow
def test_train_run_records_its_dataset_and_prints_training_view_urls(tmp_path):
    uri = sqlite_uri(tmp_path / "mlruns.db")
    out = run_cli("platform.train", "ce", "--epochs", "1", "--seed", "2", "--tracking-uri", uri,
                  "--out", str(tmp_path / "res"))
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = runs_in(uri)
    exp_id, run_id = run.info.experiment_id, run.info.run_id
    assert _kind(uri, exp_id) == "custom_model_development"
    urls = URL.findall(out.stdout)
    assert urls == [f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs{QUERY}",
                    f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}{QUERY}"], out.stdout
    dataset = _dataset_input(uri, run_id)
    expected = _expected_dataset("ce", {}, 2)
    assert (dataset.name, dataset.digest) == ("digits", expected.digest)
    assert json.loads(dataset.profile) == json.loads(expected.profile)


@pytest.mark.slow
def test_sweep_trials_record_their_dataset_and_the_sweep_prints_training_view_urls(ray_local, tmp_path, capsys):
    from kd_platform.cli import _sweep
    uri = sqlite_uri(tmp_path / "mlruns.db")
    assert _sweep(["okdph", "--samples", "2", "--epochs", "1", "--no-confirm", "--tracking-uri", uri, "--seed", "4",
                   "--out", str(tmp_path / "res"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    runs = runs_in(uri)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    exp_id = parent.info.experiment_id
    assert _kind(uri, exp_id) == "custom_model_development"
    assert URL.findall(printed) == [f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs{QUERY}",
                                    f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{parent.info.run_id}{QUERY}"]
    expected = _expected_dataset("okdph", {}, 4)
    assert len(children) == 2
    for child in children:
        dataset = _dataset_input(uri, child.info.run_id)
        assert (dataset.name, dataset.digest, dataset.profile) == ("digits", expected.digest, expected.profile)
