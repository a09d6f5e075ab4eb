"""Shared fixtures: a real local Ray cluster and real sqlite MLflow stores."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m <args>`` from the repository root, as a user types it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@contextmanager
def private_ray_tmpdir(prefix: str) -> Iterator[str]:
    """A short private ``RAY_TMPDIR`` for a test cluster (its socket paths must fit in 107
    bytes), so that no plain ``ray.init()`` elsewhere joins it; removed afterwards."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    try:
        yield tmp
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(tmp, ignore_errors=True)


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def runs_in(uri: str) -> list:
    """Every run in every experiment of the store (empty when the store has none)."""
    from mlflow.tracking import MlflowClient
    c = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(ids, max_results=1000) if ids else []


@pytest.fixture
def one_thread():
    """The networks in unit tests are tiny: one thread avoids spin-waiting when the cores are shared."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch):
    """Dataset and published-weights downloads fail as they would on a machine without internet access."""
    import torch.hub

    from kd_platform.data import cifar
    def refuse(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(cifar, "download", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    cifar._cache.clear()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the in-process sweep tests of this session. Its dashboard takes
    a free port, so the multi-node test clusters, whatever the test order, get the default one."""
    import ray
    ray.init(num_cpus=2, include_dashboard=True, dashboard_port=free_port(), logging_level="WARNING")
    yield ray
    ray.shutdown()


class DataStub:
    """Shape information of digits without loading it."""
    num_classes, in_channels, image_size = 10, 1, 8


def make_method(name: str, seed: int = 0, **knobs):
    """A method built exactly as the engine builds it, on digits-shaped inputs."""
    import torch

    from kd_platform.run.engine import RunSpec, build_method
    torch.manual_seed(seed)
    return build_method(RunSpec.from_flat(name, knobs, seed), DataStub(), torch.device("cpu"))


def finished_runs(db: Path, stage: str | None = None) -> int:
    """Trial runs of a sweep's sqlite store that ended FINISHED (of one ``stage`` tag, if given),
    read with plain sqlite so that a test can poll it while the sweep writes."""
    import sqlite3
    if not db.exists():
        return 0
    where = "" if stage is None else (" and r.run_uuid in (select run_uuid from tags where key = 'stage' "
                                       f"and value = '{stage}')")
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid where "
                               "t.key = 'trial_outcome' and r.status = 'FINISHED'" + where).fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def kill_session(sid: int) -> None:
    """SIGKILL what is left of a killed driver's own local Ray cluster (every process of the
    session it was started in); ``ray stop`` would take down every Ray cluster on the machine."""
    import signal
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, session = (int(field) for field in line.split())
        if session == sid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
