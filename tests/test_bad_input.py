"""Bad input: one clear line naming the problem, exit code 2, nothing written."""
from __future__ import annotations

import json

import pytest
from conftest import run_cli, sqlite_uri


@pytest.fixture
def bad_space(tmp_path):
    def write(text: str):
        path = tmp_path / "space.yaml"
        path.write_text(text)
        return str(path)
    return write


CASES = {
    "unknown method": (["platform.sweep", "nosuch"], "unknown method 'nosuch'"),
    "unknown knob": (["platform.sweep", "okdph", "--set", "omegga=0.5"], "unknown knob 'omegga'"),
    "knob out of range": (["platform.sweep", "okdph", "--set", "omega=1.5"], "'omega'"),
    "knob of wrong type": (["platform.train", "okdph", "--set", "n_students=two"], "'n_students'"),
    "bad choice": (["platform.train", "okdph", "--set", "fusion_unit=week"], "'fusion_unit'"),
    "zero epochs": (["platform.sweep", "okdph", "--epochs", "0"], "--epochs"),
    "negative samples": (["platform.sweep", "okdph", "--samples", "-3"], "--samples"),
    "set without value": (["platform.sweep", "okdph", "--set", "omega"], "key=value"),
    "resume of no sweep": (["platform.sweep", "okdph", "--resume", "{tmp}"], "holds no sweep"),
    "resume of a sweep from the old layout": (["platform.sweep", "okdph", "--resume", "{old_sweep}"],
                                              "older layout"),
    "degenerate configuration (identical students)": (["platform.train", "okdph", "--set", "hwm_grad=false"],
                                                      "degenerate okdph configuration: same_init=true"),
    "degenerate configuration in a sweep": (["platform.sweep", "okdph", "--set", "hwm_mix=mean"], "hwm_mix=mean"),
    "swept knob with no effect anywhere": (["platform.sweep", "okdph", "--set", "beta=0"],
                                           "swept knob 'temperature' has no effect"),
    "ablation values that cannot differ": (["platform.sweep", "okdph", "--ablate", "fusion_interval", "--epochs", "2"],
                                           "values 0 and 5 train identically"),
    "ablation of a knob that does nothing": (["platform.sweep", "okdph", "--ablate", "gamma", "--set",
                                              "fusion_interval=0"], "no value of it changes this run"),
    "confirmation flags on an ablation": (["platform.sweep", "okdph", "--ablate", "gamma", "--confirm-seeds", "2"],
                                          "--confirm-seeds"),
    "--no-confirm with --confirm-top": (["platform.sweep", "okdph", "--no-confirm", "--confirm-top", "1"],
                                        "--no-confirm"),
    "negative --confirm-top": (["platform.sweep", "okdph", "--confirm-top", "-1"], "--confirm-top"),
    "--name that escapes --out": (["platform.sweep", "okdph", "--name", "../x"], "--name '../x'"),
    "--name with a separator": (["platform.sweep", "okdph", "--name", "a/b"], "--name 'a/b'"),
    "--name of 10,000 characters": (["platform.sweep", "okdph", "--name", "x" * 10000], "--name"),
    "negative --seed": (["platform.sweep", "okdph", "--seed", "-1"], "--seed"),
    "--epochs above the knob's cap": (["platform.sweep", "okdph", "--epochs", "1000000"], "'epochs'"),
    "--storage-path of an unknown scheme": (["platform.sweep", "okdph", "--storage-path", "nosuch://x"],
                                            "nosuch://"),
    "empty --experiment": (["platform.train", "okdph", "--experiment", ""], "--experiment"),
    "--teacher-cache that is a file": (["platform.sweep", "kd", "--teacher-cache", "{truncated}"],
                                       "--teacher-cache"),
    "val_fraction that leaves no validation image": (["platform.sweep", "okdph", "--set", "val_fraction=0.0001"],
                                                     "'val_fraction'"),
    "data_dir for digits": (["platform.train", "okdph", "--set", "data_dir={tmp}"], "'data_dir'"),
    "resume with --set": (["platform.sweep", "okdph", "--resume", "--set", "omega=0.5"], "--set"),
    "missing space file": (["platform.sweep", "okdph", "--space", "{tmp}/none.yaml"], "none.yaml"),
    "unknown architecture": (["platform.train", "okdph", "--set", "arch=resnet9000"], "resnet9000"),
    "missing dataset directory": (["platform.train", "ce", "--set", "dataset=tinyimagenet",
                                   "--set", "data_dir={tmp}/nodata"], "nodata"),
    "corrupt dataset file": (["platform.sweep", "ce", "--set", "dataset=cifar10",
                              "--set", "data_dir={corrupt_cifar}"], "cifar-10-batches-py"),
    "teacher checkpoint of the wrong architecture": (["platform.train", "kd", "--teacher-checkpoint",
                                                      "{wrong_arch}"], "wrong.pt"),
    "corrupt teacher checkpoint": (["platform.sweep", "kd", "--teacher-checkpoint", "{truncated}"], "cut.pt"),
    "teacher checkpoint for an online method": (["platform.train", "okdph", "--teacher-checkpoint",
                                                 "{truncated}"], "no teacher"),
    "tracking directory missing": (["platform.sweep", "okdph", "--tracking-uri", "sqlite:///{tmp}/no/dir/m.db"],
                                   "does not exist"),
    "unreachable tracking server": (["platform.sweep", "okdph", "--tracking-uri", "http://127.0.0.1:9"],
                                    "unreachable"),
    "ablation with --samples": (["platform.sweep", "okdph", "--ablate", "gamma", "--samples", "3"], "--samples"),
    "sweep without validation": (["platform.sweep", "okdph", "--set", "val_fraction=0"], "val_fraction"),
    "preset for another method": (["platform.sweep", "okdph", "--preset", "cifar100-resnet56-resnet20"],
                                  "not 'okdph'"),
    "unknown preset": (["platform.train", "okdph", "--preset", "imagenet-vit"], "imagenet-vit"),
    "fused peers for a multi-branch method": (["platform.sweep", "pcl", "--set", "fused=true"], "'fused'"),
    "fused peers for an offline method": (["platform.train", "kd", "--set", "fused=true"], "'fused'"),
    "fused peers of an unstackable architecture": (["platform.sweep", "dml", "--set", "fused=true",
                                                    "--set", "arch=densenet40_12"], "densenet40_12"),
    "device data path without the augmentation": (["platform.sweep", "ce", "--set", "dataset=cifar10",
                                                   "--set", "data_dir={tmp}", "--set", "data_path=device",
                                                   "--set", "augment=randaugment"], "'data_path'"),
    "knob that is not a number (nan)": (["platform.sweep", "okdph", "--set", "omega=nan"],
                                        "knob 'omega': 'nan' is not a finite number"),
    "knob that overflows to infinity": (["platform.train", "okdph", "--set", "lr=1e999"], "'lr'"),
    "flag that is not finite": (["platform.sweep", "okdph", "--cpus-per-trial", "inf"], "--cpus-per-trial"),
    "fractional flag that is nan": (["platform.train", "okdph", "--gpus-per-trial", "nan"], "--gpus-per-trial"),
    "seed that is not an integer": (["platform.train", "okdph", "--seed", "1.5"], "--seed"),
    "more CPUs than the machine has": (["platform.sweep", "okdph", "--cpus-per-trial", "1",
                                        "--workers-per-trial", "4096"], "--cpus-per-trial"),
    "tracking URI of an unknown scheme": (["platform.sweep", "okdph", "--tracking-uri", "ftp://x"],
                                          "--tracking-uri: unsupported scheme 'ftp'"),
    "file tracking store": (["platform.train", "okdph", "--tracking-uri", "file://{tmp}/mlruns"], "sqlite:///"),
    "milestone that is not an integer": (["platform.train", "okdph", "--set", "schedule=multistep",
                                          "--set", "milestones=10,abc"], "'milestones'"),
    "negative milestone": (["platform.sweep", "okdph", "--set", "milestones=-5"], "'milestones'"),
    "decreasing milestones": (["platform.sweep", "okdph", "--set", "milestones=20,10"], "increasing"),
    "teacher milestones malformed": (["platform.train", "kd", "--set", "teacher_milestones=3,x"],
                                     "'teacher_milestones'"),
}


