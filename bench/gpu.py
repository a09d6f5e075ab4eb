"""One prepared benchmark of the platform's GPU training paths; every figure and ratio it
prints is measured in the same run, on the same machine. On a GPU machine:

    PYTHONPATH=. python3 bench/gpu.py --out "$OUT/gpu" 2>&1 | tee "$OUT/gpu.log"

``--out DIR`` writes ``DIR/results.json`` and ``DIR/bench.log`` after every section and on
SIGTERM, so a run that is cut short keeps what it finished; ``--sections 3,5`` reruns only
those. The default budget (360 s, compile's 140 s of it its own) fits one call of at most
7 minutes with Python's start and the data writing.

It needs only torch, torchvision, numpy and pyyaml (no Ray, MLflow or Optuna), writes its
CIFAR-100-shaped data in the real on-disk format to a temporary directory (no download),
and builds every run through the platform's own code (``RunSpec``, ``build_method``,
``build_data``, ``train``). The environment probe comes first (versions, device, /dev/shm,
a C compiler, ``Python.h``, triton, one bare ``decode_jpeg`` on the GPU). Sections, in
order, each skipped with a note once its time budget is spent:

1. data path: training images/s of the loader (default workers, and one process) against
   the device-resident path, ``standard`` augmentation, batch 128;
1b. the same for ImageNet-sized JPEGs (written, sides 300-500 px), augment ``rrc``: the
   loader decodes with PIL in its workers, the device path decodes batches with
   ``torchvision.io.decode_jpeg`` on the GPU and crops there;
2. OKDPH resnet32 with 2 and 4 students on synthetic device batches: step time and
   images/s, fused against sequential peers, bf16 against fp32, channels-last on and off;
3. one full epoch of the ``cifar100-resnet32`` OKDPH preset through ``engine.train`` on
   50,000 written training images, and the time 300 epochs imply;
4. 1 against 4 trainings at once on one GPU (separate processes): aggregate images/s;
5. ``compile=on`` against off, with a budget of its own: the first step (the compilation)
   and the steady step time apart.

Without CUDA it runs the same sections at CPU sizes (resnet8, fewer images, 1 against 2
processes; no compile section); ``--quick`` shrinks them further (a smoke test, well under
a minute). ``--sim-cuda`` runs the GPU grid at tiny sizes on the CPU with ``auto``
resolving as on CUDA (bf16 autocast, channels-last, ImageNet's device path), compile
included, and exits 1 if anything in it failed: CI's check of the GPU-only branches.
Fallbacks are counted and printed: files the GPU decoder handed to PIL, and what every
``auto`` resolved to. Images/s count training images: each one goes through every student
(and OKDPH's hybrid-weight model), so student-img/s = img/s x students.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
try:
    import kd_platform  # noqa: F401 - with PYTHONPATH=. as documented
except ImportError:  # run from elsewhere: the checkout this file lives in
    sys.path.append(str(REPO))

from gpu_probe import environment, environment_lines, first_line, simulate_cuda  # noqa: E402

from kd_platform.data import build_data  # noqa: E402
from kd_platform.data.imagenet_augment import DECODED  # noqa: E402
from kd_platform.methods.base import Batch, StepContext  # noqa: E402
from kd_platform.run.engine import RunSpec, build_method, data_recipe, resolve_fused, train  # noqa: E402
from kd_platform.run.engine import make_stepper as make_engine_stepper  # noqa: E402

METHOD = "okdph"
PRESET = "cifar100-resnet32"
NUM_CLASSES, IMAGE = 100, 32
IMAGENET_CROP = 224


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run, the CPU runs and the simulated GPU run."""
    name: str
    budget_s: float          # the whole run, section 5's share included
    data_train: int          # section 1: training images written
    data_seconds: float      # section 1: least time each data path is measured
    step_arch: str           # section 2, 4, 5
    step_batch: int
    students: tuple[int, ...]
    amps: tuple[str, ...]
    layouts: tuple[str, ...]  # channels_last values
    warmup_steps: int
    step_seconds: float      # section 2: least time each configuration is measured
    min_steps: int
    epoch_train: int         # section 3: training images written (before the validation split)
    epoch_test: int          # section 3: test images written (evaluated once, after the epoch)
    epoch_arch: str | None   # None: the preset's own
    epoch_batch: int | None
    epoch_fused: bool        # section 3: also an epoch with fused=true
    procs: int               # section 4: concurrent trainings against one
    proc_seconds: float
    compile_section: bool
    imagenet_train: int = 0  # section 1b: JPEGs written
    imagenet_batch: int = 256
    compile_s: float = 0     # section 5's own budget, kept back from the sections before it
    compile_batch: int = 0   # section 5's batch (default: step_batch)
    gpu_like: bool = False   # the data rows and the strictness of a GPU run


# A first CUDA compile of resnet32 x3 (students and hybrid), forward and backward: 60-150 s.
GPU = Sizes("gpu", 360, 10_000, 3.0, "resnet32", 128, (2, 4), ("off", "bf16"), ("false", "true"),
            5, 1.5, 20, 50_000, 10_000, None, None, True, 4, 10.0, True, 3_000, 256, 140, 0, True)
CPU = Sizes("cpu", 330, 3_000, 2.0, "resnet8", 128, (2, 4), ("off",), ("false",),
            2, 2.0, 5, 1_280, 500, None, None, False, 2, 5.0, False, 400, 64)
