"""The method contract: what a distillation method is to the engine.

A method is an ``nn.Module`` that owns its networks (students, teachers, EMA copies)
and turns one batch into named loss terms. It knows nothing of Ray or MLflow; the
engine knows nothing of any method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import Tensor, nn

from kd_platform.config.recipe import Recipe
from kd_platform.data.base import Batch as Batch  # the contract's batch type, defined by the data layer
from kd_platform.models.base import ZooNet

ANY = "<any value>"
"""``Void.same_as`` for a knob that does nothing at all in a configuration: every value trains alike."""


@dataclass(frozen=True)
class Void:
    """A knob whose value makes no difference to a run: it trains exactly as with ``same_as``
    (``ANY``: as with every value of the knob), for ``reason``."""
    reason: str
    same_as: Any = ANY


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's knobs; subclasses add fields declared with ``knob``."""


@dataclass
class BuildEnv:
    """What a method may use to build itself."""
    recipe: Recipe
    num_classes: int
    in_channels: int
    image_size: int
    make_model: Callable[[str], ZooNet]
    """Fresh network of the named architecture, shaped for this dataset."""
    get_teacher: Callable[[str], ZooNet] | None = None
    """Trained, frozen teacher of the named architecture (offline methods only)."""
    fused: bool = False
    """Train homogeneous peers as one stacked model (methods with ``fusable_peers`` only)."""


@dataclass
class StepContext:
    epoch: int                 # 0-based
    epochs: int
    step: int                  # 0-based index of the batch within the epoch
    steps_per_epoch: int
    global_step: int           # 0-based count of optimiser steps since the run started
    extra: dict = field(default_factory=dict)

    @property
    def last_step_of_epoch(self) -> bool:
        return self.step == self.steps_per_epoch - 1


class MethodKind(StrEnum):
    """How a method's networks learn; a string enum, so ``kind == "offline"`` reads as before."""
    SINGLE = "single"    # one network from the labels alone (``ce``, ``sam``, ``swa``)
    ONLINE = "online"    # peers or branches that teach each other while they all train
    OFFLINE = "offline"  # a student taught by a trained, frozen teacher


