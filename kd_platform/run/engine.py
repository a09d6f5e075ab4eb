"""The epoch loop, shared by single runs, Tune trials and Ray Train workers.

It builds the data, the method and the optimiser from a :class:`RunSpec`, trains,
evaluates every network the method names on the validation split after each epoch
(and on the test split after the last), checkpoints every epoch and hands metrics
to a :class:`Reporter`. It knows nothing of any particular method, of Ray or of MLflow.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from kd_platform.config.recipe import Recipe
from kd_platform.data import build_data
from kd_platform.errors import UsageError
from kd_platform.methods import get_method
from kd_platform.methods.base import Batch, BuildEnv, Method, StepContext
from kd_platform.models import build_model
from kd_platform.models.base import ZooNet
from kd_platform.run.checkpoint import STATE_FILE, load_checked, save_atomic
from kd_platform.run.evaluation import evaluate
from kd_platform.run.spec import FUSED_AUTO, Assets, RunSpec, data_recipe, resolve_fused  # noqa: F401  (the engine's API)

log = logging.getLogger(__name__)
class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run cannot recover from that."""


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


def _resume_state(where: Path) -> dict[str, Any] | None:
    """The state a restarted run continues from; None (train again from the first epoch) where
    the checkpoint is unreadable, e.g. cut short by a full disk or a killed node: a trial that
    cannot resume should start over, not fail at every retry."""
    try:
        return load_checked(where / STATE_FILE)
    except UsageError as exc:
        log.warning("%s: the run starts again from its first epoch", exc)
        return None


def _epoch_means(sums: dict[str, torch.Tensor], steps: int, world: int) -> dict[str, float]:
    """Each loss term's mean over the epoch's steps and, under DDP, over every rank's shard:
    a rank alone would log the loss of its own slice of the data."""
    if world == 1 or not sums:
        return {k: float(v) / steps for k, v in sums.items()}
    import torch.distributed as dist
    keys = sorted(sums)  # every rank runs the same method, so the same terms in the same order
    total = torch.stack([torch.as_tensor(sums[k]).float() for k in keys])
    dist.all_reduce(total)
    return {k: float(v) / (steps * world) for k, v in zip(keys, total.tolist())}


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


@dataclass
class Trained:
    """What a finished run leaves: its last epoch's metrics and the trained method itself."""
    metrics: dict[str, Any]
    method: Method


def train(spec: RunSpec, report: Reporter, *, device: torch.device | None = None,
          resume_from: Path | None = None, rank: int = 0, world: int = 1,
          teachers: Callable[[Any], Callable[[str], ZooNet]] | None = None,
          hooks: RunHooks | None = None) -> dict[str, float]:
    """Train ``spec`` to its last epoch; its final metrics (see :func:`fit` for the arguments)."""
    return fit(spec, report, device=device, resume_from=resume_from, rank=rank, world=world,
               teachers=teachers, hooks=hooks).metrics


AT_BEST_VAL = "test_at_best_val"
"""Prefix of the test accuracies measured at the epoch of the best validation ``students_mean``
(reported with the last epoch's metrics): the "best epoch" figure many papers print, kept apart
from the last epoch's ``test/*``. Where ``val_fraction=0`` the validation split is the test set,
so the epoch is then chosen on the test set itself, and the figure is optimistic."""


def _test_accuracies(method: Any, data: Any, device: torch.device, world: int,
                     val: dict[str, float]) -> dict[str, float]:
    """Every network's test accuracy now; the validation figures where they are the test set's."""
    found = val if getattr(data, "val_is_test", False) else evaluate(method, data, "test", device, reduce=world > 1)
    return {k: v for k, v in found.items() if k.startswith("acc/")}


def fit(spec: RunSpec, report: Reporter, *, device: torch.device | None = None,
          resume_from: Path | None = None, rank: int = 0, world: int = 1,
          teachers: Callable[[Any], Callable[[str], ZooNet]] | None = None,
          hooks: RunHooks | None = None) -> Trained:
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
    at_best: dict[str, float] = {}  # test accuracies at the epoch of the best validation accuracy so far
    where = Path(resume_from) if resume_from is not None else None
    state = _resume_state(where) if where is not None else None
    if where is not None and state is not None:
        _check_layout(state.get("layout"), layout, where)
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best = int(state["epoch"]), float(state["best"])
        at_best = dict(state.get(AT_BEST_VAL, {}))
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)

    steps = data.steps_per_epoch()
    metrics: dict[str, Any] = {}
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
        means = _epoch_means(sums, step + 1, world)
        if not all(math.isfinite(v) for v in means.values()):
            raise NonFiniteLoss(f"non-finite training loss at epoch {epoch + 1}: "
                                + ", ".join(f"{k}={v}" for k, v in means.items()))
        elapsed = time.perf_counter() - t0
        val = evaluate(method, data, "val", device, reduce=world > 1)
        val_s = time.perf_counter() - t0 - elapsed
        if val["acc/students_mean"] > best:
            at_best = _test_accuracies(method, data, device, world, val)
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
            metrics.update({f"{AT_BEST_VAL}/{k}": v for k, v in at_best.items()})
            from kd_platform.run import flatness  # flatness=final: the flat/* measures of every analysis network
            metrics.update(flatness.final_metrics(spec, method, data, device))

        # at_best is replaced, never changed in place, so binding it here keeps this epoch's.
        def save(directory: Path, epoch: int = epoch, best: float = best,
                 at_best: dict[str, float] = at_best) -> None:
            save_atomic({"method": method.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                         "epoch": epoch + 1, "best": best, AT_BEST_VAL: at_best, "layout": layout},
                        Path(directory) / STATE_FILE)
        report(metrics, save)
    return Trained(metrics, method)