@pytest.fixture
def placeholders(tmp_path):
    """Bad files in their real formats: a truncated CIFAR batch and teacher checkpoints."""
    import torch

    from kd_platform.models import build_model
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"):
        (cifar / name).write_bytes(b"\x80\x04\x95 truncated")
    torch.save(build_model("resnet8", 10, 1).state_dict(), tmp_path / "wrong.pt")  # kd's teacher is resnet20
    torch.save(build_model("resnet20", 10, 1).state_dict(), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    # A sweep's state file as the layout before the layered packages wrote it (no "layout" key).
    old = tmp_path / "old" / "okdph-20260101-000000"
    old.mkdir(parents=True)
    (old / "kd_sweep.json").write_text(json.dumps({
        "method": "okdph", "space_source": "search_spaces/okdph.yaml", "swept": {}, "fixed": {},
        "metric": "val/acc/students_mean", "mode": "max", "grace_period": 1, "reduction_factor": 2,
        "samples": 8, "epochs": 4, "max_concurrent": None, "seed": 0, "tracking_uri": "sqlite:///m.db",
        "experiment": "okdph", "name": old.name, "launch": {}, "parent_run_id": "0" * 32, "ablation": None,
        "assets": {}}))
    return {"old_sweep": str(old), "tmp": str(tmp_path), "corrupt_cifar": str(tmp_path / "cifar"),
            "wrong_arch": str(tmp_path / "wrong.pt"),
            "truncated": str(tmp_path / "cut.pt")}


def _run(args: list[str], capfd) -> tuple[int, str]:
    """The command line in this process (the same entry point as ``python -m``, without paying
    for a new interpreter per case); the alias itself is checked by subprocess below."""
    from kd_platform.cli import sweep_main, train_main
    main = {"platform.sweep": sweep_main, "platform.train": train_main}[args[0]]
    capfd.readouterr()
    code = main(args[1:])
    return code, capfd.readouterr().err


def test_the_python_m_alias_reports_errors_the_same_way(tmp_path):
    out = run_cli("platform.sweep", "nosuch", "--out", str(tmp_path / "res"),
                  "--tracking-uri", sqlite_uri(tmp_path / "m.db"), timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: unknown method 'nosuch'; known methods: " + ", ".join(__import__(
            "kd_platform.methods", fromlist=["method_names"]).method_names()))
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_rejects(case, tmp_path, placeholders, capfd):
    args, needle = CASES[case]
    args = [a.format(**placeholders) for a in args]
    db = tmp_path / "m.db"
    if "--tracking-uri" not in args:
        args += ["--tracking-uri", sqlite_uri(db)]
    code, stderr = _run(args + ["--out", str(tmp_path / "res")], capfd)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert needle in lines[0]
    assert not db.exists() and not (tmp_path / "res").exists()
    assert not list(tmp_path.rglob("*.db"))  # no MLflow store anywhere


