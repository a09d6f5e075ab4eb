"""The teacher cache: trained once, reused, shared safely between processes, keyed by what changes it."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, DataStub, sqlite_uri

from kd_platform import teachers
from kd_platform.cli import sweep_main, train_main
from kd_platform.models import build_model
from kd_platform.run.engine import RunSpec, build_method
from kd_platform.run.spec import Assets
from kd_platform.teachers import TEACHER_FILE, TeacherProvider, teacher_info

CPU = torch.device("cpu")
TINY = {"teacher_arch": "resnet8", "teacher_epochs": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(cache: Path, method: str = "kd", seed: int = 0, **knobs) -> RunSpec:
    return RunSpec.from_flat(method, {**TINY, **knobs}, seed, Assets(teacher_cache=str(cache)))


def _canonical_sha256(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_teacher_trained_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(tmp_path)
    first = TeacherProvider(spec, DataStub(), CPU)
    torch.manual_seed(7)
    teacher = first("resnet8")
    after_training = torch.rand(3)
    info = teacher_info(spec)
    path = Path(info["teacher.path"])
    assert first.built == [info["teacher.hash"]] and path == tmp_path / info["teacher.hash"] / TEACHER_FILE
    meta = json.loads((path.parent / "meta.json").read_text())
    assert _canonical_sha256(meta["description"]) == info["teacher.hash"]
    assert meta["description"]["arch"] == "resnet8" and meta["description"]["epochs"] == 1
    assert isinstance(meta["val_acc"], float)
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached teacher was trained again")
    monkeypatch.setattr(teachers, "train_teacher", no_training)
    second = TeacherProvider(spec, DataStub(), CPU)
    torch.manual_seed(7)
    again = second("resnet8")
    # Training the teacher inside a run must not move the run's random stream.
    assert torch.equal(torch.rand(3), after_training)
    assert second.built == [] and path.stat().st_mtime_ns == mtime
    for (k, a), b in zip(teacher.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    again.train()
    assert not again.training and not any(p.requires_grad for p in again.parameters())


def _request_teacher(cache: str, barrier, results) -> None:
    torch.set_num_threads(1)
    provider = TeacherProvider(_spec(Path(cache)), DataStub(), CPU)
    barrier.wait()
    net = provider("resnet8")
    results.put((provider.built, float(sum(t.double().sum() for t in net.state_dict().values()))))


def test_two_processes_train_the_teacher_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_request_teacher, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(len(built) for built, _ in got) == 1
    assert got[0][1] == got[1][1]  # both loaded the one file
    entries = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(entries) == 1 and (entries[0] / TEACHER_FILE).is_file()
    assert not list(entries[0].glob("*.tmp"))


def test_hash_follows_the_teacher_recipe_only(tmp_path: Path) -> None:
    base = teacher_info(_spec(tmp_path))["teacher.hash"]
    changed = [dict(teacher_epochs=2), dict(teacher_lr=0.05), dict(teacher_arch="resnet14"),
               dict(teacher_batch_size=32), dict(teacher_weight_decay=1e-4), dict(teacher_schedule="multistep"),
               dict(teacher_milestones="1"), dict(val_fraction=0.2), dict(augment="none")]
    hashes = [teacher_info(_spec(tmp_path, **c))["teacher.hash"] for c in changed]
    hashes.append(teacher_info(_spec(tmp_path, seed=1))["teacher.hash"])
    assert base not in hashes and len(set(hashes)) == len(hashes)
    # Knobs of the student or of the distillation leave the teacher alone, across methods too.
    same = [_spec(tmp_path, alpha=0.5, temperature=2.0), _spec(tmp_path, arch="resnet14", lr=0.01, epochs=9),
            _spec(tmp_path, "dist", tau_squared=False), _spec(tmp_path, "cmkd"), _spec(tmp_path, "iekd")]
    assert {teacher_info(s)["teacher.hash"] for s in same} == {base}
    assert teacher_info(RunSpec.from_flat("ce", {}, 0)) == {}


def _saved_teacher(path: Path, arch: str) -> Path:
    torch.manual_seed(3)
    torch.save(build_model(arch, 10, 1).state_dict(), path)
    return path


def test_user_checkpoint_is_used_as_is(tmp_path: Path) -> None:
    file = _saved_teacher(tmp_path / "mine.pt", "resnet8")
    spec = RunSpec.from_flat("kd", TINY, 0, Assets(teacher_cache=str(tmp_path / "cache"), teacher_checkpoint=str(file)))
    provider = TeacherProvider(spec, DataStub(), CPU)
    net = provider("resnet8")
    expected = torch.load(file, weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    assert provider.built == [] and not (tmp_path / "cache").exists()
    assert teacher_info(spec) == {"teacher.hash": hashlib.sha256(file.read_bytes()).hexdigest(),
                                  "teacher.path": str(file)}


def test_iekd_autoencoder_is_cached_per_teacher_and_recipe(tmp_path: Path) -> None:
    file = _saved_teacher(tmp_path / "mine.pt", "resnet8")

    def build(**knobs) -> TeacherProvider:
        spec = RunSpec.from_flat("iekd", {**TINY, "ae_epochs": 1, **knobs}, 0,
                                 Assets(teacher_cache=str(tmp_path), teacher_checkpoint=str(file)))
        provider = TeacherProvider(spec, DataStub(), CPU)
        build_method(spec, DataStub(), CPU, provider)
        return provider

    assert len(build().built) == 1
    assert build(l_inh=5.0, split_mode="random").built == []  # stage B knobs reuse stage A
    assert len(build(ae_epochs=2).built) == 1


def test_the_teacher_stage_makes_iekds_autoencoder_before_the_method_is_built(tmp_path: Path) -> None:
    """teachers.prepare trains the teacher and then IE-KD's stage A; building the method after it
    only loads both from the cache."""
    spec = RunSpec.from_flat("iekd", {**TINY, "ae_epochs": 1}, 0, Assets(teacher_cache=str(tmp_path)))
    bind = teachers.prepare(spec, CPU)
    assert bind is not None
    provider = bind.__self__
    assert len(provider.built) == 2  # the teacher, then the auto-encoder
    assert sorted(p.name for p in tmp_path.glob("*/*.pt")) == ["iekd_autoencoder.pt", TEACHER_FILE]
    build_method(spec, DataStub(), CPU, bind(DataStub()))
    assert len(provider.built) == 2  # the build found both
    assert teachers.prepare(RunSpec.from_flat("okdph", {}, 0), CPU) is None  # no teacher, no stage


def test_bad_teacher_checkpoints_fail_before_any_run(tmp_path: Path) -> None:
    """A file of the wrong architecture and a truncated file, each through the real command line
    (both at once, to halve the wait for two interpreters)."""
    wrong = _saved_teacher(tmp_path / "wrong_arch.pt", "resnet8")  # the kd space's teacher is a resnet20
    good = _saved_teacher(tmp_path / "good.pt", "resnet20").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    procs = {}
    for file in (wrong, truncated):
        db, out = tmp_path / f"{file.stem}.db", tmp_path / f"out_{file.stem}"
        cmd = [sys.executable, "-m", "platform.train", "kd", "--epochs", "1", "--tracking-uri", sqlite_uri(db),
               "--out", str(out), "--teacher-checkpoint", str(file)]
        procs[file] = (subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                       db, out)
    for file, (proc, db, out) in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(file) in lines[0], err
        # No store, so no run (and nothing written to the results directory either).
        assert not db.exists() and not out.exists()


def test_teacher_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = _saved_teacher(tmp_path / "t.pt", "resnet20")
    db = tmp_path / "m.db"
    common = ["--tracking-uri", sqlite_uri(db), "--out", str(tmp_path / "out"), "--teacher-checkpoint", str(file)]
    assert train_main(["okdph", *common]) == 2
    assert "has no teacher" in capsys.readouterr().err
    assert sweep_main(["kd", "--samples", "1", "--set", "teacher_arch=resnet8", *common]) == 2
    assert "does not fit architecture 'resnet8'" in capsys.readouterr().err
    space = tmp_path / "space.yaml"
    space.write_text("swept:\n  teacher_arch: {type: choice, values: [resnet20, resnet14]}\n")
    assert sweep_main(["kd", "--space", str(space), *common]) == 2
    assert "teacher_arch cannot be swept" in capsys.readouterr().err
    assert not db.exists()
