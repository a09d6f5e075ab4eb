"""Bad input: one clear line naming the problem, exit code 2, nothing written."""
from __future__ import annotations

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
    "resume with --set": (["platform.sweep", "okdph", "--resume", "--set", "omega=0.5"], "--set"),
    "missing space file": (["platform.sweep", "okdph", "--space", "{tmp}/none.yaml"], "none.yaml"),
    "unknown architecture": (["platform.train", "okdph", "--set", "arch=resnet9000"], "resnet9000"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_rejects(case, tmp_path):
    args, needle = CASES[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    db = tmp_path / "m.db"
    out = run_cli(*args, "--tracking-uri", sqlite_uri(db), "--out", str(tmp_path / "res"), timeout=120)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert needle in lines[0]
    assert not db.exists() and not (tmp_path / "res").exists()


SPACES = {
    "malformed yaml": ("swept: {omega: [unclosed\n", "malformed YAML"),
    "empty swept": ("swept: {}\nfixed: {}\n", "'swept' is empty"),
    "knob the method lacks": ("swept:\n  lambda_x: {type: uniform, low: 0, high: 1}\n", "'lambda_x'"),
    "range outside the knob's": ("swept:\n  omega: {type: uniform, low: 0.1, high: 3.0}\n", "'omega'"),
    "bad distribution": ("swept:\n  omega: {type: gaussian, mean: 0.5}\n", "'omega'"),
    "fixed and swept": ("swept:\n  omega: {type: uniform, low: 0.1, high: 0.9}\nfixed: {omega: 0.5}\n",
                        "both swept and fixed"),
}


@pytest.mark.parametrize("case", sorted(SPACES))
def test_space_file_errors(case, bad_space, tmp_path):
    text, needle = SPACES[case]
    path = bad_space(text)
    out = run_cli("platform.sweep", "okdph", "--space", path, "--tracking-uri", sqlite_uri(tmp_path / "m.db"),
                  "--out", str(tmp_path / "res"), timeout=120)
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and needle in line and "space.yaml" in line
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "res").exists()
