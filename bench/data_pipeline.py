"""How fast do the data paths deliver training batches? Two measurements, on data it writes
in the real on-disk format to a temporary directory (no download, so it runs anywhere):

    python bench/data_pipeline.py [--measure paths] [--device cuda]
    python bench/data_pipeline.py --dataset imagenet [--device cuda]
    python bench/data_pipeline.py --measure steps [--method okdph] [--arch resnet32] [--data-path loader]

``paths`` (the default): images/s of the loader path with no worker processes against the
device path, both with one torch thread, i.e. per CPU thread the loader would use; the
ratio is how many loader workers the device path replaces. On CPU the device path's
batches are built on that one thread too; with ``--device cuda`` they are built on the GPU.
``--dataset imagenet`` writes JPEGs of ImageNet's sizes (sides 300-500 px) in its folder
layout: the loader path decodes them with PIL and crops per image, the device path decodes
each batch with ``torchvision.io.decode_jpeg`` on the device and crops there.

``steps``: is the data the bottleneck? Images/s of the data path alone (decode, augment,
collate, transfer) against images/s of full training steps. A data/steps ratio near or
below 1 means training waits for data: raise ``loader_workers``, use the device path or
lighter augmentation.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from dataset_files import write_cifar10, write_cifar100, write_imagenet  # noqa: E402 - the tests' writers

IMAGENET_CLASSES, IMAGENET_SIDES, IMAGENET_PER_CLASS = 10, (300, 500), 40


def write_imagenet_sized(root: Path, per_class_train: int, per_class_test: int) -> None:
    write_imagenet(root, per_class_train, per_class_test, classes=IMAGENET_CLASSES, sides=IMAGENET_SIDES)


WRITERS = {"cifar10": (write_cifar10, 10), "cifar100": (write_cifar100, 100),
           "imagenet": (write_imagenet_sized, IMAGENET_CLASSES)}
WARMUP_BATCHES = 2  # the first batches pay for worker start-up and first-use decoding


def images_per_second(data: Any, device: torch.device, views: int, min_batches: int, min_seconds: float,
                      step: Callable[[Any, int], None] | None = None) -> float:
    """Training images/s over at least ``min_batches`` batches and ``min_seconds``, after warm-up;
    ``step(batch, n)`` (a training step) runs on every batch when given."""
    n, seen, t0, epoch = 0, 0, 0.0, 0
    while True:
        for batch in data.train_batches(epoch, views):
            if step is not None:
                step(batch, n)
            n += 1
            if n == WARMUP_BATCHES:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            elif n > WARMUP_BATCHES:
                seen += len(batch.y)
                if n - WARMUP_BATCHES >= min_batches and time.perf_counter() - t0 >= min_seconds:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return seen / (time.perf_counter() - t0)
        epoch += 1


def write_data(dataset: str, root: Path, train_per_class: int, test_per_class: int) -> None:
    writer, _ = WRITERS[dataset]
    writer(root, per_class_train=train_per_class, per_class_test=test_per_class)


def measure_paths(args: argparse.Namespace, root: Path, device: torch.device) -> None:
    from kd_platform.config.knobs import build_config
    from kd_platform.config.recipe import Recipe
    from kd_platform.data import build_data
    torch.set_num_threads(1)
    rates = {}
    for path in ("loader", "device"):
        recipe = build_config(Recipe, {"dataset": args.dataset, "data_dir": str(root), "augment": args.augment,
                                       "batch_size": args.batch_size, "loader_workers": 0, "data_path": path})
        data = build_data(recipe, 0, device)
        rates[path] = images_per_second(data, device, args.views, args.batches, args.seconds)
    print(f"\n{args.dataset}-shaped files, {args.train_per_class * WRITERS[args.dataset][1]} training images, "
          f"augment {args.augment}, batch {args.batch_size}, {args.views} view(s), device {device}, "
          f"1 torch thread, {os.cpu_count()} CPUs, torch {torch.__version__}, python {sys.version.split()[0]}")
    print(f"loader path, 0 workers:  {rates['loader']:10.0f} img/s")
    print(f"device path:             {rates['device']:10.0f} img/s")
    print(f"device / loader:         {rates['device'] / rates['loader']:10.1f}x  (per CPU thread)")


def measure_steps(args: argparse.Namespace, root: Path, device: torch.device) -> None:
    from kd_platform.data import build_data
    from kd_platform.methods.base import StepContext
    from kd_platform.run.engine import RunSpec, build_method
    spec = RunSpec.from_flat(args.method, {
        "dataset": args.dataset, "data_dir": str(root), "arch": args.arch, "augment": args.augment,
        "batch_size": args.batch_size, "loader_workers": args.loader_workers, "data_path": args.data_path}, 0)
    recipe, _ = spec.resolved()
    data = build_data(recipe, 0, device)
    method = build_method(spec, data, device)
    views = method.num_views()
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.01)

    def step(batch: Any, n: int) -> None:
        terms = method(batch, StepContext(0, 1, n, 1, n))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()

    alone = images_per_second(data, device, views, args.batches, 0.0)
    train = images_per_second(data, device, views, args.batches, 0.0, step)
    print(f"\n{args.method} {args.arch} batch {args.batch_size}, augment {args.augment}, {views} view(s), "
          f"{data.path} data path, device {device}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"data alone:      {alone:9.0f} img/s")
    print(f"training steps:  {train:9.0f} img/s (data included)")
    print(f"data / steps:    {alone / train:9.2f}  (<= 1: the data is the bottleneck)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", choices=("paths", "steps"), default="paths")
    p.add_argument("--dataset", choices=tuple(WRITERS), default="cifar100")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="training images per class (default: the real set's 500 for cifar100, 5000 for "
                        "cifar10, 40 (of 10 classes) for imagenet with --measure paths; a tenth of that with "
                        "--measure steps)")
    p.add_argument("--augment", default=None, help="default: rrc for imagenet, standard otherwise")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--views", type=int, default=1, help="views per batch (--measure paths)")
    p.add_argument("--batches", type=int, default=20, help="timed batches, at least")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per path, at least (--measure paths)")
    p.add_argument("--method", default="okdph")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--loader-workers", type=int, default=-1)
    p.add_argument("--data-path", choices=("auto", "device", "loader"), default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    classes = WRITERS[args.dataset][1]
    args.augment = args.augment or ("rrc" if args.dataset == "imagenet" else "standard")
    if args.train_per_class is None:
        full = 50_000 // classes if args.dataset != "imagenet" else IMAGENET_PER_CLASS
        args.train_per_class = full if args.measure == "paths" else full // 10
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_data(args.dataset, Path(tmp), args.train_per_class, max(1, args.train_per_class // 5))
        (measure_paths if args.measure == "paths" else measure_steps)(args, Path(tmp), device)


if __name__ == "__main__":
    main()
