"""The epoch loop, shared by single runs, Tune trials and Ray Train workers.

It builds the data, the method and the optimiser from a :class:`RunSpec`, trains,
evaluates every network the method names on the validation split after each epoch
(and on the test split after the last), checkpoints every epoch and hands metrics
to a :class:`Reporter`. It knows nothing of any particular method, of Ray or of MLflow.
"""
from __future__ import annotations

import functools
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from .checkpoint import STATE_FILE, load_checked, save_atomic
from .data import build_data, check_recipe, dataset_names
from .errors import UsageError
from .evaluation import evaluate
from .knobs import build_config, knob_specs
from .methods import get_method
from .methods.base import Batch, BuildEnv, Method, StepContext
from .models import build_model, model_names
from .models.base import ZooNet
from .models.stacked import is_stackable
from .recipe import Recipe

log = logging.getLogger(__name__)
ASSET_PREFIX = "asset."


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run cannot recover from that."""


@dataclass(frozen=True)
class RunSpec:
    """The whole description of one run: method, method knobs, recipe knobs and seed."""
    method: str
    knobs: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    assets: dict[str, str] = field(default_factory=dict)
    """Files a run uses but that are not knobs (absolute paths): ``teacher_cache``, the
    directory of trained teachers, ``teacher_store``, the storage shared by a cluster's nodes
    behind it (a path or URI), and ``teacher_checkpoint``, a user's own teacher."""

    @staticmethod
    def from_flat(method: str, flat: dict[str, Any], seed: int) -> "RunSpec":
        """Split one flat mapping of knobs into method knobs and recipe knobs, validating both.

        Keys ``asset.<name>`` are assets, not knobs: riding in the flat mapping lets them
        travel wherever fixed knobs go (Tune trials, a resumed sweep's state file)."""
        assets = {k[len(ASSET_PREFIX):]: str(v) for k, v in flat.items() if k.startswith(ASSET_PREFIX)}
        flat = {k: v for k, v in flat.items() if not k.startswith(ASSET_PREFIX)}
        method_keys = set(knob_specs(get_method(method).Config))
        recipe_keys = set(knob_specs(Recipe))
        spec = RunSpec(method, {k: v for k, v in flat.items() if k in method_keys},
                       {k: v for k, v in flat.items() if k in recipe_keys and k not in method_keys}, seed,
                       assets)
        unknown = set(flat) - method_keys - recipe_keys
        if unknown:
            raise UsageError(f"unknown knob '{sorted(unknown)[0]}' for method '{method}'")
        _check_names(*spec.resolved())
        check_recipe(data_recipe(spec))
        _check_fused(spec)
        return spec

    def resolved(self) -> tuple[Recipe, Any]:
        return build_config(Recipe, self.recipe), build_config(get_method(self.method).Config, self.knobs)

    def all_knobs(self) -> dict[str, Any]:
        """Every knob with its resolved value (defaults filled in), as logged to MLflow."""
        recipe, cfg = self.resolved()
        return {**asdict(recipe), **asdict(cfg), "seed": self.seed}


def _check_names(recipe: Recipe, cfg: Any) -> None:
    """Architectures and datasets are free-form strings in the knobs; check them against
    the registries here so a typo fails before anything starts."""
    if recipe.dataset not in dataset_names():
        raise UsageError(f"knob 'dataset': unknown dataset '{recipe.dataset}'; known: {', '.join(dataset_names())}")
    archs = {"arch": recipe.arch, **{k: v for k, v in asdict(cfg).items() if k.endswith("_arch")}}
    for key, name in archs.items():
        if name not in model_names():
            raise UsageError(f"knob '{key}': unknown architecture '{name}'; known: {', '.join(model_names())}")


FUSED_AUTO: dict[str, bool] = {"cpu": False, "cuda": False}
"""What ``fused=auto`` means per device type. On the CPU a stacked step is no faster (grouped
convolutions there are not better kernels; see bench/gpu.py's CPU figures). On CUDA it stays
off until bench/gpu.py has measured the fused step faster on a GPU and the figures are in
bench/RESULTS.md."""


@functools.lru_cache(maxsize=None)
def _stackable_arch(arch: str) -> bool:
    """Whether ``arch`` stacks; asked at every parse of a run, so each architecture is built once."""
    return is_stackable(build_model(arch, 2, 3))


def _check_fused(spec: RunSpec) -> None:
    recipe, _ = spec.resolved()
    if recipe.fused != "true":
        return
    from .methods import method_names
    if not get_method(spec.method).fusable_peers:
        fusable = [m for m in method_names() if get_method(m).fusable_peers]
        raise UsageError(f"knob 'fused': method '{spec.method}' has no homogeneous peers to fuse into one model "
                         f"(methods that have: {', '.join(fusable)})")
    if not _stackable_arch(recipe.arch):
        stackable = [a for a in model_names() if _stackable_arch(a)]
        raise UsageError(f"knob 'fused': architecture '{recipe.arch}' cannot be stacked (its layers mix "
                         f"channels outside convolutions); stackable: {', '.join(stackable)}")


