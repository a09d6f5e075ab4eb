"""``python -m platform.check_cluster --smoke``: a preflight of a running Ray cluster.

Right after ``ray up``, it trains a few steps of OKDPH (resnet8 x2, synthetic CIFAR-shaped
batches) on every alive node at once, one Ray task pinned to each node, with one GPU where
the node has GPUs, unfused and fused, each with the node's own ``auto`` choices (bf16
autocast and channels-last on a GPU that has them). One row per node says what it found;
the exit code is 1 if any node failed, so a driver, CUDA, bf16 or nvJPEG problem shows up
here rather than in the first trial of a sweep.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

from kd_platform.errors import UsageError, error_line

METHOD, ARCH, CLASSES, IMAGE = "okdph", "resnet8", 100, 32
COLUMNS = ("node", "device", "torch", "CUDA", "cuDNN", "bf16", "nvJPEG", "img/s unfused/fused", "result")


class _Shape:
    """What ``build_method`` reads of a data module: CIFAR-100's shapes."""
    num_classes, in_channels, image_size = CLASSES, 3, IMAGE


def _img_s(device: Any, fused: str, batch: int, steps: int) -> float:
    """Training images/s of a few OKDPH steps through the engine's stepper; raises on a
    non-finite loss."""
    import torch

    from kd_platform.methods.base import Batch, StepContext
    from kd_platform.run.engine import RunSpec, build_method, make_stepper
    knobs = {"dataset": "cifar100", "arch": ARCH, "batch_size": batch, "n_students": 2, "fused": fused, "epochs": 1}
    spec = RunSpec.from_flat(METHOD, knobs, 0)
    torch.manual_seed(0)
    method = build_method(spec, _Shape(), device)
    stepper = make_stepper(spec, method, device)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(device) for _ in range(method.num_views())]
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    t0 = 0.0
    for i in range(steps + 1):  # the first step is warm-up (cuDNN's algorithm search, allocations)
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        loss = stepper(Batch(views=list(views), y=y), StepContext(0, 1, i, steps + 1, i))["loss"]
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} ({'fused' if fused == 'true' else 'unfused'})")
    return batch * steps / (time.perf_counter() - t0)


def _nvjpeg(device: Any) -> bool:
    import torch
    from torchvision.io import decode_jpeg, encode_jpeg
    jpeg = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))
    try:
        return tuple(decode_jpeg(jpeg, device=device).shape) == (3, 16, 16)
    except RuntimeError:
        return False


def node_check(want_gpu: bool) -> dict[str, Any]:
    """Runs on one node, as one Ray task (with one GPU when ``want_gpu``): the node's versions
    and capabilities, and OKDPH's training speed unfused and fused. Never raises: a failure is
    the ``error`` entry, its first line."""
    row: dict[str, Any] = {"device": "?", "torch": "?", "cuda": "-", "cudnn": "-", "bf16": "-", "nvjpeg": "-"}
    try:
        import torch
        row["torch"] = torch.__version__
        if want_gpu and not torch.cuda.is_available():
            raise RuntimeError(f"Ray offers a GPU here but torch {torch.__version__} finds no CUDA device "
                               f"(built for CUDA {torch.version.cuda or 'none'})")
        device = torch.device("cuda", 0) if want_gpu else torch.device("cpu")  # Ray sets CUDA_VISIBLE_DEVICES
        if device.type == "cuda":
            row.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                       cudnn=str(torch.backends.cudnn.version()),
                       bf16="yes" if torch.cuda.is_bf16_supported() else "no",
                       nvjpeg="yes" if _nvjpeg(device) else "no")
        else:
            row["device"] = "CPU"
        batch, steps = (128, 10) if device.type == "cuda" else (16, 2)
        row["img_s"] = [_img_s(device, fused, batch, steps) for fused in ("false", "true")]
        row["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the row says what failed; the other nodes still report
        row["ok"], row["error"] = False, error_line(exc)
    return row


def _label(node: dict[str, Any]) -> str:
    head = " head" if any(k.startswith("node:__internal_head__") for k in node.get("Resources", {})) else ""
    return f"{node.get('NodeManagerAddress', '?')} {node['NodeID'][:8]}{head}"


def run_smoke(address: str, timeout: float) -> list[dict[str, Any]]:
    """One row per alive node of the cluster at ``address``, each from a task pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--address: no Ray cluster at '{address}' ({error_line(exc)})") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        check = ray.remote(node_check)
        pending = {}
        for node in nodes:
            res = node.get("Resources", {})
            gpu = res.get("GPU", 0) >= 1
            # A node without a whole CPU (a head started with --num-cpus=0) still runs it.
            opts = {"num_cpus": 1 if res.get("CPU", 0) >= 1 else 0, "num_gpus": 1 if gpu else 0, "max_retries": 0,
                    "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)}
            pending[check.options(**opts).remote(gpu)] = node
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        rows = []
        for ref, node in pending.items():
            if ref in done:
                try:
                    row = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the task or its node died
                    row = {"ok": False, "error": error_line(getattr(exc, "cause", None) or exc)}
            else:
                ray.cancel(ref, force=True)
                row = {"ok": False, "error": f"no result within {timeout:.0f} s (node busy, or its task cannot start)"}
            rows.append({"node": _label(node), **row})
        return rows
    finally:
        ray.shutdown()


def format_rows(rows: Sequence[dict[str, Any]]) -> list[str]:
    table = [list(COLUMNS)]
    for r in rows:
        speed = " / ".join(f"{v:.0f}" for v in r["img_s"]) if r.get("img_s") else "-"
        table.append([r["node"], str(r.get("device", "?")), str(r.get("torch", "?")), str(r.get("cuda", "-")),
                      str(r.get("cudnn", "-")), str(r.get("bf16", "-")), str(r.get("nvjpeg", "-")), speed,
                      "pass" if r.get("ok") else f"FAIL: {r.get('error', '?')}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table]
    failed = sum(not r.get("ok") for r in rows)
    lines.append(f"{len(rows)} node{'s' if len(rows) != 1 else ''}: "
                 + (f"{failed} failed" if failed else "all passed"))
    return lines


def parse_smoke_args(args: Sequence[str]) -> tuple[str, float]:
    """``--address ADDRESS`` (default ``auto``) and ``--timeout SECONDS`` (default 600)."""
    address, timeout = "auto", 600.0
    rest = list(args)
    while rest:
        flag = rest.pop(0)
        if flag not in ("--address", "--timeout"):
            raise UsageError(f"unknown argument '{flag}' (--smoke takes --address ADDRESS and --timeout SECONDS)")
        if not rest:
            raise UsageError(f"{flag} needs a value")
        value = rest.pop(0)
        if flag == "--address":
            address = value
        else:
            try:
                timeout = float(value)
            except ValueError:
                timeout = -1.0
            if not timeout > 0:
                raise UsageError(f"--timeout: expected a positive number of seconds, not '{value}'")
    return address, timeout
