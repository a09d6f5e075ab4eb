"""The shared teacher store: published once, fetched by every other cache, one trainer at a time.

Processes stand in for nodes: each has its own local cache and all share one store
directory, reached both as a shared filesystem (create-exclusive markers) and the way an
object store is (markers written, then read back)."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import DataStub, private_ray_tmpdir, run_cli, runs_in, sqlite_uri

from kd_platform import teachers
from kd_platform.cli import sweep_settings
from kd_platform.run.engine import RunSpec
from kd_platform.run.spec import Assets
from kd_platform.teachers import (
    CACHED,
    CHECKPOINT,
    META_FILE,
    TEACHER_FILE,
    TeacherProvider,
    cached_file,
    description_hash,
)
from kd_platform.teachers.store import CLAIM_FILE, FETCHED, TRAINED, TeacherStore, fetch_or_make
from kd_platform.tracking.teacher_artifacts import record_teacher

CPU = torch.device("cpu")
DESCRIPTION = {"format": 1, "kind": "teacher", "what": "a stand-in entry"}
MAKE_S = 4.0  # longer than a waiter's stale_s: only the heartbeat keeps the claim alive


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _quick_store(root: Path, exclusive: bool) -> TeacherStore:
    return TeacherStore(str(root), exclusive=exclusive, heartbeat_s=0.2, stale_s=2.0, settle_s=0.3, poll_s=0.05)


def _node(cache: str, store_root: str, exclusive: bool, counter: str, barrier, results) -> None:
    """One "node": asks its own cache for the entry, behind the shared store."""
    def make():
        with open(counter, "a") as fh:  # one line per training, whoever does it
            fh.write(f"{os.getpid()}\n")
        time.sleep(MAKE_S)
        torch.manual_seed(os.getpid())  # each trainer's bytes differ: a fetch is told from a retrain
        return {"w": torch.rand(64)}, {"train_s": MAKE_S}
    store = _quick_store(Path(store_root), exclusive)
    barrier.wait()
    path, source = cached_file(Path(cache), DESCRIPTION, TEACHER_FILE, make, store)
    results.put((os.getpid(), source, _sha256(path)))


@pytest.mark.parametrize("exclusive", [True, False], ids=["shared-filesystem", "object-store-markers"])
def test_two_nodes_train_once_and_fetch_once(tmp_path: Path, exclusive: bool) -> None:
    store_root, counter = tmp_path / "store", tmp_path / "trainings.txt"
    caches = [tmp_path / f"node{i}" for i in range(2)]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_node, args=(str(c), str(store_root), exclusive, str(counter), barrier, results))
             for c in caches]
    for p in procs:
        p.start()
    got = sorted((results.get(timeout=120) for _ in procs), key=lambda r: r[1])
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert [source for _, source, _ in got] == [FETCHED, TRAINED]
    trainer_pid = got[1][0]
    assert counter.read_text().split() == [str(trainer_pid)]  # one training, while the other waited
    digest = description_hash(DESCRIPTION)
    published = store_root / digest
    # Both caches hold the trainer's bytes, and so does the store; nothing half-written is left.
    assert {sha for _, _, sha in got} == {_sha256(published / TEACHER_FILE)}
    assert all(_sha256(c / digest / TEACHER_FILE) == got[0][2] for c in caches)
    meta = json.loads((published / META_FILE).read_text())
    assert meta["hash"] == digest and meta["made_by"]["pid"] == trainer_pid
    assert json.loads((caches[0] / digest / META_FILE).read_text()) == meta
    assert sorted(p.name for p in published.iterdir()) == [META_FILE, TEACHER_FILE]


def test_a_dead_trainers_marker_is_taken_over(tmp_path: Path) -> None:
    store = _quick_store(tmp_path / "store", exclusive=True)
    digest = "d" * 64
    (tmp_path / "store" / digest).mkdir(parents=True)
    (tmp_path / "store" / digest / CLAIM_FILE).write_text(json.dumps({"token": "dead", "host": "gone"}))
    made, t0 = [], time.monotonic()

    def make() -> None:
        made.append(1)
        (tmp_path / "cache").mkdir(exist_ok=True)
        (tmp_path / "cache" / META_FILE).write_text("{}")
        (tmp_path / "cache" / TEACHER_FILE).write_bytes(b"weights")
    assert fetch_or_make(store, digest, tmp_path / "cache", (META_FILE, TEACHER_FILE), make) == TRAINED
    assert made == [1] and time.monotonic() - t0 >= store.stale_s  # it waited for the marker to go stale
    assert (tmp_path / "store" / digest / TEACHER_FILE).read_bytes() == b"weights"
    assert not (tmp_path / "store" / digest / CLAIM_FILE).exists()


def test_a_marker_replaced_while_it_is_read_is_read_again(tmp_path: Path) -> None:
    """Another node removed the marker and claimed again between this node's open and its
    look: a race, read again, not a store to give up on (which trained the entry twice)."""
    store = _quick_store(tmp_path / "store", exclusive=False)
    digest = "e" * 64
    (tmp_path / "store" / digest).mkdir(parents=True)
    (tmp_path / "store" / digest / CLAIM_FILE).write_text('{"token": "other"}')
    real, failures = store.fs, []

    class OneMissedOpen:
        def __getattr__(self, name):
            return getattr(real, name)

        def open_input_stream(self, path):
            if not failures:
                failures.append(path)
                raise FileNotFoundError(f"Failed to open local file '{path}'")
            return real.open_input_stream(path)
    store.fs = OneMissedOpen()
    assert store.claim_owner(digest) == "other" and len(failures) == 1


def test_a_failed_training_frees_the_claim(tmp_path: Path) -> None:
    store = _quick_store(tmp_path / "store", exclusive=True)

    def fail():
        raise RuntimeError("out of memory")
    with pytest.raises(RuntimeError):
        cached_file(tmp_path / "a", DESCRIPTION, TEACHER_FILE, fail, store)
    digest = description_hash(DESCRIPTION)
    assert not (tmp_path / "store" / digest / CLAIM_FILE).exists()
    _, source = cached_file(tmp_path / "b", DESCRIPTION, TEACHER_FILE, lambda: ({"w": torch.ones(2)}, {}), store)
    assert source == TRAINED  # at once: no stale marker to wait out


def test_an_unusable_store_costs_only_the_sharing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = TeacherStore(str(blocker / "teachers"))
    path, source = cached_file(tmp_path / "cache", DESCRIPTION, TEACHER_FILE, lambda: ({"w": torch.ones(2)}, {}),
                               store)
    assert source == TRAINED and path.is_file()
    assert "unusable" in caplog.text
    spec = RunSpec.from_flat("kd", {}, 0, Assets(teacher_store="nosuchscheme://bucket/teachers"))
    assert teachers.teacher_store(spec) is None and "cannot be opened" in caplog.text


TINY = {"teacher_arch": "resnet8", "teacher_epochs": 1}


def _provider(cache: Path, store: Path) -> TeacherProvider:
    spec = RunSpec.from_flat("kd", TINY, 0, Assets(teacher_cache=str(cache), teacher_store=str(store)))
    provider = TeacherProvider(spec, DataStub(), CPU)
    provider("resnet8")
    return provider


@pytest.mark.usefixtures("one_thread")
def test_providers_and_the_run_record_say_where_the_teacher_came_from(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    store = tmp_path / "store"
    first = _provider(tmp_path / "node_a", store)
    assert first.tags() == {"teacher.source": TRAINED} and len(first.built) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a teacher in the store was trained again")
    monkeypatch.setattr(teachers, "train_teacher", no_training)
    fetched = _provider(tmp_path / "node_b", store)
    assert fetched.tags() == {"teacher.source": FETCHED} and fetched.built == []
    assert _provider(tmp_path / "node_b", store).tags() == {"teacher.source": CACHED}
    digest = first.built[0]
    assert _sha256(tmp_path / "node_b" / digest / TEACHER_FILE) == _sha256(store / digest / TEACHER_FILE)

    # The driver's own cache lacks the teacher: it is fetched from the store to be logged.
    uri = sqlite_uri(tmp_path / "mlruns.db")
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    spec = RunSpec.from_flat("kd", TINY, 0, Assets(teacher_cache=str(tmp_path / "driver"), teacher_store=str(store)))
    record_teacher(client, run_id, spec, result={"teacher.source": FETCHED, "epoch": 1})
    tags = client.get_run(run_id).data.tags
    assert tags["teacher.source"] == FETCHED and tags["teacher.hash"] == digest
    assert sorted(a.path for a in client.list_artifacts(run_id, f"teacher/{digest}")) == [
        f"teacher/{digest}/{META_FILE}", f"teacher/{digest}/{TEACHER_FILE}"]


@pytest.mark.usefixtures("one_thread")
def test_iekd_autoencoder_is_shared_too(tmp_path: Path) -> None:
    from kd_platform.models import build_model
    from kd_platform.run.engine import build_method
    torch.manual_seed(3)
    file = tmp_path / "teacher.pt"
    torch.save(build_model("resnet8", 10, 1).state_dict(), file)

    def build(node: str) -> TeacherProvider:
        spec = RunSpec.from_flat("iekd", {**TINY, "ae_epochs": 1}, 0,
                                 Assets(teacher_checkpoint=str(file), teacher_cache=str(tmp_path / node),
                                        teacher_store=str(tmp_path / "store")))
        provider = TeacherProvider(spec, DataStub(), CPU)
        build_method(spec, DataStub(), CPU, provider)
        return provider
    first, second = build("node_a"), build("node_b")
    assert first.tags() == {"teacher.source": CHECKPOINT, "teacher.iekd_autoencoder.source": TRAINED}
    assert second.tags() == {"teacher.source": CHECKPOINT, "teacher.iekd_autoencoder.source": FETCHED}
    (digest,) = first.built
    name = "iekd_autoencoder.pt"
    assert _sha256(tmp_path / "node_b" / digest / name) == _sha256(tmp_path / "store" / digest / name)


def test_the_store_is_the_storage_path_when_one_is_given(tmp_path: Path) -> None:
    common = ["kd", "--tracking-uri", sqlite_uri(tmp_path / "m.db"), "--out", str(tmp_path / "out"), "--samples", "1"]
    assets = sweep_settings([*common, "--storage-path", str(tmp_path / "shared")]).assets
    assert assets.teacher_store == str((tmp_path / "shared" / "teachers").resolve())
    assert assets.teacher_cache == str((tmp_path / "out" / "teachers").resolve())
    bucket = sweep_settings([*common, "--storage-path", "s3://bucket/kd/"]).assets
    assert bucket.teacher_store == "s3://bucket/kd/teachers"
    # No shared storage named, or the store is the cache itself: one tier, as on one machine.
    assert sweep_settings(common).assets.teacher_store == ""
    same = sweep_settings([*common, "--storage-path", str(tmp_path / "out")]).assets
    assert same.teacher_store == ""


@pytest.mark.slow
def test_a_sweep_on_three_nodes_trains_its_teacher_once(tmp_path: Path) -> None:
    """Ray's multi-node test cluster, every node with its own teacher cache (its environment's
    ``KD_TEACHER_CACHE``) and ``--storage-path`` shared: one node trains, the others fetch."""
    from ray.cluster_utils import Cluster
    assert teachers.CACHE_ENV not in os.environ  # the driver keeps the command line's cache
    caches = [tmp_path / f"node{i}" for i in range(3)]
    with private_ray_tmpdir("kdts"):
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "env_vars": {teachers.CACHE_ENV: str(caches[0])}})
        try:
            for cache in caches[1:]:
                cluster.add_node(num_cpus=1, env_vars={teachers.CACHE_ENV: str(cache)})
            cluster.wait_for_nodes()
            uri = sqlite_uri(tmp_path / "mlruns.db")
            out = run_cli("platform.sweep", "kd", "--no-confirm", "--address", cluster.address, "--tracking-uri", uri,
                          "--out", str(tmp_path / "res"), "--storage-path", str(tmp_path / "shared"),
                          "--samples", "3", "--max-concurrent", "3", "--epochs", "1", "--quiet",
                          "--set", "teacher_arch=resnet8", "--set", "teacher_epochs=3")
            nodes = {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
        finally:
            cluster.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    runs = runs_in(uri)
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    placed = {c.data.tags["node_id"]: c.data.tags["teacher.source"] for c in children}
    assert set(placed) == nodes  # one trial per node (one CPU each, three at once)
    assert sorted(placed.values()) == [FETCHED, FETCHED, TRAINED]
    (digest,) = {c.data.tags["teacher.hash"] for c in children}
    shared = tmp_path / "shared" / "teachers" / digest
    meta = json.loads((shared / META_FILE).read_text())
    trainer = next(node for node, source in placed.items() if source == TRAINED)
    assert meta["made_by"]["node_id"] == trainer and not (shared / CLAIM_FILE).exists()
    # Trials that fetched were under way while the teacher was trained (the one-process-per-node
    # wait itself is pinned down by the two-process tests above; here Ray decides the timing).
    published = (shared / TEACHER_FILE).stat().st_mtime
    overlapping = sum(c.info.start_time / 1000 < published for c in children)
    assert overlapping >= 2
    # Every node's own cache, and the driver's (filled to log the artifact), hold the published bytes.
    copies = [c / digest / TEACHER_FILE for c in caches] + [tmp_path / "res" / "teachers" / digest / TEACHER_FILE]
    assert {_sha256(p) for p in copies} == {_sha256(shared / TEACHER_FILE)}
    assert all(json.loads((p.parent / META_FILE).read_text()) == meta for p in copies)
    from mlflow.tracking import MlflowClient
    logged = MlflowClient(uri).list_artifacts(parent.info.run_id, f"teacher/{digest}")
    assert sorted(a.path.rsplit("/", 1)[-1] for a in logged) == [META_FILE, TEACHER_FILE]
    print(f"\n[teacher store] trained on 1 node in {meta['train_s']} s, fetched by the other {len(nodes) - 1}; "
          f"{overlapping} of {len(children)} trials had started before it was published")
