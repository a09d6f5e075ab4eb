"""Every preset starts and trains one epoch, through the command line a user types, on
small datasets written in the real on-disk formats (CIFAR pickles, TinyImageNet folders)."""
from __future__ import annotations

import pytest
from conftest import run_cli, runs_in, sqlite_uri
from test_datasets import write_cifar10, write_cifar100, write_tinyimagenet

from kd_platform.methods import get_method
from kd_platform.sweep.presets import preset_methods, preset_names

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    write_cifar10(root, per_class_train=8, per_class_test=2)
    write_cifar100(root, per_class_train=2, per_class_test=1)
    write_tinyimagenet(root, per_class_train=6, per_class_val=2)
    return root


def _method_for(preset: str) -> str:
    """The preset's most demanding method: an offline one (needs a teacher), else OKDPH."""
    methods = preset_methods(preset)
    for kind in ("offline",):
        for m in methods:
            if get_method(m).kind == kind:
                return m
    return "okdph" if "okdph" in methods else methods[0]


# The ImageNet presets take published teachers, never trained ones: tests/test_imagenet.py runs them.
@pytest.mark.parametrize("preset", [p for p in preset_names() if not p.startswith("imagenet-")])
def test_preset_runs_one_epoch(preset, data_root, tmp_path):
    method = _method_for(preset)
    uri = sqlite_uri(tmp_path / "m.db")
    # digits reads no directory (and refuses one); every other preset's data is the fixture files.
    data_dir = [] if preset == "digits" else ["--set", f"data_dir={data_root}"]
    args = ["platform.train", method, "--preset", preset, "--epochs", "1", *data_dir,
            "--set", "batch_size=32", "--set", "loader_workers=0", "--tracking-uri", uri,
            "--out", str(tmp_path / "res")]
    if get_method(method).kind == "offline":
        args += ["--set", "teacher_epochs=1", "--set", "teacher_batch_size=32"]
    if method == "iekd":
        args += ["--set", "ae_epochs=1"]
    out = run_cli(*args, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED" and run.data.tags["preset"] == preset
    params = run.data.params
    assert params["epochs"] == "1" and params["batch_size"] == "32"  # --set overrides the preset
    assert "val/acc/students_mean" in run.data.metrics and "test/acc/students_mean" in run.data.metrics
