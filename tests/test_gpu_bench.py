"""``bench/gpu.py`` runs where only torch, torchvision, numpy and pyyaml exist: its quick CPU
mode, with Ray, MLflow, Optuna, scikit-learn, pandas and SciPy made unimportable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

UNAVAILABLE = ("ray", "mlflow", "optuna", "sklearn", "pandas", "scipy")


def test_quick_cpu_run_needs_only_torch_numpy_and_yaml(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    # A None entry in sys.modules makes every import of that name raise ImportError.
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in UNAVAILABLE))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), "."])
    results = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "bench/gpu.py", "--quick", "--json", str(results)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    text = out.stdout
    for label in ("python ", "torch ", "torchvision ", "CPUs"):
        assert label in text.splitlines()[2], text[:500]
    for section in ("[1] data path", "[2] OKDPH", "[3] one epoch", "[4] 1 against 2"):
        assert section in text, text
    for ratio in ("ratio device / loader img/s", "ratio device / loader img/s per CPU thread",
                  "ratio aggregate img/s, 2 processes / 1"):
        assert ratio in text, text
    # The fused form may be absent from a checkout; then the line says so instead of a ratio.
    assert "ratio fused / sequential step time" in text or "fused: not available" in text, text
    assert "implied 300 epochs" in text
    data = json.loads(results.read_text())
    assert data["mode"] == "cpu-quick" and data["env"]["torch"]
    assert data["ratios"]["data.device_over_loader"] > 0 and data["ratios"]["procs.2_over_1"] > 0
    assert data["sections"]["3"]["preset"]["epoch_s"] > 0
    assert not any("failed" in note for note in data["notes"]), data["notes"]
