"""The ``cluster-local.yaml`` walk-through of docs/cluster.md, run for real on test hosts (see testhosts.py):
``ray up``, a sweep across the nodes, MLflow checked on the head, ``ray down``, nothing left.

    python tests/cluster_e2e/ray_up_path.py     # as root; prints the time of every step

The pytest test (test_ray_up.py) runs the same path.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testhosts  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLES, EPOCHS = 4, 2
SWEEP = ("cd ~/kd-platform && python -m platform.sweep okdph --address auto --tracking-uri http://127.0.0.1:5000 "
         f"--samples {SAMPLES} --epochs {EPOCHS} --no-confirm --storage-path {testhosts.SHARED}")
METRIC = "val/acc/students_mean"
# Test-only: the hosts' python3.11 already holds the pinned dependencies (see testhosts.py).
VENV_LINE = "python3.11 -m venv ~/kd-venv"
TEST_VENV_LINE = "python3.11 -m venv --system-site-packages ~/kd-venv"


def fill_config(lab: testhosts.Lab) -> Path:
    """A copy of cluster-local.yaml with the fields docs/cluster.md tells a user to set, plus the one
    test-only change of the venv line."""
    config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    head, *workers = lab.hosts
    config["provider"]["head_ip"] = head.ip
    config["provider"]["worker_ips"] = [w.ip for w in workers]
    config["auth"] = {"ssh_user": testhosts.SSH_USER, "ssh_private_key": str(lab.key)}
    setup = config["setup_commands"]
    assert any(VENV_LINE in c for c in setup), f"cluster-local.yaml no longer creates the venv with {VENV_LINE!r}"
    config["setup_commands"] = [c.replace(VENV_LINE, TEST_VENV_LINE) for c in setup]
    path = lab.dir / "cluster-local.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def checked(r, what: str) -> str:
    if r.returncode != 0:
        raise AssertionError(f"{what} failed ({r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}")
    return r.stdout


def active_nodes(status: str) -> int:
    """Nodes under "Active:" in ``ray status`` (counted per node type, " 3 local.cluster.node")."""
    if "Active:" not in status:
        return 0
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(int(n) for n in re.findall(r"^\s*(\d+) \S+", active, flags=re.M))


def poll(check: Callable[[], Any], timeout: float, failure: Callable[[], str], every: float = 5) -> Any:
    """``check()`` again every few seconds until it returns something true; then that."""
    end = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > end:
            raise AssertionError(failure())
        time.sleep(every)
    return got


def wait_for_nodes(lab: testhosts.Lab, config: str, timeout: float = 600) -> str:
    """``ray up`` returns once the head runs; the head's autoscaler then sets up the workers."""
    last = [""]

    def joined() -> str:
        r = lab.ray("exec", config, "ray status", cwd=REPO, timeout=120)
        last[0] = r.stdout
        return r.stdout if r.returncode == 0 and active_nodes(r.stdout) == len(lab.hosts) else ""
    return poll(joined, timeout, lambda: f"not every node joined within {timeout:.0f}s:\n{last[0]}", every=10)


HEALTH = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=5)"


def wait_for_mlflow(lab: testhosts.Lab, timeout: float = 300) -> None:
    """``ray up`` starts the head's MLflow server in the background; the sweep checks it once, at start."""
    poll(lambda: lab.in_host(lab.hosts[0], sys.executable, "-c", HEALTH, timeout=60).returncode == 0,
         timeout, lambda: f"the head's MLflow server did not answer within {timeout:.0f}s")


# `bash -i` reads ~/.bashrc, where the setup commands put the venv on PATH (the line in docs/cluster.md).
STOP_WORKER = "bash -ic 'ray stop'"


def stop_workers(lab: testhosts.Lab) -> None:
    """The step in docs/cluster.md after ``ray down``, which runs ``ray stop`` on the head only (the local provider's
    "terminate" just forgets a node): ``ray stop`` on each worker over SSH."""
    for w in lab.hosts[1:]:
        checked(testhosts.sh(*lab.ssh_args(), f"{testhosts.SSH_USER}@{w.ip}", STOP_WORKER, check=False),
                f"ray stop on {w.name}")


SUMMARY = f"""
import json
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri="http://127.0.0.1:5000")
ids = [e.experiment_id for e in c.search_experiments()]
out = []
for r in c.search_runs(ids, max_results=1000):
    steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "{METRIC}"))
    out.append({{"id": r.info.run_id, "status": r.info.status, "tags": r.data.tags, "steps": steps}})
print(json.dumps(out))
"""