QUICK = Sizes("cpu-quick", 120, 1_000, 0.5, "resnet8", 32, (2,), ("off",), ("false",),
              1, 0.3, 3, 640, 200, "resnet8", 64, False, 2, 1.5, False, 48, 16)
# The GPU grid at tiny sizes: every branch once, no figure worth keeping. 640 training images,
# so that a tenth for validation still leaves full batches. The budget is only a cap (the run
# takes 1-3 minutes on 2 cores, most of it the first compile): on a busy machine a section
# skipped for time would fail the check.
SIM = Sizes("sim-cuda", 900, 640, 0.3, "resnet8", 16, (2,), ("off", "bf16"), ("false", "true"),
            1, 0.2, 2, 640, 64, "resnet8", 32, True, 2, 1.0, True, 24, 8, 450, 8, True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0 = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


# --------------------------------------------------------------------------- output


@dataclass
class Report:
    """Prints labelled lines and keeps the same figures; with ``--out`` (or ``--json``) it
    writes them after every section, so whatever ends the run, the finished sections stay."""
    data: dict[str, Any] = field(default_factory=lambda: {
        "status": "running", "sections_done": [], "sections": {}, "ratios": {}, "notes": [], "failures": [],
        "fallbacks": {"auto": {}, "decode_jpeg": {}}})
    json_paths: list[Path] = field(default_factory=list)
    log: TextIO | None = None
    auto: Counter[str] = field(default_factory=Counter)

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()

    def section(self, key: str, title: str) -> dict[str, Any]:
        self.line()
        self.line(f"[{key}] {title}")
        return self.data["sections"].setdefault(key, {"title": title})

    def ratio(self, key: str, label: str, value: float, meaning: str = "") -> None:
        self.data["ratios"][key] = value
        self.line(f"  ratio {label}: {value:.2f}" + (f"  ({meaning})" if meaning else ""))

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.line(f"  note: {text}")

    def failed(self, what: str, exc: BaseException) -> str:
        """A row or section that could not run: printed by the caller, kept as a failure."""
        self.data["failures"].append(f"{what}: {first_line(exc)}")
        return first_line(exc)

    def resolved(self, knobs: dict[str, Any], choices: dict[str, Any]) -> None:
        """Count what each knob left at ``auto`` resolved to."""
        for knob, value in choices.items():
            if str(knobs.get(knob, "auto")) == "auto":
                self.auto[f"{knob}=auto -> {value}"] += 1

    def save(self) -> None:
        self.data["fallbacks"] = {"auto": dict(sorted(self.auto.items())), "decode_jpeg": dict(DECODED)}
        text = json.dumps(self.data, indent=2, default=str)
        for path in self.json_paths:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)  # a reader, or a kill mid-write, never sees half a file




