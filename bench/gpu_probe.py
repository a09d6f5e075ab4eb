"""What ``bench/gpu.py`` records about the machine before it measures anything, and its
``--sim-cuda`` mode. Every probe is guarded on its own: one that raises leaves its error
in place of its value, and the run goes on."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _guarded(env: dict[str, Any], key: str, probe: Callable[[], Any]) -> None:
    try:
        value = probe()
    except Exception as exc:  # noqa: BLE001 - a probe that fails is a finding, not a crash
        env[key] = {"error": first_line(exc)}
        return
    if isinstance(value, dict):
        env.update(value)
    else:
        env[key] = value


def _torchvision() -> str:
    import torchvision
    return torchvision.__version__


def _cpus() -> dict[str, Any]:
    out: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if hasattr(os, "sched_getaffinity"):
        out["cpus_usable"] = len(os.sched_getaffinity(0))
    return out


def _cuda(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
        return {"device_name": name or "CPU", "cuda": None}
    props = torch.cuda.get_device_properties(device)
    return {"device_name": props.name, "device_memory_gib": round(props.total_memory / 2 ** 30, 1),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16": torch.cuda.is_bf16_supported(), "gpus": torch.cuda.device_count()}


def _shm() -> dict[str, float]:
    # DataLoader workers hand batches over through /dev/shm; a small one (docker's 64 MiB)
    # makes loader workers die with a bus error.
    st = os.statvfs("/dev/shm")
    return {"total_gib": round(st.f_blocks * st.f_frsize / 2 ** 30, 2),
            "free_gib": round(st.f_bavail * st.f_frsize / 2 ** 30, 2)}


def _compiler() -> str | None:
    # torch.compile's inductor builds C++ (CPU) and Triton's launchers (GPU) with it.
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _python_h() -> str | None:
    path = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return str(path) if path.is_file() else None


def _triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def tiny_jpeg() -> torch.Tensor:
    from torchvision.io import encode_jpeg
    g = torch.Generator().manual_seed(0)
    return encode_jpeg(torch.randint(0, 256, (3, 64, 48), dtype=torch.uint8, generator=g))


def _nvjpeg(device: torch.device) -> str:
    """One bare ``decode_jpeg(..., device="cuda")``: "ok", or the error it raised."""
    if device.type != "cuda":
        return "no CUDA"
    from torchvision.io import decode_jpeg
    img = decode_jpeg(tiny_jpeg(), device=device)
    torch.cuda.synchronize(device)
    if tuple(img.shape) != (3, 64, 48) or img.device.type != "cuda":
        return f"unexpected result: {tuple(img.shape)} on {img.device}"
    return "ok"


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                           "device": str(device)}
    _guarded(env, "torchvision", _torchvision)
    _guarded(env, "cpus", _cpus)
    _guarded(env, "device_name", lambda: _cuda(device))
    _guarded(env, "shm", lambda: {"shm": _shm()})
    _guarded(env, "c_compiler", _compiler)
    _guarded(env, "python_h", _python_h)
    _guarded(env, "triton", _triton)
    try:
        env["nvjpeg"] = _nvjpeg(device)
    except Exception as exc:  # noqa: BLE001
        env["nvjpeg"] = f"failed: {first_line(exc)}"
    return env


def environment_lines(env: dict[str, Any], sim: bool) -> list[str]:
    gpu = (f" ({env.get('device_memory_gib')} GiB, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, "
           f"bf16 {'yes' if env.get('bf16') else 'no'}, {env.get('gpus')} visible)" if env.get("cuda") else "")
    shm = env.get("shm")
    shm_text = (f"{shm['total_gib']} GiB ({shm['free_gib']} free)" if isinstance(shm, dict) and "total_gib" in shm
                else str(shm))
    return [f"device: {env.get('device_name')}{gpu}" + (" - simulating CUDA's auto choices" if sim else ""),
            f"python {env['python']}, torch {env['torch']}, torchvision {env.get('torchvision')}, "
            f"numpy {env['numpy']}, {env.get('cpus')} CPUs ({env.get('cpus_usable', env.get('cpus'))} usable), "
            f"{env.get('torch_threads')} torch threads",
            f"/dev/shm {shm_text}, C compiler {env.get('c_compiler')}, Python.h {env.get('python_h')}, "
            f"triton {env.get('triton')}, decode_jpeg on cuda: {env.get('nvjpeg')}"]


def simulate_cuda() -> None:
    """Make ``auto`` resolve on the CPU as on a CUDA device with bf16: bf16 autocast,
    channels-last, ``fused`` as ``FUSED_AUTO['cuda']``, and ImageNet's device path, so that
    every GPU-only branch of the benchmark runs (slowly) where there is no GPU."""
    from kd_platform.config.recipe import Recipe
    from kd_platform.data import imagenet
    from kd_platform.run import spec

    def autocast_dtype(self: Recipe, device: torch.device) -> torch.dtype | None:
        return torch.bfloat16 if self.amp in ("auto", "bf16") else None

    def use_channels_last(self: Recipe, device: torch.device) -> bool:
        return self.channels_last in ("auto", "true")

    choose = imagenet.choose_path

    def choose_path(recipe: Recipe, device: torch.device) -> tuple[str, str]:
        if recipe.data_path == "auto":
            return "device", "JPEGs are decoded in batches on the device (simulated CUDA)"
        return choose(recipe, device)

    Recipe.autocast_dtype = autocast_dtype  # type: ignore[method-assign]
    Recipe.use_channels_last = use_channels_last  # type: ignore[method-assign]
    spec.FUSED_AUTO["cpu"] = spec.FUSED_AUTO["cuda"]
    imagenet.choose_path = choose_path  # type: ignore[assignment]