def mlflow_runs(lab: testhosts.Lab) -> list[dict]:
    """Every run on the head's MLflow server, read on the head's loopback (where the server listens)."""
    r = lab.in_host(lab.hosts[0], sys.executable, "-c", SUMMARY)
    return json.loads(checked(r, "reading the head's MLflow server").strip().splitlines()[-1])


def check_runs(runs: list[dict]) -> dict[str, int]:
    """One parent run, SAMPLES children each with every epoch it ran, trials on more than one node."""
    parents = [r for r in runs if r["tags"].get("kind") == "sweep"]
    assert len(parents) == 1, [r["tags"].get("mlflow.runName") for r in runs]
    parent = parents[0]
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["id"]]
    assert len(children) == SAMPLES and len(runs) == SAMPLES + 1, [r["tags"] for r in runs]
    assert parent["status"] == "FINISHED", parent
    for c in children:
        ran = int(c["tags"]["epochs_run"])
        assert c["status"] == "FINISHED" and c["steps"] == list(range(1, ran + 1)), c
        assert c["tags"]["trial_outcome"] == ("completed" if ran == EPOCHS else "asha_stopped"), c["tags"]
    assert any(int(c["tags"]["epochs_run"]) == EPOCHS for c in children)
    nodes = {c["tags"]["node_id"] for c in children}
    assert len(nodes) > 1 and "" not in nodes, nodes
    return {"children": len(children), "nodes": len(nodes)}


def head_logs(lab: testhosts.Lab) -> str:
    """The tails of the logs that say why a cluster step failed (read from the hosts' own files)."""
    parts = []
    for h in lab.hosts:
        latest = h.root / "tmp/ray/session_latest"  # a link to /tmp/ray/session_... as the host sees it
        session = h.root / "tmp" / Path(os.readlink(latest)).relative_to("/tmp") if latest.is_symlink() else latest
        logs = sorted(session.glob("logs/monitor.*")) + [h.home / "mlflow-server.log", h.root / "sshd.log"]
        for f in logs:
            if f.is_file():
                parts.append(f"--- {h.name}: {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(parts)


class Steps:
    """Runs and times the steps of the path; on a failure, prints the hosts' logs first."""

    def __init__(self, lab: testhosts.Lab, log: Callable[[str], None]) -> None:
        self.lab, self.log, self.times = lab, log, {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        try:
            out = fn()
        except BaseException:
            self.log(f"{name} failed after {time.monotonic() - t:.0f}s\n{head_logs(self.lab)}")
            raise
        self.times[name] = round(time.monotonic() - t, 1)
        self.log(f"{name}: {self.times[name]}s")
        return out


def whole_path(lab: testhosts.Lab, log: Callable[[str], None] = print) -> dict[str, float]:
    """Runs the walk-through on ``lab``'s hosts; returns the seconds of each step."""
    step, head = Steps(lab, log), lab.hosts[0]
    config = str(fill_config(lab))
    step("ray up", lambda: checked(lab.ray("up", "-y", config, cwd=REPO, timeout=900), "ray up"))
    step("workers joined", lambda: wait_for_nodes(lab, config))
    step("MLflow up", lambda: wait_for_mlflow(lab))
    out = step("sweep", lambda: checked(lab.ray("exec", config, SWEEP, cwd=REPO, timeout=1200), "the sweep"))
    log("\n".join(line for line in out.splitlines() if line.startswith(("Sweep ", "Best trial"))))
    log(str(step("MLflow check", lambda: check_runs(mlflow_runs(lab)))))
    step("ray down", lambda: checked(lab.ray("down", "-y", config, cwd=REPO, timeout=300), "ray down"))
    assert not head.ray_processes(), head.ray_processes()  # `ray down` ran `ray stop` there
    step("ray stop on the workers", lambda: stop_workers(lab))
    left = {h.name: found for h in lab.hosts if (found := h.ray_processes())}
    assert not left, left
    # docs/cluster.md: `ray down` leaves the head's MLflow server running (the test's teardown ends it).
    assert head.processes("mlflow server"), "the MLflow server did not outlive ray down"
    return step.times


def main() -> int:
    why = testhosts.missing_requirements()
    if why:
        print(f"cannot run: {why}")
        return 2
    start = time.monotonic()
    lab = testhosts.Lab(keep=bool(os.environ.get("KD_E2E_KEEP")))  # keep the hosts' files to read
    with lab:
        times = whole_path(lab)
    left = testhosts.leftovers()
    assert not left, left
    print(f"steps: {times}; whole path with host setup and teardown: {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