class Method(nn.Module):
    """Subclasses set ``name``, ``Config`` and ``kind`` and implement the hooks below."""
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    kind: ClassVar[MethodKind] = MethodKind.ONLINE
    fusable_peers: ClassVar[bool] = False
    """True when the method's networks are N peers of one architecture built by ``_peers.Peers``,
    which can train fused into one stacked model (knob ``fused``)."""
    def __init__(self, cfg: MethodConfig, env: BuildEnv) -> None:
        super().__init__()
        self.cfg = cfg

    @classmethod
    def student_names(cls, cfg: Any) -> tuple[str, ...]:
        """Names (keys of ``eval_networks``) averaged into the primary metric ``students_mean``;
        known from the knobs alone, so metric names are known before anything is built. The
        peers of an online method are ``student1..N`` (:func:`peer_names`)."""
        return ()

    @classmethod
    def group_names(cls, cfg: Any) -> dict[str, tuple[str, ...]]:
        """Further named groups of networks whose mean and best accuracy are logged as
        ``<group>_mean`` / ``<group>_best`` (e.g. DKEL's teacher branches)."""
        return {}

    @property
    def students(self) -> tuple[str, ...]:
        return type(self).student_names(self.cfg)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return type(self).group_names(self.cfg)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        """Named loss terms of one batch; ``"loss"`` is the total that is back-propagated."""
        raise NotImplementedError

    def forward(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        # DDP synchronises gradients of whatever runs through forward().
        return self.training_step(batch, ctx)

    @classmethod
    def views_for(cls, cfg: Any) -> int:
        """How many independently augmented views of each batch a method with knobs ``cfg``
        wants; known before the method is built, so the data can be chosen for it."""
        return 1

    @classmethod
    def degenerate(cls, cfg: Any, recipe: Recipe) -> str | None:
        """Why ``cfg`` is not the method it names, with the knobs that make it so (students that
        cannot differ, say), or None. Runs refuse a degenerate configuration, and sweeps and
        ablations never train one: a finding about it would be a finding about another method."""
        return None

    @classmethod
    def void_knobs(cls, cfg: Any, recipe: Recipe, steps_per_epoch: int | None = None) -> dict[str, Void]:
        """Knobs whose value makes no difference to a run of ``recipe.epochs`` epochs of
        ``steps_per_epoch`` steps (None: unknown) under ``cfg``: a temperature whose KD term is
        off, a fusion interval that never fires. Ablations refuse values that cannot differ,
        and search spaces refuse a swept knob that never has an effect."""
        return {}

    @classmethod
    def teacher_stage(cls, cfg: Any, teachers: Any) -> None:
        """Runs in the teacher stage (``teachers.prepare``), after the teacher is ready and before
        the method is built: what a method trains on top of its teacher alone (IE-KD's
        auto-encoder) is made and cached here through ``teachers`` (the run's provider), so the
        build only loads it. Nothing by default."""

    @classmethod
    def has_teacher_stage(cls) -> bool:
        return cls.teacher_stage.__func__ is not Method.teacher_stage.__func__  # type: ignore[attr-defined]

    def num_views(self) -> int:
        return type(self).views_for(self.cfg)

    def optimizer_step(self, loss_terms: Callable[[], dict[str, Tensor]], opt: torch.optim.Optimizer,
                       ctx: StepContext) -> dict[str, Tensor]:
        """One update of the method's parameters; returns the batch's loss terms.

        ``loss_terms()`` runs the forward (under the run's autocast, through DDP when there
        are several workers, so every backward of it synchronises gradients) and may be called
        more than once; ``opt`` is the run's optimiser. The default is the plain step; a method
        whose update is not one gradient step (SAM's two passes) overrides this."""
        terms = loss_terms()
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        return terms

    def after_step(self, ctx: StepContext) -> None:
        """Runs after every optimiser step (fusion, EMA updates, ...)."""

    def after_epoch(self, ctx: StepContext) -> None:
        """Runs after the last step of every epoch."""

    def before_eval(self, ctx: StepContext, train_batches: Callable[[], Iterable[Batch]]) -> None:
        """Runs after ``after_epoch``, before the epoch's evaluation. ``train_batches()`` goes over
        this epoch's training data once more, for a method that must see it outside the
        optimiser steps (SWA recomputes its averaged network's BatchNorm statistics)."""

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        """What to evaluate, by name: each callable maps images to logits."""
        raise NotImplementedError

    def peer_parameters(self) -> dict[str, Tensor] | None:
        """The parameters of homogeneous peers stacked along a leading peer dimension (their
        relative distance is a diversity metric), or None for a method without such peers.
        Methods with ``fusable_peers`` hold their peers as ``self.peers`` (``_peers.Peers``)."""
        return self.peers.stacked() if self.fusable_peers else None

    def analysis_networks(self) -> dict[str, nn.Module]:
        """Plain, parameter-owning networks for loss-landscape analysis (``kd_platform.run.flatness``),
        by the names ``eval_networks`` uses. The default finds each student kept as an attribute
        of its own name (``ce``'s ``net``, an offline method's ``student``); methods whose
        students live elsewhere override it, and those without plain students return ``{}``."""
        if self.fusable_peers:  # the peers of ``_peers.Peers``, as plain networks
            return {name: self.peers.member(i) for i, name in enumerate(self.students)}
        nets = {name: getattr(self, name, None) for name in self.students}
        return {name: net for name, net in nets.items() if isinstance(net, nn.Module)}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)


def off_with(weight: str, value: float, knobs: Iterable[str], term: str = "KD term") -> dict[str, Void]:
    """The knobs that only shape a loss term, void while its weight knob ``weight`` is 0."""
    return {k: Void(f"{weight}=0 turns the {term} off") for k in knobs} if value == 0 else {}


def peer_names(n: int) -> tuple[str, ...]:
    """What every online method calls its ``n`` peers (networks or branches): ``student1..N``."""
    return tuple(f"student{i + 1}" for i in range(n))


def freeze(net: nn.Module) -> nn.Module:
    """Put ``net`` in eval mode for good with no parameter requiring a gradient."""
    net.eval()
    net.train = lambda mode=True: net  # type: ignore[method-assign]  # stay in eval under .train()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
