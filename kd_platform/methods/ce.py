"""``ce``: one network trained with cross entropy alone (the baseline every table starts from)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.methods.base import Batch, BuildEnv, Method, MethodConfig, MethodKind, StepContext
from kd_platform.methods.registry import register_method


@dataclass(frozen=True)
class CEConfig(MethodConfig):
    label_smoothing: float = knob(0.0, low=0.0, high=0.5)


@register_method
class CE(Method):
    name = "ce"
    Config = CEConfig
    cfg: CEConfig
    kind = MethodKind.SINGLE

    @classmethod
    def student_names(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("net",)

    def __init__(self, cfg: CEConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        self.net = env.make_model(env.recipe.arch)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, Tensor]:
        loss = F.cross_entropy(self.net(batch.x), batch.y, label_smoothing=self.cfg.label_smoothing)
        return {"loss": loss, "ce": loss.detach()}

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"net": self.net}
