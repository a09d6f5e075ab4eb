"""Is the data loader the bottleneck? Images/s of the loader alone (decode, augment,
collate, transfer) against images/s of full training steps, measured in one run.

    python bench/data_pipeline.py [--method okdph] [--arch resnet32] [--batches 20]

It writes a small CIFAR-10 in the real on-disk format to a temporary directory (no
download), so it runs anywhere; on a GPU machine pass ``--device cuda``. A loader/step
ratio near or below 1 means training waits for data: raise ``loader_workers`` or use
lighter augmentation.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_cifar10(root: Path, n_train: int = 5000, n_test: int = 500) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name: str, n: int) -> None:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": (np.arange(n) % 10).tolist()}, fh)
    for b in range(1, 6):
        dump(f"data_batch_{b}", n_train // 5)
    dump("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="okdph")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--augment", default="standard")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--loader-workers", type=int, default=-1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from kd_platform.data import build_data
    from kd_platform.engine import RunSpec, build_method
    from kd_platform.methods.base import StepContext
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(Path(tmp))
        spec = RunSpec.from_flat(args.method, {
            "dataset": "cifar10", "data_dir": tmp, "arch": args.arch, "augment": args.augment,
            "batch_size": args.batch_size, "loader_workers": args.loader_workers}, 0)
        recipe, _ = spec.resolved()
        data = build_data(recipe, 0, device)
        method = build_method(spec, data, device)
        views = method.num_views()

        def timed(step: bool) -> float:
            n, seen, t0 = 0, 0, 0.0
            opt = torch.optim.SGD(method.trainable_parameters(), lr=0.01)
            epoch = 0
            while n < args.batches + 2:
                for batch in data.train_batches(epoch, views):
                    if step:
                        terms = method(batch, StepContext(0, 1, n, 1, n))
                        opt.zero_grad()
                        terms["loss"].backward()
                        opt.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    n += 1
                    if n == 2:  # the first batches pay for worker start-up
                        t0 = time.perf_counter()
                    elif n > 2:
                        seen += len(batch.y)
                    if n >= args.batches + 2:
                        break
                epoch += 1
            return seen / (time.perf_counter() - t0)

        loader = timed(step=False)
        train = timed(step=True)
    print(f"\n{args.method} {args.arch} batch {args.batch_size}, augment {args.augment}, {views} view(s), "
          f"device {device}, {os.cpu_count()} CPUs, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"loader alone:    {loader:9.0f} img/s")
    print(f"training steps:  {train:9.0f} img/s (loader included)")
    print(f"loader / steps:  {loader / train:9.2f}  (<= 1: the loader is the bottleneck)")


if __name__ == "__main__":
    main()
