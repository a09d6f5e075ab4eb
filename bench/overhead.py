"""Per-trial overhead of a sweep: the same trainings run bare (a plain loop over the
engine, one after another) and as a sweep (Ray Tune + Optuna + ASHA + MLflow), measured
in one run on the same machine.

    python bench/overhead.py [--trials 4] [--epochs 3] [--train]

``--train`` also runs the sweep with every trial inside a one-worker Ray Train
``TorchTrainer``, which is what decides whether one-worker trials run in-process.
ASHA is given a grace period of every epoch so that both sides train the same epochs.

    python bench/overhead.py --default-sweep --before REV [--after REV] [--rounds 2]

times the default sweep command as a user types it (``python -m platform.sweep okdph``:
digits, a local Ray cluster, a sqlite MLflow store) at commit REV and at --after (this
tree by default), each checked out in a temporary git worktree, alternating, so that both
see the same machine load.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def bare(trials: int, epochs: int) -> float:
    from kd_platform.run.engine import RunSpec, train
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for i in range(trials):
        spec = RunSpec.from_flat("okdph", {"epochs": epochs, "omega": 0.3 + 0.1 * i}, 0)
        train(spec, lambda metrics, save: None)
    return time.perf_counter() - t0


def sweep(trials: int, epochs: int, work: Path, use_train: bool) -> float:
    from kd_platform.cli import sweep_settings
    from kd_platform.sweep.tuner import run_sweep
    space = work / "space.yaml"
    space.write_text(f"swept:\n  omega: {{type: uniform, low: 0.3, high: 1.0}}\nasha: {{grace_period: {epochs}}}\n")
    name = f"bench-{'train' if use_train else 'inproc'}"
    argv = ["okdph", "--space", str(space), "--samples", str(trials), "--epochs", str(epochs),
            "--max-concurrent", "1", "--tracking-uri", f"sqlite:///{work / 'mlruns.db'}",
            "--out", str(work / "res"), "--name", name, "--quiet"] + (["--use-train"] if use_train else [])
    t0 = time.perf_counter()
    outcome = run_sweep(sweep_settings(argv))
    wall = time.perf_counter() - t0
    assert outcome.trials == trials and outcome.failed == 0, outcome
    return wall


REPO = Path(__file__).resolve().parent.parent


def default_sweep(tree: Path, work: Path) -> tuple[float, float]:
    """The default sweep command run in ``tree``: (command wall s, the sweep's own reported s)."""
    cmd = [sys.executable, "-m", "platform.sweep", "okdph", "--out", str(work / "res"),
           "--tracking-uri", f"sqlite:///{work / 'm.db'}", "--quiet"]
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    found = re.search(r"^Sweep \S+: \d+ trials .* in (\d+)s$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise SystemExit(f"the sweep in {tree} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, float(found.group(1))


def compare_default_sweep(before: str, after: str | None, rounds: int) -> None:
    """``before`` and ``after`` (None: this working tree) each checked out in a temporary worktree."""
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": Path(tmp) / "before", "after": Path(tmp) / "after" if after else REPO}
        for label, rev in (("before", before), ("after", after)):
            if rev:
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(trees[label]), rev],
                               check=True, capture_output=True)
        try:
            runs: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for i in range(rounds):
                for label, tree in trees.items():
                    wall, own = default_sweep(tree, Path(tmp) / f"{label}{i}")
                    runs[label].append((wall, own))
                    print(f"round {i + 1} {label}: command {wall:.1f} s, sweep {own:.0f} s", flush=True)
        finally:
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                                   capture_output=True)
    print(f"\ndefault sweep (python -m platform.sweep okdph: 8 trials x 4 epochs on digits), {rounds} rounds "
          f"alternating, {os.cpu_count()} CPUs; before = {before}, after = {after or 'this tree'}")
    print(f"{'':8s} {'command wall s (median)':>24s} {'sweep s (median)':>17s}   every round")
    for label, got in runs.items():
        print(f"{label:8s} {statistics.median(w for w, _ in got):24.1f} {statistics.median(r for _, r in got):17.0f}"
              f"   {', '.join(f'{w:.0f}' for w, _ in got)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", action="store_true", help="also time one-worker TorchTrainer trials")
    p.add_argument("--default-sweep", action="store_true",
                   help="time the default sweep command at --before REV against this tree instead")
    p.add_argument("--before", metavar="REV", help="with --default-sweep: the commit to compare against")
    p.add_argument("--after", metavar="REV", help="with --default-sweep: the commit to compare (default this tree)")
    p.add_argument("--rounds", type=int, default=2, help="with --default-sweep: before/after pairs (default 2)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.default_sweep:
        if not args.before:
            p.error("--default-sweep needs --before REV")
        compare_default_sweep(args.before, args.after, args.rounds)
        return
    import ray
    t0 = time.perf_counter()
    # As the sweep command starts it: the dashboard only for TorchTrainer trials.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=args.train, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bare_s = bare(args.trials, args.epochs)
        inproc_s = sweep(args.trials, args.epochs, work, use_train=False)
        rows = [("bare engine loop", bare_s), ("sweep, in-process trials", inproc_s)]
        if args.train:
            rows.append(("sweep, 1-worker TorchTrainer trials", sweep(args.trials, args.epochs, work, use_train=True)))
    print(f"\n{args.trials} OKDPH trials x {args.epochs} epochs on digits, one at a time, 1 thread each "
          f"({os.cpu_count()} CPUs, torch {torch.__version__}, python {sys.version.split()[0]})")
    print(f"ray.init (once per sweep command{', with the dashboard' if args.train else ''}): {ray_start:.1f}s")
    print(f"{'':38s} {'wall s':>8s} {'vs bare':>8s} {'overhead/trial s':>17s}")
    for label, wall in rows:
        print(f"{label:38s} {wall:8.1f} {wall / bare_s:8.2f} {(wall - bare_s) / args.trials:17.1f}")


if __name__ == "__main__":
    main()
