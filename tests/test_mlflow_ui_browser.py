"""The MLflow UI, in a real headless Chromium, shows what a finished sweep and its analysis
logged, at the URLs the commands print: the experiment in the model-training view (its runs
table, not GenAI traces) with the sweep's parent run and children, the parent run with its child
runs, the report's plots as artifacts (logged through the running server), a child run's
dataset, metrics and chart groups, and the child's networks as MLflow models (listed on the run
and on the experiment's Models page) with the best one registered as the sweep registers it.

The UI is a JavaScript app, so the page is rendered by Chromium (``--dump-dom`` after a
virtual-time budget) rather than fetched as HTML. Chromium is not installed by the test.
Screenshots go to the test's tmp dir; ``KD_PLATFORM_UPDATE_SCREENSHOT=1`` also refreshes
``docs/mlflow-ui.png`` and ``docs/mlflow-ui-models.png``.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import REPO, sqlite_uri
from test_analysis import METRIC, make_tpe

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BUDGETS_MS = (15_000, 45_000)  # a slow machine gets a second, longer render before a check fails
SERVER_START_S = 180
DOCS_SHOT = REPO / "docs" / "mlflow-ui.png"
DOCS_MODELS_SHOT = REPO / "docs" / "mlflow-ui-models.png"
WINDOW = "1400,900"
WIDE_WINDOW = "1920,600"  # the experiment's Models table up to its Registered models column
REGISTERED = "kd-okdph-digits-resnet8"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(uri: str, folder: Path) -> Iterator[str]:
    """``mlflow ui`` on a free local port for the duration of the block; yields its base URL.

    It also serves artifacts (kept under ``folder/artifacts``), so an experiment whose
    artifact location is ``mlflow-artifacts:/...`` shows that location instead of a local path.
    """
    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    with open(folder / "mlflow-ui.log", "wb") as log:
        # One worker: the default several each import mlflow, which takes a minute on two cores.
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                 "--serve-artifacts", "--artifacts-destination", (folder / "artifacts").as_uri()],
                                cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_until_up(base, proc, folder / "mlflow-ui.log")
            yield base
        finally:
            _stop(proc)


def _wait_until_up(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow ui did not answer within {SERVER_START_S}s")
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and everything it started: they share the session made for it above."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    # Its background job consumers can take a while to wind down; none may outlive the test.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Browser:
    def __init__(self, folder: Path) -> None:
        self.profile = folder / "chromium-profile"

    def _run(self, url: str, budget_ms: int, *extra: str, window: str = WINDOW) -> str:
        out = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={window}",
                              f"--virtual-time-budget={budget_ms}", *extra, url],
                             capture_output=True, text=True, timeout=180, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    def dom(self, url: str, expected: list[str]) -> str:
        """The rendered page; rendered again with a longer budget if something expected is missing."""
        for budget in BUDGETS_MS:
            page = self._run(url, budget, "--dump-dom")
            if all(e in page for e in expected):
                break
        return page

    def screenshot(self, url: str, path: Path, window: str = WINDOW) -> Path:
        self._run(url, BUDGETS_MS[-1], f"--screenshot={path}", window=window)
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path


def _missing(page: str, expected: list[str]) -> list[str]:
    return [e for e in expected if e not in page]


def _printed_urls(out: str) -> list[str]:
    return [w for w in out.split() if w.startswith(("http://", "https://"))]


def _untrained_networks(spec: Any) -> dict[str, Any]:
    """The networks ``load_networks`` gives for ``spec``, from a freshly built method's state (the
    synthetic runs have no checkpoint to rebuild them from)."""
    import torch

    from kd_platform.methods.base import freeze
    from kd_platform.models import build_model
    from kd_platform.run.engine import build_method
    from kd_platform.tracking import models
    classes, channels, size = models.data_shape(spec)
    shape = SimpleNamespace(num_classes=classes, in_channels=channels, image_size=size)
    method = build_method(spec, shape, torch.device("cpu"), lambda arch: freeze(build_model(arch, classes, channels)))
    return models.load_networks(spec, {"method": method.state_dict()})


def _log_and_register(server: str, run_id: str, sweep_name: str, sweep_run_id: str) -> tuple[dict[str, str], str]:
    """The run's networks logged as MLflow models through the server, as the sweep's driver logs
    them, and the best of them registered with the tags ``register_best`` gives its version.
    Returns ``{network: model_id}`` and the registered network."""
    from mlflow.tracking import MlflowClient

    from kd_platform.run.spec import RunSpec
    from kd_platform.tracking import models
    c = MlflowClient(tracking_uri=server)
    run = c.get_run(run_id)
    params = dict(run.data.params)
    seed = int(params.pop("seed"))
    spec = RunSpec.split("okdph", params, seed)
    networks = _untrained_networks(spec)
    assert list(networks) == ["student1", "student2", "hwm"]
    logged = models.log_networks(c, server, run_id, spec, networks, int(run.data.tags["epochs_run"]))
    assert models.logged_models(c.get_run(run_id)) == logged
    network = max(logged, key=lambda n: run.data.metrics[f"val/acc/{n}"])
    assert models.registered_name(spec, network) == REGISTERED
    value = run.data.metrics[METRIC]
    tags = {"sweep": sweep_name, "sweep_run_id": sweep_run_id, "run_id": run_id, "network": network,
            "configuration": "best-1", "metric": METRIC, f"{METRIC}.mean": f"{value:.4f}",
            f"{METRIC}.std": "0.0000", f"{METRIC}.ci95": f"[{value:.4f}, {value:.4f}]", "confirm.seeds": "1,2",
            "confirm.verdict": "winner", f"val/acc/{network}": f"{run.data.metrics[f'val/acc/{network}']:.4f}",
            "knobs_hash": models.knobs_hash(spec), **{f"knob.{k}": params[k] for k in ("omega", "fusion_unit")}}
    line = models.register(c, REGISTERED, logged[network], run_id, tags)
    assert line == f"Registered {REGISTERED} version 1 (models:/{REGISTERED}/1)", line
    return logged, network


def test_mlflow_ui_shows_the_sweep_its_runs_and_the_report(tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (install the Debian package 'chromium' to run the browser check)")
    from mlflow.tracking import MlflowClient

    from kd_platform import tracking
    from kd_platform.analysis.cli import main
    from kd_platform.cli import _print_ui
    from kd_platform.run.engine import RunSpec, data_recipe

    uri = sqlite_uri(tmp_path / "mlruns.db")
    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment("okdph", artifact_location="mlflow-artifacts:/okdph")
    parent, _ = make_tpe(uri, tmp_path, trials=4)  # the sweep's runs, straight into the store
    assert tracking.ensure_experiment(uri, "okdph") == exp_id  # reused by a sweep: tagged as model training
    run = c.get_run(parent)
    parent_name = run.info.run_name
    children = c.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    child_names = [r.info.run_name for r in children]
    dataset = tracking.describe_data(data_recipe(RunSpec.from_flat("okdph", {}, 0)), 0)
    for child in children:  # as the sweep's driver logs it
        tracking.log_dataset(c, child.info.run_id, dataset)
    best_child = max(children, key=lambda r: r.data.metrics[METRIC]).info.run_id
    browser = Browser(tmp_path)

    with mlflow_ui(uri, tmp_path) as base:
        server = base.rstrip("/")
        # The analysis talks to the server, which stores the report's artifacts.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["--sweep", parent, "--tracking-uri", server, "--out", str(tmp_path / "report")]) == 0
            _print_ui(server, exp_id, parent, "sweep")  # what the sweep prints at its end
        report_files = sorted(p.name for p in (tmp_path / "report").iterdir())
        report_url, runs_url, parent_url = _printed_urls(printed.getvalue())
        query = tracking.UI_QUERY
        assert all(u.endswith(query) for u in (report_url, runs_url, parent_url))

        # The experiment opens on its runs table (the model-training view), not on GenAI
        # traces: the parent row, which unfolds into the children, and all its runs counted.
        expected = ["okdph", "Run Name", parent_name, f"<strong>{1 + len(children)}</strong> matching runs", "Model registry"]
        page = browser.dom(runs_url, expected)
        assert not _missing(page, expected), f"experiment page lacks {_missing(page, expected)}"
        assert "Token Usage" not in page and "Observability" not in page, "experiment page opened the GenAI view"

        expected = [parent_name, *child_names, "kind"]
        page = browser.dom(parent_url, expected)
        assert not _missing(page, expected), f"parent run page lacks {_missing(page, expected)}"

        expected = [f'artifact-name="{name}"' for name in report_files]
        page = browser.dom(report_url, expected)
        assert not _missing(page, expected), f"report artifacts page lacks {_missing(page, expected)}"
        plot_url = report_url.replace(query, f"/importance.png{query}")
        expected = ['<img alt="report/importance.png" src="blob:', *expected]
        page = browser.dom(plot_url, expected)
        assert not _missing(page, expected), f"artifact page lacks {_missing(page, expected)}"

        child_url = tracking.ui_url(server, exp_id, best_child)
        expected = [f">{METRIC}</a>", ">val/acc/hwm</a>", ">train/loss/loss</a>", dataset.name, dataset.digest]
        page = browser.dom(child_url, expected)
        assert not _missing(page, expected), f"child run page lacks {_missing(page, expected)}"
        # The metric charts, grouped by prefix; the curves themselves are drawn, not text.
        expected = [">val/acc<", ">train/loss<", ">test/acc<"]
        curves_url = tracking.ui_url(server, exp_id, best_child, page="model-metrics")
        page = browser.dom(curves_url, expected)
        assert not _missing(page, expected), f"child run's charts lack {_missing(page, expected)}"

        # The child's networks as MLflow models, the best one registered: the run's Overview lists
        # them (and the registered version), so does the experiment's Models page, with the run
        # they came from; the registry shows the model, its version and the sweep's tags.
        logged, network = _log_and_register(server, best_child, parent_name, parent)
        best_name = next(r.info.run_name for r in children if r.info.run_id == best_child)
        model_links = [f'<a href="#/experiments/{exp_id}/models/{mid}">{name}</a>' for name, mid in logged.items()]
        version_link = f'href="#/models/{REGISTERED}/versions/1"'
        expected = [f">Logged models ({len(logged)})<", *model_links, version_link]
        page = browser.dom(child_url, expected)
        assert not _missing(page, expected), f"child run page lacks {_missing(page, expected)}"
        models_url = f"{server}/#/experiments/{exp_id}/models{query}"
        expected = [*model_links, f'#/experiments/{exp_id}/runs/{best_child}" target="_blank">{best_name}</a>',
                    version_link]
        page = browser.dom(models_url, expected)
        assert not _missing(page, expected), f"experiment's models page lacks {_missing(page, expected)}"
        registered_url = f"{server}/#/models/{REGISTERED}{query}"
        expected = [f">{REGISTERED}<", f"{version_link}>Version 1</a>"]
        page = browser.dom(registered_url, expected)
        assert not _missing(page, expected), f"registered model page lacks {_missing(page, expected)}"
        version_url = f"{server}/#/models/{REGISTERED}/versions/1{query}"
        source_link = f'href="#/experiments/{exp_id}/runs/{best_child}">{best_name}</a>'
        expected = [f"{REGISTERED}</a>", ">Version 1<", source_link, f">{parent_name}</div>", f">{parent}</div>",
                    ">winner</div>"]
        page = browser.dom(version_url, expected)
        assert not _missing(page, expected), f"model version page lacks {_missing(page, expected)}"

        browser.screenshot(curves_url, tmp_path / "mlflow-ui-child-curves.png")
        browser.screenshot(runs_url, tmp_path / "mlflow-ui-runs.png")
        browser.screenshot(version_url, tmp_path / "mlflow-ui-model-version.png")
        models_shot = browser.screenshot(models_url, tmp_path / "mlflow-ui-models.png", window=WIDE_WINDOW)
        shot = browser.screenshot(plot_url, tmp_path / "mlflow-ui.png")
    # The screenshots in docs/ are committed; refresh them only when asked (or when one is missing),
    # so that a test run does not leave a changed tracked file behind.
    for taken, target in ((shot, DOCS_SHOT), (models_shot, DOCS_MODELS_SHOT)):
        if os.environ.get("KD_PLATFORM_UPDATE_SCREENSHOT") == "1" or not target.is_file():
            _save_for_docs(taken, target)


def _save_for_docs(shot: Path, target: Path) -> None:
    """A palette PNG: the UI has few colours, and the repository keeps the file."""
    from PIL import Image
    target.parent.mkdir(exist_ok=True)
    with Image.open(shot) as img:
        img.convert("RGB").quantize(colors=64).save(target, optimize=True)
