"""The `platform` command namespace must not break the standard library's `platform`."""
from __future__ import annotations

import importlib.util

from conftest import REPO, run_cli


def test_standard_platform_works_from_repo_root():
    out = run_cli("platform.sweep", "--help")
    assert out.returncode == 0, out.stderr
    assert "--samples" in out.stdout and "--resume" in out.stdout


def test_import_platform_and_torch_from_repo_root():
    import subprocess
    import sys
    code = ("import platform, torch, uuid; print(platform.system(), platform.machine(), "
            "platform.python_version(), platform.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    system, machine, version, path = out.stdout.split()
    assert system == "Linux" and machine and version.count(".") == 2
    assert path.endswith("platform/__init__.py")  # the shim really is the module in use


def test_train_help():
    out = run_cli("platform.train", "--help")
    assert out.returncode == 0 and "--set" in out.stdout


def test_shim_is_not_packaged():
    # An installed `platform` package would replace the standard module everywhere.
    spec = importlib.util.find_spec("kd_platform")
    assert spec is not None
    import tomllib
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["kd_platform*"]