def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """``cifar-100-python/{train,test,meta}`` as the official archive extracts, random images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        y = rng.permutation(np.arange(n) % NUM_CLASSES)
        with open(folder / name, "wb") as fh:
            pickle.dump({"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": name,
                         "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(),
                         "data": rng.integers(0, 256, (n, 3 * IMAGE * IMAGE), dtype=np.uint8)}, fh, protocol=4)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"fine{c}" for c in range(NUM_CLASSES)],
                     "coarse_label_names": [f"coarse{c}" for c in range(20)]}, fh)


def data_rate(data: Any, device: torch.device, views: int, warmup: int, seconds: float, budget: Budget) -> float:
    """Training images/s the data module delivers, after ``warmup`` batches (worker start-up)."""
    n, seen, t0, epoch = 0, 0, 0.0, 0
    while True:
        for batch in data.train_batches(epoch, views):
            n += 1
            if n == warmup:
                _sync(device)
                t0 = time.perf_counter()
            elif n > warmup:
                seen += len(batch.y)
                if time.perf_counter() - t0 >= min(seconds, max(budget.left(), 0.1)):
                    _sync(device)
                    return seen / (time.perf_counter() - t0)
        epoch += 1


def measure_rows(out: Report, s: dict[str, Any], rows: list[tuple[str, dict[str, Any], int | None]],
                 knobs: dict[str, Any], how: Callable[[str, int, int], str], device: torch.device,
                 seconds: float, budget: Budget) -> dict[str, float]:
    """Training images/s of ``METHOD``'s data for each row ``(key, extra knobs, torch threads)``;
    ``how(key, loader workers, threads)`` labels a row."""
    from kd_platform.methods import get_method
    rates: dict[str, float] = {}
    threads = torch.get_num_threads()
    for key, extra, nthreads in rows:
        if budget.left() < 5:
            out.note(f"time budget spent: data path '{key}' skipped")
            continue
        try:
            spec = RunSpec.from_flat(METHOD, {**knobs, **extra}, 0)
            recipe = data_recipe(spec)
            views = get_method(METHOD).views_for(spec.resolved()[1])
            if nthreads:
                torch.set_num_threads(nthreads)
            data = build_data(recipe, 0, device)
            workers = getattr(data, "workers", 0)  # loader processes, or the ImageNet device path's file readers
            rate = data_rate(data, device, views, max(2, workers + 1), seconds, budget)
            del data
            gc.collect()
        except Exception as exc:  # noqa: BLE001 - a path that cannot run is a finding, not a crash
            out.line(f"  {key:<16} not available ({out.failed(f'data path {key}', exc)})")
            continue
        finally:
            torch.set_num_threads(threads)
        rates[key] = rate
        s[key] = {"img_s": rate, "how": how(key, workers, threads)}
        out.line(f"  {s[key]['how']:<58} {rate:>10.0f} img/s")
    return rates


def _loader_how(key: str, workers: int) -> str | None:
    return {"loader": f"loader, {workers} worker process{'es' if workers != 1 else ''} (loader_workers default)",
            "loader_1proc": "loader, no worker process, 1 thread (per CPU thread)"}.get(key)


# The loader with worker processes last: its workers outlive the measurement for a while.
DATA_ROWS = [("device", {"data_path": "device"}, None), ("device_1thread", {"data_path": "device"}, 1),
             ("loader_1proc", {"data_path": "loader", "loader_workers": 0}, 1),
             ("loader", {"data_path": "loader"}, None)]


def data_ratios(out: Report, prefix: str, rates: dict[str, float], device: torch.device) -> None:
    if "device" in rates and "loader" in rates:
        out.ratio(f"{prefix}.device_over_loader", "device / loader img/s", rates["device"] / rates["loader"])
    if "device" in rates and "loader_1proc" in rates and device.type == "cuda":
        out.ratio(f"{prefix}.device_over_loader_per_process", "device / loader img/s, one loader process",
                  rates["device"] / rates["loader_1proc"], "loader processes the device path replaces")
    if "device_1thread" in rates and "loader_1proc" in rates:
        out.ratio(f"{prefix}.device_over_loader_per_thread", "device / loader img/s per CPU thread",
                  rates["device_1thread"] / rates["loader_1proc"], "loader workers one device-path thread replaces")


def _rows_for(sz: Sizes) -> list[tuple[str, dict[str, Any], int | None]]:
    # On a GPU the device path's work is there: one host thread changes nothing.
    return [r for r in DATA_ROWS if not (sz.gpu_like and r[0] == "device_1thread")]


def section_data(out: Report, sz: Sizes, device: torch.device, root: Path, budget: Budget) -> None:
    s = out.section("1", f"data path: CIFAR-100 files ({sz.data_train} training images written), augment "
                         f"standard, batch 128, on {device.type}")

    def how(key: str, workers: int, threads: int) -> str:
        return _loader_how(key, workers) or {
            "device": f"device-resident, {threads} threads" if device.type == "cpu" else "device-resident (GPU)",
            "device_1thread": "device-resident, 1 thread"}[key]
    knobs = {"dataset": "cifar100", "data_dir": str(root), "augment": "standard", "batch_size": 128}
    rates = measure_rows(out, s, _rows_for(sz), knobs, how, device, sz.data_seconds, budget)
    data_ratios(out, "data", rates, device)


def write_imagenet(root: Path, n_train: int, n_val: int, classes: int = 10, seed: int = 0) -> None:
    """``imagenet/{train,val}/<wnid>/*.JPEG``: JPEGs of ImageNet's sizes (sides 300-500 px) of
    smooth noise, which compresses about as well as photographs do."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = root / "imagenet" / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(300, 501, 2))
            coarse = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((w, h), Image.BILINEAR).save(folder / f"{i}.JPEG", quality=90)


def section_imagenet(out: Report, sz: Sizes, device: torch.device, root: Path, budget: Budget) -> None:
    s = out.section("1b", f"ImageNet data path: {sz.imagenet_train} JPEGs of ImageNet's sizes, augment rrc "
                          f"(RandomResizedCrop {IMAGENET_CROP} + flip), batch {sz.imagenet_batch}, on {device.type}")

    def how(key: str, workers: int, threads: int) -> str:
        where = "the GPU" if device.type == "cuda" else f"the CPU, {threads if key == 'device' else 1} thread(s)"
        return _loader_how(key, workers) or f"device: decode_jpeg and crops on {where}"
    t = time.perf_counter()
    write_imagenet(root, sz.imagenet_train, 20)
    out.line(f"  wrote {sz.imagenet_train} JPEGs in {time.perf_counter() - t:.1f} s")
    knobs = {"dataset": "imagenet", "data_dir": str(root), "augment": "rrc", "batch_size": sz.imagenet_batch,
             "val_fraction": 0.0}
    # The smoke test skips the rows that start worker processes: seconds each on a busy machine.
    rows = [r for r in _rows_for(sz) if r[2] == 1 or sz is not QUICK]
    before = Counter(DECODED)
    rates = measure_rows(out, s, rows, knobs, how, device, sz.data_seconds, budget)
    data_ratios(out, "imagenet", rates, device)
    decoded = {k: v - before[k] for k, v in DECODED.items() if v - before[k]}
    s["decode_jpeg"] = decoded
    if "device" in rates:
        out.line(f"  device path: {decoded.get('device', 0)} files decoded by decode_jpeg on {device.type}, "
                 f"{decoded.get('pil_header', 0)} sent to PIL by the header check, "
                 f"{decoded.get('pil_after_error', 0)} to PIL after a decode_jpeg error")
        if decoded.get("pil_after_error"):
            out.note(f"decode_jpeg on {device.type} failed for {decoded['pil_after_error']} files: the device "
                     "row measured PIL decoding for them")


# --------------------------------------------------------------------------- training steps


class Shape:
    """What ``build_method`` reads of a data module: CIFAR-100's shapes."""
    num_classes, in_channels, image_size = NUM_CLASSES, 3, IMAGE


def make_stepper(cfg: dict[str, Any], device: torch.device) -> tuple[Callable[[int], None], int, dict[str, Any]]:
    """One training step of the engine (autocast, forward, backward, SGD, ``after_step``) on a
    fixed synthetic batch already on the device; returns ``(step(i), batch size, resolved)``."""
    knobs = {"dataset": "cifar100", "arch": cfg["arch"], "batch_size": cfg["batch"], "n_students": cfg["n"],
             "amp": cfg.get("amp", "auto"), "channels_last": cfg.get("channels_last", "auto"),
             "fused": cfg.get("fused", "auto"), "compile": cfg.get("compile", "off"), "epochs": 300}
    spec = RunSpec.from_flat(METHOD, knobs, 0)
    recipe, _ = spec.resolved()
    torch.manual_seed(0)
    method = build_method(spec, Shape(), device)
    stepper = make_engine_stepper(spec, method, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    views = [torch.randn(cfg["batch"], 3, IMAGE, IMAGE, generator=g).to(device) for _ in range(method.num_views())]
    y = torch.randint(0, NUM_CLASSES, (cfg["batch"],), generator=g).to(device)
    sums: dict[str, torch.Tensor] = {}
    steps_per_epoch = 50_000 // cfg["batch"]

    def step(i: int) -> None:
        ctx = StepContext(0, recipe.epochs, i % steps_per_epoch, steps_per_epoch, i)
        terms = stepper(Batch(views=list(views), y=y), ctx)
        for k, v in terms.items():  # the engine's running loss sums, per step
            sums[k] = sums.get(k, 0.0) + v.detach().float()

    amp_dtype, layout = stepper.amp_dtype, stepper.channels_last
    resolved = {"fused": resolve_fused(spec, device),
                "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                "channels_last": layout, "compile": recipe.compile}
    return step, cfg["batch"], resolved


def count_auto(out: Report, cfg: dict[str, Any], resolved: dict[str, Any]) -> None:
    """What ``make_stepper``'s knobs left at ``auto`` resolved to (``resolved`` as it returns it)."""
    amp = "bf16" if resolved["amp"] == "bfloat16" else resolved["amp"]
    layout = "channels-last" if resolved["channels_last"] else "NCHW"
    out.resolved({k: cfg.get(k, "auto") for k in ("amp", "channels_last", "fused")},
                 {"amp": amp, "channels_last": layout, "fused": "on" if resolved["fused"] else "off"})


def time_steps(step: Callable[[int], None], device: torch.device, warmup: int, min_steps: int,
               seconds: float, budget: Budget) -> tuple[float, int, float]:
    """``(seconds per step, timed steps, warm-up seconds)``: at least ``min_steps`` steps and
    ``seconds`` (the budget permitting), after ``warmup`` untimed steps."""
    t_warm = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    warm = t0 - t_warm
    n = 0
    while True:
        for _ in range(min_steps):
            step(warmup + n)
            n += 1
        _sync(device)
        took = time.perf_counter() - t0
        if took >= seconds or budget.left() < 2:
            return took / n, n, warm


def _label(n: int, fused: str, amp: str, layout: str) -> str:
    return (f"{n} students, {'fused' if fused == 'true' else 'sequential'}, "
            f"{'bf16' if amp == 'bf16' else 'fp32'}, {'channels-last' if layout == 'true' else 'NCHW'}")


def section_steps(out: Report, sz: Sizes, device: torch.device, budget: Budget) -> None:
    s = out.section("2", f"OKDPH {sz.step_arch} training steps, synthetic batches on {device.type}, "
                         f"batch {sz.step_batch} (warm-up excluded)")
    cuda = device.type == "cuda"
    out.line(f"  {'configuration':<50} {'step ms':>9} {'img/s':>9} {'student-img/s':>14}"
             + (f" {'peak MiB':>9}" if cuda else ""))
    times: dict[tuple, float] = {}
    rows = []
    for n in sz.students:
        for amp in sz.amps:
            for layout in sz.layouts:
                for fused in ("false", "true"):
                    key = (n, fused, amp, layout)
                    label = _label(*key)
                    if budget.left() < 10:
                        out.note(f"time budget spent: '{label}' skipped")
                        continue
                    try:
                        gc.collect()
                        if cuda:
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats(device)
                        step, bs, resolved = make_stepper({"arch": sz.step_arch, "batch": sz.step_batch, "n": n,
                                                          "amp": amp, "channels_last": layout, "fused": fused}, device)
                        sec, steps, _ = time_steps(step, device, sz.warmup_steps, sz.min_steps, sz.step_seconds,
                                                   budget)
                        del step
                    except Exception as exc:  # noqa: BLE001
                        what = "fused" if fused == "true" else label
                        err = out.failed(f"section 2 '{label}'", exc)
                        out.line(f"  {label:<50} {what}: not available ({err})")
                        rows.append({"config": label, "error": err})
                        continue
                    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
                    times[key] = sec
                    rows.append({"config": label, "students": n, "fused": fused == "true", "amp": amp,
                                 "channels_last": layout == "true", "step_ms": sec * 1e3, "img_s": bs / sec,
                                 "student_img_s": bs * n / sec, "steps": steps, "peak_mib": peak,
                                 "resolved": resolved})
                    out.line(f"  {label:<50} {sec * 1e3:>9.1f} {bs / sec:>9.0f} {bs * n / sec:>14.0f}"
                             + (f" {peak:>9.0f}" if cuda else ""))
    s["rows"] = rows
    def named(amp: str, layout: str) -> tuple[str, str]:
        return "bf16" if amp == "bf16" else "fp32", "channels-last" if layout == "true" else "NCHW"

    for (n, fused, amp, layout), sec in times.items():
        base = (n, "false", amp, layout)
        if fused == "true" and base in times:
            prec, form = named(amp, layout)
            out.ratio(f"steps.fused_over_sequential.n{n}.{prec}.{form}",
                      f"fused / sequential step time, {n} students, {prec}, {form}", sec / times[base],
                      "< 1: fused is faster")
    for (n, fused, amp, layout), sec in times.items():
        base = (n, fused, "off", layout)
        if amp == "bf16" and base in times:
            mode, form = "fused" if fused == "true" else "sequential", named(amp, layout)[1]
            out.ratio(f"steps.bf16_over_fp32.n{n}.{mode}.{form}",
                      f"bf16 / fp32 step time, {n} students, {mode}, {form}", sec / times[base], "< 1: bf16 is faster")
    for (n, fused, amp, layout), sec in times.items():
        base = (n, fused, amp, "false")
        if layout == "true" and base in times:
            mode, prec = "fused" if fused == "true" else "sequential", named(amp, layout)[0]
            out.ratio(f"steps.channels_last_over_nchw.n{n}.{mode}.{prec}",
                      f"channels-last / NCHW step time, {n} students, {mode}, {prec}", sec / times[base],
                      "< 1: channels-last is faster")
    for n in sz.students:
        mine = {k: v for k, v in times.items() if k[0] == n}
        if mine:
            best = min(mine, key=mine.get)
            s[f"fastest_n{n}"] = _label(*best)
            out.line(f"  fastest with {n} students: {_label(*best)} ({mine[best] * 1e3:.1f} ms/step)")


# --------------------------------------------------------------------------- one epoch


def _no_teacher(arch: str) -> Any:
    raise RuntimeError("an online method needs no teacher")


def _epoch_estimate(out: Report, sz: Sizes, knobs: dict[str, Any]) -> float:
    """Seconds one epoch of section 3 may take, from section 2's slowest 2-student step when it
    trained the same architecture and batch (generously: data build, evaluation, slower data)."""
    rows = out.data["sections"].get("2", {}).get("rows", [])
    steps = [r["step_ms"] / 1e3 for r in rows if r.get("students") == 2 and "step_ms" in r]
    if not steps or knobs["arch"] != sz.step_arch or int(knobs["batch_size"]) != sz.step_batch:
        return 30.0
    per_epoch = sz.epoch_train * (1 - float(knobs.get("val_fraction", 0.1))) / int(knobs["batch_size"])
    return 1.5 * per_epoch * max(steps) + 20


def section_epoch(out: Report, sz: Sizes, device: torch.device, root: Path, budget: Budget) -> None:
    from kd_platform.sweep.presets import preset_for_method
    knobs = {**preset_for_method(PRESET, METHOD), "epochs": 1, "data_dir": str(root)}
    if sz.epoch_arch:
        knobs["arch"] = sz.epoch_arch
    if sz.epoch_batch:
        knobs["batch_size"] = sz.epoch_batch
    s = out.section("3", f"one epoch of the {PRESET} preset, OKDPH {knobs['arch']} x2, through engine.train "
                         f"({sz.epoch_train} training images written, val_fraction {knobs.get('val_fraction', 0.1)})")
    variants = [("preset", {})]
    if sz.epoch_fused:
        variants.append(("preset+fused", {"fused": "true"}))
    need = _epoch_estimate(out, sz, knobs)
    for key, extra in variants:
        if budget.left() < need:
            out.note(f"time budget spent: epoch '{key}' skipped (needs about {need:.0f} s, {budget.left():.0f} s left)")
            continue
        try:
            spec = RunSpec.from_flat(METHOD, {**knobs, **extra}, 0)
            records: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            train(spec, lambda metrics, save, records=records: records.append(dict(metrics)), device=device,
                  teachers=lambda data: _no_teacher)
            wall = time.perf_counter() - t0
            val_s = float(records[-1]["time/val_s"])
            recipe = data_recipe(spec)
            data = build_data(recipe, 0, device)  # decodes nothing: for the split sizes and the path only
            val_n = len(data.splits["val"])
            fused = resolve_fused(spec, device)
            path = getattr(data, "path", "?")
            amp = recipe.autocast_dtype(device)
            layout = recipe.use_channels_last(device)
            del data
            m = records[-1]
            epoch_s, img_s = float(m["time/epoch_s"]), float(m["throughput/img_s"])
            need = 1.3 * (wall + val_s) + 10  # the next variant: about as long as this one
            n = int(spec.resolved()[1].n_students)
            # Scaled to full CIFAR-100 (a no-op for the GPU run, which writes all 50,000 images).
            val_frac = float(knobs.get("val_fraction", 0.1))
            seen = epoch_s * img_s
            full_train, full_val = 50_000 * (1 - val_frac), 50_000 * val_frac
            val_part = val_s * full_val / val_n if val_n else 0.0  # no validation split: none to scale
            implied = 300 * (full_train / img_s + val_part)
        except Exception as exc:  # noqa: BLE001
            label = "fused: not available" if extra else "not available"
            out.line(f"  {key}: {label} ({out.failed(f'section 3 {key}', exc)})")
            continue
        choices = {"fused": "on" if fused else "off", "data_path": path, "amp": "bf16" if amp is not None else "fp32",
                   "channels_last": "channels-last" if layout else "NCHW"}
        out.resolved({**knobs, **extra}, choices)
        how = (f"fused {choices['fused']}, data path {path}, {choices['amp']}, {choices['channels_last']}")
        s[key] = {"epoch_s": epoch_s, "img_s": img_s, "student_img_s": img_s * n, "val_pass_s": val_s,
                  "train_call_s": wall, "epoch_images": seen, "implied_300_epochs_h": implied / 3600, "resolved": how,
                  "val_acc_students_mean": m.get("val/acc/students_mean")}
        out.line(f"  {key} ({how})")
        out.line(f"    epoch (training loop):        {epoch_s:8.1f} s ({seen:.0f} images)")
        out.line(f"    training img/s:               {img_s:8.0f}   student-img/s {img_s * n:8.0f}")
        out.line(f"    validation pass:              {val_s:8.2f} s ({val_n:.0f} images)")
        out.line(f"    train() call, all included:   {wall:8.1f} s (data build, epoch, validation, test)")
        out.line(f"    implied 300 epochs:           {implied / 3600:8.2f} h (300 x (training + validation) on "
                 f"{full_train:.0f} + {full_val:.0f} images at these rates)")
    if "preset" in s and "preset+fused" in s:
        out.ratio("epoch.fused_over_preset", "fused / preset epoch time",
                  s["preset+fused"]["epoch_s"] / s["preset"]["epoch_s"],
                  "< 1: fused is faster end to end")


# --------------------------------------------------------------------------- separate processes


def worker(cfg: dict[str, Any]) -> None:
    """One training process of sections 4 and 5: build, warm up, say ready, wait for the go
    file, train for ``seconds``, print a JSON result line."""
    logging.getLogger("kd_platform").setLevel(logging.ERROR)
    if cfg.get("sim_cuda"):
        simulate_cuda()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    t0 = time.perf_counter()
    step, bs, resolved = make_stepper(cfg, device)
    built = time.perf_counter() - t0
    # The first step apart: with compile=on it is the compilation.
    step(0)
    _sync(device)
    first = time.perf_counter() - t0 - built
    for i in range(1, cfg["warmup"]):
        step(i)
    _sync(device)
    warm = time.perf_counter() - t0
    print("READY", flush=True)
    go = Path(cfg["go"])
    while not go.exists():
        time.sleep(0.005)
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < cfg["seconds"]:
        step(cfg["warmup"] + n)
        n += 1
    _sync(device)
    took = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    print("RESULT " + json.dumps({"images": n * bs, "steps": n, "seconds": took, "img_s": n * bs / took,
                                  "build_s": built, "first_step_s": first, "warmup_s": warm, "peak_mib": peak,
                                  "resolved": resolved}), flush=True)


def run_workers(cfg: dict[str, Any], count: int, budget: Budget, tmp: Path,
                ready_within: float = 180.0) -> list[dict[str, Any]]:
    """``count`` worker processes training ``cfg`` at the same time (one shared start signal).
    Every wait is bounded by the budget: a process that hangs is killed, never waited for."""
    import queue
    import threading
    go = tmp / f"go-{time.monotonic_ns()}"
    cfg = {**cfg, "go": str(go)}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    lines: "queue.Queue[tuple[int, str]]" = queue.Queue()
    procs, errs = [], []
    for i in range(count):
        err = open(tmp / f"worker-{go.name}-{i}.err", "w+")  # a file: a full stderr pipe would stall it
        errs.append(err)
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(cfg)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        procs.append(proc)
        threading.Thread(target=lambda i=i, proc=proc: [lines.put((i, ln.strip())) for ln in proc.stdout]
                         + [lines.put((i, ""))], daemon=True).start()

    def wait_for(word: str, seconds: float) -> dict[int, str]:
        got, deadline = {}, time.perf_counter() + seconds
        while len(got) < count:
            try:
                i, ln = lines.get(timeout=max(0.01, deadline - time.perf_counter()))
            except queue.Empty:
                raise TimeoutError(f"{count - len(got)} of {count} processes not {word.lower()} "
                                   f"within {seconds:.0f} s") from None
            if ln.startswith(word):
                got[i] = ln[len(word):].strip()
            elif ln == "" and procs[i].poll() is not None and i not in got:
                procs[i].wait()
                errs[i].seek(0)
                tail = [x for x in errs[i].read().splitlines() if x.strip()]
                # The exception's own line, not a hint printed after it (dynamo's "Set TORCHDYNAMO_VERBOSE=1").
                named = [x for x in tail if re.match(r"[\w.]*(Error|Exception|Interrupt)\b.*:", x)]
                raise RuntimeError((named or tail or [f"worker exited with {procs[i].returncode}"])[-1])
        return got

    try:
        wait_for("READY", min(ready_within, budget.left() - cfg["seconds"] - 10))
        go.touch()
        done = wait_for("RESULT", min(cfg["seconds"] + 60, max(budget.left(), cfg["seconds"] + 5)))
        return [json.loads(done[i]) for i in range(count)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for err in errs:
            err.close()


def _procs(count: int) -> str:
    return f"{count} process{'es' if count != 1 else ''}"


def section_concurrency(out: Report, sz: Sizes, device: torch.device, budget: Budget, tmp: Path) -> None:
    k = sz.procs
    s = out.section("4", f"1 against {k} trainings at once on one {'GPU' if device.type == 'cuda' else 'CPU'} "
                         f"(separate processes): OKDPH {sz.step_arch} x2, batch {sz.step_batch}, "
                         f"{sz.proc_seconds:.0f} s each")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    base = {"arch": sz.step_arch, "batch": sz.step_batch, "n": 2, "device": str(device), "warmup": sz.warmup_steps,
            "seconds": sz.proc_seconds, "sim_cuda": sz.name == SIM.name}
    agg: dict[int, float] = {}
    for count in (1, k):
        if budget.left() < sz.proc_seconds + 30:
            out.note(f"time budget spent: {_procs(count)} skipped")
            continue
        threads = max(1, cpus // count)  # as a trial's threads follow its CPUs (trial.py)
        try:
            results = run_workers({**base, "threads": threads}, count, budget, tmp)
        except Exception as exc:  # noqa: BLE001
            out.line(f"  {_procs(count)}: not available ({out.failed(f'section 4, {_procs(count)}', exc)})")
            continue
        for r in results:
            count_auto(out, base, r["resolved"])
        agg[count] = sum(r["img_s"] for r in results)
        peak = max((r["peak_mib"] or 0) for r in results)
        s[f"procs_{count}"] = {"aggregate_img_s": agg[count], "per_process_img_s": [r["img_s"] for r in results],
                               "threads_each": threads, "peak_mib_each": peak, "resolved": results[0]["resolved"]}
        each = ", ".join(f"{r['img_s']:.0f}" for r in results)
        how = f" ({threads} thread{'s' if threads > 1 else ''} each)" if threads else ""
        out.line(f"  {_procs(count) + how:<28} aggregate {agg[count]:8.0f} img/s (each: {each})"
                 + (f", peak {peak:.0f} MiB each" if peak else ""))
    if 1 in agg and k in agg:
        out.ratio(f"procs.{k}_over_1", f"aggregate img/s, {k} processes / 1", agg[k] / agg[1],
                  f"> 1: packing {k} trials per device gains throughput")


def section_compile(out: Report, sz: Sizes, device: torch.device, budget: Budget, tmp: Path) -> None:
    batch = sz.compile_batch or sz.step_batch
    s = out.section("5", f"compile=on against off: OKDPH {sz.step_arch} x2, batch {batch}, auto choices "
                         f"(one process each; own budget {budget.seconds:.0f} s)")
    rates: dict[str, dict[str, Any]] = {}
    # "on" first: its figure is the one this section exists for, and the slow one.
    for mode in ("on", "off"):
        if budget.left() < (30 if mode == "on" else 20) + sz.proc_seconds:
            out.note(f"time budget spent: compile={mode} skipped")
            continue
        cfg = {"arch": sz.step_arch, "batch": batch, "n": 2, "device": str(device), "compile": mode,
               "warmup": sz.warmup_steps + (3 if mode == "on" else 0), "seconds": sz.proc_seconds,
               "sim_cuda": sz.name == SIM.name}
        t = time.perf_counter()
        try:
            (r,) = run_workers(cfg, 1, budget, tmp, ready_within=budget.left())
        except Exception as exc:  # noqa: BLE001
            err = out.failed(f"section 5 compile={mode}", exc)
            out.line(f"  compile={mode}: not available after {time.perf_counter() - t:.0f} s ({err})")
            continue
        count_auto(out, cfg, r["resolved"])
        rates[mode] = r
        s[f"compile_{mode}"] = r
        out.line(f"  compile={mode:<3}  step {r['seconds'] / r['steps'] * 1e3:7.1f} ms  {r['img_s']:8.0f} img/s  "
                 f"(build {r['build_s']:.1f} s, first step {r['first_step_s']:.1f} s, "
                 f"all warm-up {r['warmup_s']:.1f} s)")
    if len(rates) == 2:
        on, off = (rates[m]["seconds"] / rates[m]["steps"] for m in ("on", "off"))
        out.ratio("compile.on_over_off", "compile on / off step time", on / off, "< 1: compile is faster")


# --------------------------------------------------------------------------- main


SECTIONS = ("1", "1b", "2", "3", "4", "5")


def _usage_error(args: argparse.Namespace) -> str | None:
    """The one-line complaint about the command line, checked before anything is written."""
    if args.sections is not None:
        keys = [k.strip() for k in args.sections.split(",") if k.strip()]
        bad = next((k for k in keys if k not in SECTIONS), None)
        if bad is not None or not keys:
            return f"--sections: unknown section '{bad or args.sections}' (sections: {', '.join(SECTIONS)})"
    if args.budget is not None and not args.budget > 0:
        return f"--budget: must be a positive number of seconds, not {args.budget:g}"
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        return f"--out: '{args.out}' exists and is not a directory"
    if args.json is not None and args.json.is_dir():
        return f"--json: '{args.json}' is a directory"
    if sum(map(bool, (args.quick, args.cpu, args.sim_cuda))) > 1:
        return "--quick, --cpu and --sim-cuda: choose one"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write results.json and bench.log here, after every section")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file (after every section)")
    p.add_argument("--sections", help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--budget", type=float,
                   help="seconds for the whole run, section 5's own share included (default 360 on a GPU)")
    p.add_argument("--quick", action="store_true", help="smallest CPU sizes (a smoke test); implies --cpu")
    p.add_argument("--cpu", action="store_true", help="CPU sizes on the CPU even where CUDA is available")
    p.add_argument("--sim-cuda", action="store_true",
                   help="the GPU grid at tiny sizes on the CPU, auto resolving as on CUDA; exit 1 on any failure")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(json.loads(args._worker))
        return 0
    error = _usage_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.getLogger("kd_platform").setLevel(logging.ERROR)  # e.g. "checksums differ": the files are ours
    if args.sim_cuda:
        simulate_cuda()
    cuda = torch.cuda.is_available() and not (args.quick or args.cpu or args.sim_cuda)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    sz = SIM if args.sim_cuda else QUICK if args.quick else GPU if cuda else CPU
    wanted = [k.strip() for k in args.sections.split(",")] if args.sections else list(SECTIONS)
    out = Report()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        out.json_paths.append(args.out / "results.json")
        out.log = open(args.out / "bench.log", "w")
    if args.json is not None:
        out.json_paths.append(args.json)
    current = ["setup"]

    def on_sigterm(signum: int, frame: Any) -> None:
        out.data["status"] = "terminated"
        out.note(f"terminated by signal {signum} during {current[0]}")
        out.save()
        raise SystemExit(128 + signum)  # unwinds: worker processes killed, temporary files removed

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run(out, sz, device, wanted, args.budget or sz.budget_s, current)
        out.data["status"] = "done"
    finally:
        if out.data["status"] == "running":
            out.data["status"] = f"interrupted during {current[0]}"
        out.save()
        if out.log is not None:
            out.log.close()
    for path in out.json_paths:
        print(f"wrote {path}")
    strict = sz.gpu_like and device.type == "cpu"  # --sim-cuda: CI's check that every branch runs
    skipped = [n for n in out.data["notes"] if n.startswith("time budget spent")]
    if strict and (out.data["failures"] or skipped):
        for what in out.data["failures"] + skipped:
            print(f"FAILED: {what}", file=sys.stderr)
        return 1
    return 0


def run(out: Report, sz: Sizes, device: torch.device, wanted: list[str], total: float, current: list[str]) -> None:
    """The probe and the ``wanted`` sections; ``current[0]`` says where it is, for a signal."""
    overall = Budget(total)
    compiling = "5" in wanted and sz.compile_section
    # Section 5 keeps its share back from the sections before it, which then share the rest.
    others = [k for k in wanted if k != "5"]
    budget = Budget(total - (min(sz.compile_s, total / 2) if compiling and others else 0))
    out.data["mode"] = sz.name
    out.data["sections_wanted"] = wanted
    out.line(f"kd-platform benchmark ({sz.name} sizes), time budget {total:.0f} s"
             + (f" (section 5: {total - budget.seconds:.0f} s of it)" if compiling and others else ""))
    try:
        env = environment(device)
        out.data["env"] = env
        for text in environment_lines(env, sim=sz.name == SIM.name):
            out.line(text)
    except Exception as exc:  # noqa: BLE001 - a broken probe must not cost the measurements
        out.note(f"environment probe failed: {out.failed('environment probe', exc)}")
    out.save()
    with tempfile.TemporaryDirectory(prefix="kdbench") as tmp_name:
        tmp = Path(tmp_name)
        sections: dict[str, Callable[[], None]] = {
            "1": lambda: section_data(out, sz, device, tmp / "small", budget),
            "1b": lambda: section_imagenet(out, sz, device, tmp / "imagenet", budget),
            "2": lambda: section_steps(out, sz, device, budget),
            "3": lambda: section_epoch(out, sz, device, tmp / "full", budget),
            "4": lambda: section_concurrency(out, sz, device, budget, tmp),
            "5": lambda: section_compile(out, sz, device, Budget(overall.left()), tmp),
        }
        if not sz.compile_section and "5" in wanted:
            out.data["notes"].append("section 5 (compile) runs on a GPU and with --sim-cuda only")
        if "1" in wanted or "3" in wanted:
            current[0] = "writing data"
            t = time.perf_counter()
            try:
                write_cifar100(tmp / "small", sz.data_train, 200)
                write_cifar100(tmp / "full", sz.epoch_train, sz.epoch_test)
                out.line(f"wrote CIFAR-100 files ({sz.data_train} and {sz.epoch_train} training images) "
                         f"in {time.perf_counter() - t:.1f} s")
            except Exception as exc:  # noqa: BLE001
                out.note(f"writing the CIFAR-100 files failed: {out.failed('data files', exc)}")
        for key in SECTIONS:
            if key not in wanted or (key == "5" and not sz.compile_section):
                continue
            current[0] = f"section {key}"
            if (budget if key != "5" else overall).left() <= 10:
                out.line()
                out.note(f"time budget spent: section {key} skipped")
                continue
            t = time.perf_counter()
            try:
                sections[key]()
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                out.note(f"section {key} failed: {out.failed(f'section {key}', exc)}")
            out.data["sections"].setdefault(key, {})["seconds"] = time.perf_counter() - t
            out.data["sections_done"].append(key)
            out.data["wall_s"] = overall.elapsed()
            out.save()
        current[0] = "the summary"
        summary(out)
    out.data["wall_s"] = overall.elapsed()
    out.line()
    out.line(f"done in {overall.elapsed():.0f} s")


def summary(out: Report) -> None:
    """The fallbacks, counted over the whole run."""
    out.line()
    out.line("fallbacks and auto choices")
    auto = ", ".join(f"{k} x{v}" for k, v in sorted(out.auto.items())) or "none left at auto"
    out.line(f"  auto: {auto}")
    d = DECODED
    out.line(f"  decode_jpeg: {d['device']} files on the device, {d['pil_header']} to PIL by the header check, "
             f"{d['pil_after_error']} to PIL after a decode_jpeg error")
    if out.data["failures"]:
        out.line(f"  {len(out.data['failures'])} failed: " + "; ".join(out.data["failures"]))


if __name__ == "__main__":
    sys.exit(main())