def resolve_fused(spec: RunSpec, device: torch.device) -> bool:
    """Whether this run trains its peers fused: ``fused`` resolved for the method, the
    architecture and the device."""
    recipe, _ = spec.resolved()
    if recipe.fused == "false" or not get_method(spec.method).fusable_peers:
        return False
    if recipe.fused == "true":
        return True
    return FUSED_AUTO.get(device.type, False) and _stackable_arch(recipe.arch)


def data_recipe(spec: RunSpec) -> Recipe:
    """The recipe the data module is built from: ``view_augments`` only reach a method that
    asks for per-network views, so a single-view run is not held to augmentations it never uses."""
    recipe, cfg = spec.resolved()
    if recipe.view_augments and get_method(spec.method).views_for(cfg) == 1:
        recipe = replace(recipe, view_augments="")
    return recipe


class Reporter(Protocol):
    def __call__(self, metrics: dict[str, Any], save: Callable[[Path], None]) -> None:
        """Record one epoch's metrics; call ``save(directory)`` to write the checkpoint."""


class RunHooks(Protocol):
    """What a caller plugs into the epoch loop besides its :class:`Reporter` (which reports and
    checkpoints). ``faults.hooks()`` is one set: the reliability tests make a run die or its
    loss turn NaN through them."""

    def epoch_start(self, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def loss(self, epoch: int, loss: torch.Tensor) -> torch.Tensor:
        """Every step's total loss, before the backward; returns the loss to use."""


class NoHooks:
    """The :class:`RunHooks` of a run nobody hooks into."""

    def epoch_start(self, epoch: int) -> None:
        pass

    def loss(self, epoch: int, loss: torch.Tensor) -> torch.Tensor:
        return loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _scheduler(opt: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LRScheduler:
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
    if recipe.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, recipe.milestone_list(), gamma=recipe.lr_decay)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def build_method(spec: RunSpec, data: Any, device: torch.device,
                 get_teacher: Callable[[str], ZooNet] | None = None) -> Method:
    recipe, cfg = spec.resolved()
    env = BuildEnv(recipe=recipe, num_classes=data.num_classes, in_channels=data.in_channels,
                   image_size=data.image_size,
                   make_model=lambda arch: build_model(arch, data.num_classes, data.in_channels),
                   get_teacher=get_teacher, fused=resolve_fused(spec, device))
    return get_method(spec.method)(cfg, env).to(device)


def _layout(spec: RunSpec, device: torch.device, data: Any) -> dict[str, Any]:
    """How a run's state is laid out and fed: recorded in every checkpoint, since a resumed run
    must load the same parameter layout and see the same data stream."""
    return {"fused": resolve_fused(spec, device), "data_path": str(getattr(data, "path", ""))}


def _check_layout(saved: dict[str, Any] | None, now: dict[str, Any], where: Path) -> None:
    saved = saved or {"fused": False, "data_path": now["data_path"]}
    for key, value in now.items():
        if saved.get(key, value) != value:
            want = str(saved[key]).lower()
            raise UsageError(f"checkpoint {where} was written with {key}={want} but this run resolves "
                             f"{key} to {str(value).lower()}; resume with --set {key}={want}")


def _to_channels_last(module: nn.Module) -> None:
    """Channels-last for every 4-D weight; stacked peers keep their 5-D stacks as they are and
    hand channels-last views to the convolution themselves."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)


@dataclass
class Stepper:
    """One optimiser step as every run takes it: channels-last views, the method's update
    (by default: autocast forward of its loss terms, backward, the SGD step; see
    ``Method.optimizer_step``) and its ``after_step``. Benchmarks time this same object, so
    what they measure is what a run does."""
    method: Method
    model: nn.Module
    """The method itself, or its DDP wrapper (whose forward synchronises gradients)."""
    opt: torch.optim.Optimizer
    amp_dtype: torch.dtype | None
    channels_last: bool
    hooks: RunHooks = field(default_factory=NoHooks)

    def __call__(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.channels_last:
            batch.views = [v.contiguous(memory_format=torch.channels_last) for v in batch.views]
        terms = self.method.optimizer_step(lambda: self.loss_terms(batch, ctx), self.opt, ctx)
        self.method.after_step(ctx)
        return terms

    def loss_terms(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The method's loss terms of ``batch`` through the (DDP-wrapped, compiled) model."""
        with torch.autocast(batch.y.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            terms = self.model(batch, ctx)
        terms["loss"] = self.hooks.loss(ctx.epoch, terms["loss"])
        return terms


def make_stepper(spec: RunSpec, method: Method, device: torch.device, world: int = 1,
                 hooks: RunHooks | None = None) -> Stepper:
    """Lay ``method`` out for ``spec``'s recipe on ``device`` (channels-last, DDP over ``world``
    workers, compilation) and give it its optimiser."""
    recipe, _ = spec.resolved()
    channels_last = recipe.use_channels_last(device)
    if channels_last:  # before DDP, whose gradient buckets follow the parameters' layout
        _to_channels_last(method)
    model: nn.Module = method
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(method, device_ids=ids)
    if recipe.compile == "on":  # the training step only: evaluation runs once an epoch, eagerly
        model.compile()
    opt = torch.optim.SGD(list(method.trainable_parameters()), lr=recipe.lr, momentum=recipe.momentum,
                          nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    return Stepper(method, model, opt, recipe.autocast_dtype(device), channels_last, hooks or NoHooks())


def train(spec: RunSpec, report: Reporter, *, device: torch.device | None = None,
          resume_from: Path | None = None, rank: int = 0, world: int = 1,
          teachers: Callable[[Any], Callable[[str], ZooNet]] | None = None,
          hooks: RunHooks | None = None) -> dict[str, float]:
    """Train ``spec`` to its last epoch (resuming from a checkpoint directory if given).

    ``teachers`` turns the run's data into its ``BuildEnv.get_teacher``; offline methods need
    one, and ``teachers.prepare`` makes it in a stage before this one (the engine never trains
    or fetches a teacher itself)."""
    device = device or torch.device("cpu")
    recipe = data_recipe(spec)
    seed_everything(spec.seed)
    data = build_data(recipe, spec.seed, device, rank, world)
    get_teacher = teachers(data) if teachers is not None else None
    method = build_method(spec, data, device, get_teacher)
    # Where the teacher came from, with every report.
    teacher_tags: dict[str, str] = getattr(get_teacher, "tags", dict)()
    layout = _layout(spec, device, data)
    log.info("%s: fused peers %s, data path %s", spec.method, "on" if layout["fused"] else "off",
             layout["data_path"] or "in memory")
    hooks = hooks or NoHooks()
    stepper = make_stepper(spec, method, device, world, hooks)
    opt = stepper.opt
    sched = _scheduler(opt, recipe)
    start_epoch, best = 0, -math.inf
    if resume_from is not None:
        state = load_checked(Path(resume_from) / STATE_FILE)
        _check_layout(state.get("layout"), layout, Path(resume_from))
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best = int(state["epoch"]), float(state["best"])
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)

    steps = data.steps_per_epoch()
    metrics: dict[str, float] = {}
    warned_identical = False
    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.perf_counter()
        method.train()
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        hooks.epoch_start(epoch)
        for step, batch in enumerate(data.train_batches(epoch, method.num_views())):
            ctx = StepContext(epoch, recipe.epochs, step, steps, epoch * steps + step)
            terms = stepper(batch, ctx)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            seen += len(batch.y)
        method.after_epoch(ctx)
        method.before_eval(ctx, lambda epoch=epoch: data.train_batches(epoch, method.num_views()))
        sched.step()
        means = {k: float(v) / (step + 1) for k, v in sums.items()}
        if not all(math.isfinite(v) for v in means.values()):
            raise NonFiniteLoss(f"non-finite training loss at epoch {epoch + 1}: "
                                + ", ".join(f"{k}={v}" for k, v in means.items()))
        elapsed = time.perf_counter() - t0
        val = evaluate(method, data, "val", device, reduce=world > 1)
        val_s = time.perf_counter() - t0 - elapsed
        best = max(best, val["acc/students_mean"])
        if val.get("diversity/identical") and not warned_identical:
            log.warning("%s: the students are identical (parameter distance 0): the ensemble is one "
                        "network; check same_init, views and hwm_grad", spec.method)
            warned_identical = True
        # Key order matters: Ray Tune's live table shows the first few metrics.
        metrics = {"epoch": epoch + 1, "val/acc/students_mean": val["acc/students_mean"],
                   "train/loss/loss": means["loss"], "val/acc/best_network": val["acc/best_network"],
                   **{f"train/loss/{k}": v for k, v in means.items()},
                   **{f"val/{k}": v for k, v in val.items()},
                   "val/acc_best_epoch/students_mean": best, "lr": opt.param_groups[0]["lr"],
                   "time/epoch_s": elapsed, "time/val_s": val_s, "throughput/img_s": seen * world / elapsed,
                   **teacher_tags}
        if epoch + 1 == recipe.epochs:
            test = evaluate(method, data, "test", device, reduce=world > 1)
            metrics.update({f"test/{k}": v for k, v in test.items()})
            from . import flatness  # flatness=final: the flat/* measures of every analysis network
            metrics.update(flatness.final_metrics(spec, method, data, device))

        def save(directory: Path, epoch: int = epoch) -> None:
            save_atomic({"method": method.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                         "epoch": epoch + 1, "best": best, "layout": layout}, Path(directory) / STATE_FILE)
        report(metrics, save)
    return metrics
