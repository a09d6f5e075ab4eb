"""``iekd``: IE-KD, Huang et al., "Revisiting Knowledge Distillation: An Inheritance and
Exploration Framework" (CVPR 2021).

Stage A, once per teacher and cached beside it (keyed by the teacher's hash and this
recipe): an auto-encoder on the frozen teacher's last-stage feature map (``C_t`` channels)
compresses it to ``k = rate * C_t`` channels. Encoder and decoder are three 3x3 conv + BN +
LeakyReLU(0.1) layers each, trained for ``ae_epochs`` on the training split with mean L1
reconstruction by SGD at ``ae_lr`` (0.1). The paper names only the learning rate; momentum
0.9, weight decay 5e-4 and a constant rate are the platform's choice. The teacher factor
``f_T`` is the encoder's output, flattened and L2-normalised per sample.

Stage B: the student's last-stage map is split by channels into an inheritance part
(fraction ``split``; ``split_mode=natural`` takes the first channels, ``random`` a fixed
permutation drawn once from the run's seed and kept in the checkpoint) and an exploration
part, each encoded to ``k`` channels by its own encoder into factors ``f_I`` and ``f_E``::

    L = CE + l_inh * D(f_I, f_T) - l_exp * D(f_E, f_T)

with ``D`` the mean ``|x - y|`` (``distance=l1``; ``l2`` squares, ``cos`` is 1 - cosine).
The student's and teacher's maps may differ in spatial size (other architecture pairs
than the paper's same-resolution ResNets): the student's map is then adaptively
average-pooled to the teacher's size before the split, so both factors have one length.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.errors import UsageError
from kd_platform.methods._offline import OfflineConfig, OfflineMethod
from kd_platform.methods.base import Batch, BuildEnv, StepContext, freeze
from kd_platform.methods.ie_parts import (
    FactorAutoEncoder,
    IEKnobs,
    InheritExploreSplit,
    factor_channels,
    factor_distance,
    to_factor,
)
from kd_platform.methods.registry import register_method

if TYPE_CHECKING:
    from kd_platform.data import DataModule
    from kd_platform.models.base import ZooNet

log = logging.getLogger(__name__)

AE_MOMENTUM, AE_WEIGHT_DECAY = 0.9, 5e-4


@dataclass(frozen=True)
class IEKDConfig(OfflineConfig, IEKnobs):
    ae_epochs: int = knob(30, low=0, high=100000, help="stage A: epochs of the teacher's auto-encoder")
    ae_lr: float = knob(0.1, low=0.0, high=10.0, help="stage A: SGD learning rate of the auto-encoder")


def fit_autoencoder(ae: FactorAutoEncoder, fmaps: Callable[[int], Iterable[Tensor]], epochs: int,
                    lr: float) -> list[float]:
    """Stage A: train ``ae`` on the maps ``fmaps(epoch)`` yields; each epoch's mean reconstruction loss."""
    opt = torch.optim.SGD(ae.parameters(), lr=lr, momentum=AE_MOMENTUM, weight_decay=AE_WEIGHT_DECAY)
    ae.train()
    history = []
    for epoch in range(epochs):
        total, steps = 0.0, 0
        for fmap in fmaps(epoch):
            _, loss = ae(fmap)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        history.append(total / max(steps, 1))
    return history


def _teacher_maps(teacher: ZooNet, data: DataModule, epoch: int) -> Iterator[Tensor]:
    for batch in data.train_batches(epoch, 1):
        with torch.no_grad():
            fmap = teacher.features(batch.x)
        yield fmap  # outside no_grad: the consumer trains on it


def _stage_a(teacher: ZooNet, data: DataModule, channels: int, k: int, cfg: IEKDConfig) -> dict[str, Tensor]:
    autoencoder = FactorAutoEncoder(channels, k).to(next(teacher.parameters()).device)
    history = fit_autoencoder(autoencoder, lambda epoch: _teacher_maps(teacher, data, epoch), cfg.ae_epochs, cfg.ae_lr)
    if history:
        log.info("iekd auto-encoder: L1 reconstruction %.4f -> %.4f over %d epochs",
                 history[0], history[-1], len(history))
    return autoencoder.state_dict()


@register_method
class IEKD(OfflineMethod):
    name = "iekd"
    Config = IEKDConfig
    cfg: IEKDConfig

    def __init__(self, cfg: IEKDConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        state, k = type(self).autoencoder_state(cfg, env.get_teacher)  # made in the teacher stage: a cache hit
        autoencoder = FactorAutoEncoder(self.teacher.feature_channels, k)
        autoencoder.load_state_dict(state)
        self.teacher_encoder = freeze(autoencoder.encoder)
        self.split = InheritExploreSplit(self.student.feature_channels, k, cfg.split, cfg.split_mode)

    @classmethod
    def teacher_stage(cls, cfg: IEKDConfig, teachers: Any) -> None:
        """Stage A, the teacher's factor auto-encoder: trained (or found) before the run trains."""
        cls.autoencoder_state(cfg, teachers)

    @staticmethod
    def autoencoder_state(cfg: IEKDConfig, teachers: Any) -> tuple[dict[str, Tensor], int]:
        """The auto-encoder's state_dict and code channels ``k``, through the teacher provider's
        cache (keyed by the teacher's hash, this recipe, the data and the seed)."""
        derived = getattr(teachers, "derived", None)
        if derived is None:
            raise UsageError("iekd trains an auto-encoder on its teacher's features and needs the "
                             "teacher provider of kd_platform.teachers.prepare")
        teacher = teachers(cfg.teacher_arch)
        channels = teacher.feature_channels
        k = factor_channels(channels, cfg.rate)
        recipe = {"rate": cfg.rate, "k": k, "ae_epochs": cfg.ae_epochs, "ae_lr": cfg.ae_lr,
                  "momentum": AE_MOMENTUM, "weight_decay": AE_WEIGHT_DECAY}
        state = derived(cfg.teacher_arch, "iekd_autoencoder", recipe,
                        lambda data: _stage_a(teacher, data, channels, k, cfg))
        return state, k

    def factor_distances(self, fmap_s: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(D(f_I, f_T), D(f_E, f_T))`` for the student map ``fmap_s`` of images ``x``."""
        with torch.no_grad():
            fmap_t = self.teacher.features(x)
            f_t = to_factor(self.teacher_encoder(fmap_t))
        if fmap_s.shape[-2:] != fmap_t.shape[-2:]:
            fmap_s = F.adaptive_avg_pool2d(fmap_s, (fmap_t.shape[-2], fmap_t.shape[-1]))
        f_i, f_e = self.split(fmap_s)
        return factor_distance(f_i, f_t, self.cfg.distance), factor_distance(f_e, f_t, self.cfg.distance)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        cfg = self.cfg
        fmap = self.student.features(batch.x)
        ce = F.cross_entropy(self.student.classify(fmap), batch.y)
        inherit, explore = self.factor_distances(fmap, batch.x)
        loss = ce + cfg.l_inh * inherit - cfg.l_exp * explore
        return {"loss": loss, "ce": ce.detach(), "inherit": inherit.detach(), "explore": explore.detach()}
