"""``bench/gpu.py``: it runs where only torch, torchvision, numpy and pyyaml exist (the GPU
machine, imitated by ``bench/bare``'s allowlist of importable modules), it keeps the
sections it finished when it is killed, and it refuses a bad command line before writing.
``--sim-cuda`` runs in ``.ci/run``, after the tests: at 1-3 minutes it is a CI step of its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

ABSENT_ON_THE_GPU_MACHINE = ("ray", "mlflow", "optuna", "sklearn", "pandas", "scipy", "matplotlib")


def _bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench" / "bare"), "."])
    return env


def test_the_bare_environment_hides_everything_but_torch_numpy_and_yaml():
    probe = ("import importlib.util, sys\n"
             "import numpy, yaml, torchvision, kd_platform\n"
             f"for name in {ABSENT_ON_THE_GPU_MACHINE!r}:\n"
             "    assert importlib.util.find_spec(name) is None, name\n"
             "    try:\n"
             "        __import__(name)\n"
             "    except ModuleNotFoundError:\n"
             "        continue\n"
             "    sys.exit(f'{name} was importable')\n"
             "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=_bare_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    # Outside it, the same names import: the check above is the hook's doing.
    assert subprocess.run([sys.executable, "-c", "import ray, mlflow, pandas"], cwd=REPO, timeout=120).returncode == 0


def test_quick_cpu_run_needs_only_torch_numpy_and_yaml(tmp_path: Path):
    folder = tmp_path / "gpu"
    # A budget no busy machine runs out of: a section skipped for time would fail the checks below.
    out = subprocess.run([sys.executable, "bench/gpu.py", "--quick", "--budget", "400", "--out", str(folder)],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=_bare_env())
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    text = out.stdout
    lines = text.splitlines()
    for label in ("python ", "torch ", "torchvision ", "CPUs"):
        assert label in lines[2], text[:500]
    for label in ("/dev/shm", "C compiler", "Python.h", "triton", "decode_jpeg on cuda: no CUDA"):
        assert label in lines[3], text[:800]
    for section in ("[1] data path", "[2] OKDPH", "[3] one epoch", "[4] 1 against 2"):
        assert section in text, text
    for ratio in ("ratio device / loader img/s", "ratio device / loader img/s per CPU thread",
                  "ratio aggregate img/s, 2 processes / 1"):
        assert ratio in text, text
    assert "ratio fused / sequential step time" in text, text
    assert "implied 300 epochs" in text
    assert "auto: " in text and "fused=auto -> off" in text and "decode_jpeg: " in text
    data = json.loads((folder / "results.json").read_text())
    assert data["status"] == "done" and data["sections_done"] == ["1", "1b", "2", "3", "4"]
    assert data["mode"] == "cpu-quick" and data["env"]["torch"] and data["env"]["shm"]["total_gib"] > 0
    assert data["ratios"]["data.device_over_loader"] > 0 and data["ratios"]["procs.2_over_1"] > 0
    assert data["sections"]["3"]["preset"]["epoch_s"] > 0
    assert data["fallbacks"]["auto"]["amp=auto -> fp32"] > 0
    assert data["fallbacks"]["decode_jpeg"]["device"] > 0
    assert not data["failures"] and not any("failed" in note for note in data["notes"]), data
    assert "[3] one epoch" in (folder / "bench.log").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_keeps_the_sections_it_finished(tmp_path: Path, sig: signal.Signals):
    folder = tmp_path / "gpu"
    results = folder / "results.json"
    proc = subprocess.Popen([sys.executable, "bench/gpu.py", "--quick", "--sections", "1,2,3", "--out", str(folder)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_bare_env())
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and "1" in json.loads(results.read_text())["sections_done"]:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == -sig if sig == signal.SIGKILL else rc == 128 + sig, rc
    data = json.loads(results.read_text())
    assert "1" in data["sections_done"] and "3" not in data["sections_done"], data["sections_done"]
    assert data["sections"]["1"]["device"]["img_s"] > 0
    assert data["status"] == ("terminated" if sig == signal.SIGTERM else "running")
    if sig == signal.SIGTERM:
        assert any(n.startswith(f"terminated by signal {int(sig)} during section") for n in data["notes"])
    assert "[1] data path" in (folder / "bench.log").read_text()


@pytest.mark.parametrize("args, flag", [(["--sections", "1,9"], "--sections"), (["--budget", "0"], "--budget"),
                                        (["--quick", "--sim-cuda"], "--sim-cuda")])
def test_a_bad_command_line_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], flag: str):
    folder = tmp_path / "gpu"
    out = subprocess.run([sys.executable, "bench/gpu.py", *args, "--out", str(folder)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env=_bare_env())
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1 and flag in out.stderr, out.stderr
    assert not folder.exists() and not out.stdout
