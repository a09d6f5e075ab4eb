"""``python -m platform.check_cluster --smoke`` on Ray's multi-node test cluster: a head and
two worker nodes on this machine (``ray.cluster_utils.Cluster``), then a node that declares a
GPU it does not have, as a node whose torch cannot see its GPU would look."""
from __future__ import annotations

import pytest
from conftest import private_ray_tmpdir, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    with private_ray_tmpdir("kdsm"):
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            for _ in range(2):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            yield c
        finally:
            c.shutdown()


def _rows(stdout: str) -> dict[str, str]:
    """node id prefix -> its row, from the table the command prints."""
    lines = stdout.strip().splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("node "))
    return {ln.split()[1]: ln for ln in lines[header + 1:-1]}


def _node_ids(c) -> list[str]:
    return [n.node_id[:8] for n in [c.head_node, *c.worker_nodes]]


def test_smoke_trains_on_every_node_and_fails_on_a_broken_one(cluster):
    out = run_cli("platform.check_cluster", "--smoke", "--address", cluster.address, "--timeout", "300", timeout=420)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    rows = _rows(out.stdout)
    assert sorted(rows) == sorted(_node_ids(cluster)), out.stdout
    for row in rows.values():
        # One row per node: device, torch version, unfused and fused img/s, and the verdict.
        assert row.rstrip().endswith("pass") and " CPU " in row and " / " in row, row
    assert "head" in rows[cluster.head_node.node_id[:8]]
    assert out.stdout.strip().splitlines()[-1] == "3 nodes: all passed"

    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)  # Ray offers a GPU that torch cannot find
    cluster.wait_for_nodes()
    out = run_cli("platform.check_cluster", "--smoke", "--address", cluster.address, "--timeout", "300", timeout=420)
    assert out.returncode == 1, (out.stdout[-3000:], out.stderr[-3000:])
    rows = _rows(out.stdout)
    broken = rows.pop(gpu_node.node_id[:8])
    assert "FAIL: RuntimeError: Ray offers a GPU here but torch" in broken, broken
    assert len(rows) == 3 and all(r.rstrip().endswith("pass") for r in rows.values()), out.stdout
    assert out.stdout.strip().splitlines()[-1] == "4 nodes: 1 failed"


@pytest.mark.parametrize("args, words", [(["--smoke", "--nodes", "2"], "'--nodes'"),
                                         (["--smoke", "--timeout", "soon"], "--timeout"),
                                         (["--smoke", "--address"], "--address needs a value")])
def test_smoke_bad_arguments_are_one_line(args, words):
    out = run_cli("platform.check_cluster", *args, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and words in out.stderr, out
