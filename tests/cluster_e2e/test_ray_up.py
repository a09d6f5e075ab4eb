"""``ray up cluster-local.yaml`` on three test hosts, a sweep across them, ``ray down``.

Opt-in (about eight minutes on 2 busy cores, and it needs root):
``KD_CLUSTER_E2E=1 python -m pytest -q tests/cluster_e2e``.
How the hosts stand in for machines, and what differs: testhosts.py.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_up_path  # noqa: E402
import testhosts  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(2400, method="signal"),  # signal: a timeout still runs the teardown
    pytest.mark.skipif(os.environ.get("KD_CLUSTER_E2E") != "1",
                       reason="the ray up test runs with KD_CLUSTER_E2E=1 (root, about eight minutes)"),
    pytest.mark.skipif(bool(testhosts.missing_requirements()), reason=testhosts.missing_requirements() or "ok"),
]


def test_ray_up_sweep_ray_down():
    lab = testhosts.Lab()
    with lab:
        times = ray_up_path.whole_path(lab)
        assert set(times) >= {"ray up", "workers joined", "sweep", "MLflow check", "ray down"}
    # Everything the test made is gone: namespaces, links, and with them every process in them.
    assert testhosts.leftovers() == []
    assert not any(h.pids() for h in lab.hosts)
    assert not lab.dir.exists()
