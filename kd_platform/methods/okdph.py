"""``okdph``: online KD by parameter hybridisation (Zhang et al., CVPR 2023).

N students of one architecture learn together. Each batch, a hybrid-weight model
(HWM) with parameters ``sum_i r_i theta_i`` is evaluated; its cross entropy enters
every student's loss, and the detached mean of all logits (students + HWM) is the
distillation target. Every ``fusion_interval`` units the students are pulled towards
their mean. ``variant=code`` reproduces the released script: mean mixing, an HWM built
from detached copies (so its loss gives the students no gradient) and per-network views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.config.knobs import knob
from kd_platform.config.recipe import Recipe
from kd_platform.losses import kd_loss, total
from kd_platform.methods._online import peer_eval_networks
from kd_platform.methods._peers import Peers
from kd_platform.methods.base import (
    Batch,
    BuildEnv,
    Method,
    MethodConfig,
    MethodKind,
    StepContext,
    Void,
    peer_names,
)
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class OKDPHConfig(MethodConfig):
    variant: str = knob("paper", choices=("paper", "code"),
                        help="paper: Dirichlet mixing, HWM gradient reaches students; code: the released script")
    n_students: int = knob(2, low=2, high=8)
    same_init: bool = knob(True, help="all students start from the same weights")
    omega: float = knob(0.8, low=0.0, high=1.0, help="weight of a student's own CE against the HWM's CE")
    beta: float = knob(0.8, low=0.0, high=10.0, help="weight of the KD term towards the ensemble")
    gamma: float = knob(0.5, low=0.0, high=1.0, help="fusion step towards the students' mean")
    temperature: float = knob(4.0, low=0.1, high=20.0)
    fusion_interval: int = knob(1, low=0, high=100000, help="fuse every this many units; 0 disables fusion")
    fusion_unit: str = knob("epoch", choices=("batch", "epoch"))
    alpha: float = knob(1.0, low=1e-3, high=100.0, help="Dirichlet concentration of the mixing weights")
    hwm_mix: str = knob("auto", choices=("auto", "dirichlet", "mean"),
                        help="auto follows the variant (paper: dirichlet, code: mean)")
    hwm_grad: str = knob("auto", choices=("auto", "true", "false"),
                         help="whether the HWM's loss reaches the students; auto follows the variant")
    views: str = knob("auto", choices=("auto", "shared", "per_network"),
                      help="auto follows the variant (paper: shared, code: per_network)")


def _pick(value: str, paper: str, code: str, variant: str) -> str:
    return value if value != "auto" else (paper if variant == "paper" else code)


@register_method
class OKDPH(Method):
    name = "okdph"
    Config = OKDPHConfig
    cfg: OKDPHConfig
    kind = MethodKind.ONLINE
    fusable_peers = True

    @classmethod
    def student_names(cls, cfg: OKDPHConfig) -> tuple[str, ...]:
        return peer_names(cfg.n_students)

    def __init__(self, cfg: OKDPHConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.peers = Peers(lambda: env.make_model(env.recipe.arch), cfg.n_students, env.fused, cfg.same_init)
        self.mix = _pick(cfg.hwm_mix, "dirichlet", "mean", cfg.variant)
        self.hwm_grad = _pick(cfg.hwm_grad, "true", "false", cfg.variant) == "true"

    @classmethod
    def views_for(cls, cfg: OKDPHConfig) -> int:
        per_network = _pick(cfg.views, "shared", "per_network", cfg.variant) == "per_network"
        return cfg.n_students + 1 if per_network else 1

    @classmethod
    def degenerate(cls, cfg: OKDPHConfig, recipe: Recipe) -> str | None:
        # Same start, same batch, same targets: only the HWM's gradient (r_i times the HWM's
        # gradient for student i) can tell the students apart, and it cannot when it is off,
        # when its loss has no weight, or when every r_i is 1/N.
        if not cfg.same_init or cls.views_for(cfg) != 1:
            return None
        if _pick(cfg.hwm_grad, "true", "false", cfg.variant) == "false":
            cause = "hwm_grad=false"
        elif cfg.omega == 1:
            cause = "omega=1 (no weight on the HWM's loss)"
        elif _pick(cfg.hwm_mix, "dirichlet", "mean", cfg.variant) == "mean":
            cause = "hwm_mix=mean"
        else:
            return None
        return (f"same_init=true, views=shared and {cause} give every student the same gradients from the same "
                f"start, so the students stay identical (one network, not an online distillation); "
                f"change one of these knobs")

    @classmethod
    def void_knobs(cls, cfg: OKDPHConfig, recipe: Recipe, steps_per_epoch: int | None = None) -> dict[str, Void]:
        void: dict[str, Void] = {}
        k = cfg.fusion_interval
        units = recipe.epochs if cfg.fusion_unit == "epoch" else \
            (recipe.epochs * steps_per_epoch if steps_per_epoch else None)
        fires = k > 0 and (units is None or k <= units)
        if k > 0 and not fires:
            run = f"a {units}-epoch run" if cfg.fusion_unit == "epoch" else f"a run of {units} steps"
            void["fusion_interval"] = Void(f"fusion_interval={k} never fires in {run} (fusion_unit={cfg.fusion_unit})",
                                           same_as=0)
        if not fires:
            why = "no fusion happens" + (" (fusion_interval=0)" if k == 0 else "")
            void["gamma"] = Void(why)
            if k == 0:
                void["fusion_unit"] = Void(why)
        if cfg.beta == 0:
            void["temperature"] = Void("beta=0 turns the KD term off")
        if _pick(cfg.hwm_mix, "dirichlet", "mean", cfg.variant) == "mean":
            void["alpha"] = Void("the HWM mixes with equal weights (hwm_mix=mean), not Dirichlet draws")
        return void

    def mixing_weights(self) -> Tensor:
        n = self.cfg.n_students
        if self.mix == "mean":
            return torch.full((n,), 1.0 / n)
        # Sampled on the CPU generator so a seed gives the same draws on every device.
        return torch.distributions.Dirichlet(torch.full((n,), float(self.cfg.alpha))).sample()

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        cfg, y = self.cfg, batch.y
        # The HWM runs as one more member beside the students: with fused peers, one forward.
        hwm = self.peers.mixed_state(self.mixing_weights(), keep_grad=self.hwm_grad)
        *logits, z_h = self.peers(batch.views, extra=[hwm])
        target = torch.stack(logits + [z_h]).mean(0).detach()
        ce = [F.cross_entropy(z, y) for z in logits]
        kd = [kd_loss(z, target, cfg.temperature) for z in logits]
        ce_h = F.cross_entropy(z_h, y)
        loss = total(cfg.omega * c + (1 - cfg.omega) * ce_h + cfg.beta * k for c, k in zip(ce, kd))
        return {"loss": loss, "ce_students": torch.stack(ce).mean().detach(),
                "ce_hwm": ce_h.detach(), "kd": torch.stack(kd).mean().detach()}

    def fuse(self) -> None:
        """Move every student (parameters and float buffers) ``gamma`` of the way to the mean."""
        self.peers.pull_to_mean_(self.cfg.gamma)

    def _fusion_due(self, unit: str, count: int) -> bool:
        k = self.cfg.fusion_interval
        return k > 0 and self.cfg.fusion_unit == unit and count % k == 0

    def after_step(self, ctx: StepContext) -> None:
        if self._fusion_due("batch", ctx.global_step + 1):
            self.fuse()

    def after_epoch(self, ctx: StepContext) -> None:
        if self._fusion_due("epoch", ctx.epoch + 1):
            self.fuse()

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        # Students, their logit ensemble and the mean HWM share one forward per batch.
        n = self.cfg.n_students
        hwm = self.peers.mixed_state(torch.full((n,), 1.0 / n), keep_grad=False)
        return peer_eval_networks(self.students, lambda x: self.peers([x], extra=[hwm]), ["hwm"])

    def analysis_networks(self) -> dict[str, nn.Module]:
        nets = super().analysis_networks()
        nets["hwm"] = self.peers.mean_member()  # the mean HWM that eval_networks evaluates
        return nets