def test_invalid_cluster_config(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster_name: x\nprovider: {type: aws, region: us-west-2}\nbogus_key: 1\n")
    out = run_cli("platform.check_cluster", str(bad), timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "cluster.yaml" in out.stderr and "bogus_key" in out.stderr
    ok = run_cli("platform.check_cluster", "cluster.yaml", timeout=120)
    assert ok.returncode == 0 and "valid" in ok.stdout


SPACES = {
    "malformed yaml": ("swept: {omega: [unclosed\n", "malformed YAML"),
    "empty swept": ("swept: {}\nfixed: {}\n", "'swept' is empty"),
    "a knob swept twice": ("swept:\n  omega: {type: uniform, low: 0.3, high: 0.9}\n"
                           "  omega: {type: uniform, low: 0.4, high: 0.5}\n", "key 'omega' appears twice (line 3)"),
    "asha that is a number": ("asha: 5\nswept:\n  omega: {type: uniform, low: 0.3, high: 0.9}\n",
                              "'asha' must be a mapping"),
    "fixed as a list": ("fixed: [omega]\nswept:\n  beta: {type: uniform, low: 0.3, high: 0.9}\n",
                        "'fixed' must be a mapping"),
    "swept as a list": ("swept: [omega, beta]\n", "'swept' must be a mapping"),
    "an ASHA reduction factor of 1": ("asha: {reduction_factor: 1}\nswept:\n"
                                      "  omega: {type: uniform, low: 0.3, high: 0.9}\n", "at least 2"),
    "a float range on an integer knob": ("swept:\n  fusion_interval: {type: uniform, low: 0, high: 5}\n",
                                         "'fusion_interval' is an integer"),
    "space that samples identical students": ("swept:\n  hwm_grad: {type: choice, values: ['true', 'false']}\n",
                                              "samples degenerate configurations"),
    "knob the method lacks": ("swept:\n  lambda_x: {type: uniform, low: 0, high: 1}\n", "'lambda_x'"),
    "range outside the knob's": ("swept:\n  omega: {type: uniform, low: 0.1, high: 3.0}\n", "'omega'"),
    "bad distribution": ("swept:\n  omega: {type: gaussian, mean: 0.5}\n", "'omega'"),
    "fixed and swept": ("swept:\n  omega: {type: uniform, low: 0.1, high: 0.9}\nfixed: {omega: 0.5}\n",
                        "both swept and fixed"),
    "non-finite bound": ("swept:\n  omega: {type: uniform, low: 0.1, high: .inf}\n", "not a finite number"),
    "nan fixed value": ("swept:\n  omega: {type: uniform, low: 0.1, high: 0.9}\nfixed: {gamma: .nan}\n",
                        "'gamma'"),
    "nan among the values": ("swept:\n  omega: {type: uniform, low: 0.1, high: 0.9, values: [0.5, .nan]}\n",
                             "'omega'"),
    "test metric": ("metric: test/acc/students_mean\nswept:\n  omega: {type: uniform, low: 0.1, high: 0.9}\n",
                    "sweeps tune on validation metrics only"),
    "metric the method does not report": ("metric: val/acc/student9\nswept:\n"
                                          "  omega: {type: uniform, low: 0.1, high: 0.9}\n", "val/acc/student1"),
    "bad mode": ("mode: maximise\nswept:\n  omega: {type: uniform, low: 0.1, high: 0.9}\n", "mode"),
    "malformed milestones": ("swept:\n  omega: {type: uniform, low: 0.1, high: 0.9}\nfixed: {milestones: '5,x'}\n",
                             "'milestones'"),
}


@pytest.mark.parametrize("case", sorted(SPACES))
def test_space_file_errors(case, bad_space, tmp_path, capfd):
    text, needle = SPACES[case]
    path = bad_space(text)
    code, stderr = _run(["platform.sweep", "okdph", "--space", path, "--tracking-uri",
                         sqlite_uri(tmp_path / "m.db"), "--out", str(tmp_path / "res")], capfd)
    assert code == 2, stderr
    line = stderr.strip()
    assert "\n" not in line and needle in line and "space.yaml" in line
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "res").exists()


class _RunsCode:
    """A pickle that, loaded by a plain ``pickle.load``, runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_1"])
def test_a_cifar_file_that_would_run_code_is_refused_unrun(tmp_path, capfd, victim):
    import pickle

    from dataset_files import write_cifar10
    write_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    with open(tmp_path / "data" / "cifar-10-batches-py" / victim, "wb") as fh:
        pickle.dump({"label_names": _RunsCode(marker), "data": _RunsCode(marker)}, fh, protocol=2)
    code, stderr = _run(["platform.train", "ce", "--set", "dataset=cifar10", "--set",
                         f"data_dir={tmp_path / 'data'}", "--tracking-uri", sqlite_uri(tmp_path / "m.db"),
                         "--out", str(tmp_path / "res")], capfd)
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert "refused" in stderr and "posix.system" in stderr and victim in stderr
    assert not marker.exists() and not (tmp_path / "m.db").exists() and not (tmp_path / "res").exists()


def test_a_binary_space_file_and_an_out_that_is_a_file(tmp_path, capfd):
    binary = tmp_path / "space.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, needle in ((["--space", str(binary)], "not a text file"), (["--out", str(afile)], "is a file")):
        code, stderr = _run(["platform.sweep", "okdph", *args, "--tracking-uri", sqlite_uri(tmp_path / "m.db")],
                            capfd)
        assert code == 2 and len(stderr.strip().splitlines()) == 1 and needle in stderr, stderr
    assert not (tmp_path / "m.db").exists() and afile.read_text() == "x"


def test_a_second_driver_on_one_sweep_is_one_line(tmp_path, capfd):
    """While one driver runs a sweep (it holds the directory's lock), a second ``--resume`` of it
    is refused before it starts Ray or touches MLflow."""
    import fcntl

    from kd_platform.cli import sweep_settings
    from kd_platform.sweep.tuner import LOCK_FILE, _save_state
    uri = sqlite_uri(tmp_path / "m.db")
    s = sweep_settings(["okdph", "--out", str(tmp_path / "res"), "--name", "busy", "--tracking-uri", uri])
    s.sweep_dir.mkdir(parents=True)
    _save_state(s)
    with open(s.sweep_dir / LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, stderr = _run(["platform.sweep", "okdph", "--resume", str(s.sweep_dir), "--out", str(tmp_path / "res")],
                            capfd)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "another driver" in stderr, stderr
    assert not (tmp_path / "m.db").exists()
