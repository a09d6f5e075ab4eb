"""What the offline methods (KD, DIST, CMKD, IE-KD) share: one student learning from a
trained, frozen teacher, and the teacher's own training recipe.

The teacher comes from ``env.get_teacher``, which the engine backs with a cache of trained
teachers keyed by everything that changes them (see ``kd_platform.teachers``); the
``teacher_*`` knobs below are the recipe it is trained with when it is not cached yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from kd_platform.config.knobs import knob
from kd_platform.config.recipe import Recipe
from kd_platform.errors import UsageError
from kd_platform.methods.base import BuildEnv, Method, MethodConfig, MethodKind


@dataclass(frozen=True)
class OfflineConfig(MethodConfig):
    teacher_arch: str = knob("resnet20", help="architecture of the trained teacher (larger than the student)")
    teacher_epochs: int = knob(10, low=1, high=100000, help="epochs of the teacher's own training")
    teacher_batch_size: int = knob(64, low=1, high=65536)
    teacher_lr: float = knob(0.1, low=0.0, high=10.0)
    teacher_weight_decay: float = knob(5e-4, low=0.0, high=1.0)
    teacher_schedule: str = knob("cosine", choices=("cosine", "multistep", "constant"))
    teacher_milestones: str = knob("", form="epochs",
                                  help="comma-separated epochs of the teacher's multistep schedule")

    def teacher_recipe(self, student: Recipe, arch: str | None = None) -> Recipe:
        """The teacher's recipe: the student's data (same split, same augmentation) and this
        config's optimiser and schedule; SGD momentum and lr decay keep the recipe defaults."""
        return Recipe(dataset=student.dataset, data_dir=student.data_dir, val_fraction=student.val_fraction,
                      augment=student.augment, arch=arch or self.teacher_arch, epochs=self.teacher_epochs,
                      batch_size=self.teacher_batch_size, lr=self.teacher_lr,
                      weight_decay=self.teacher_weight_decay, schedule=self.teacher_schedule,
                      milestones=self.teacher_milestones)


class OfflineMethod(Method):
    """A student (the primary metric) and a frozen teacher (evaluated too, for reference)."""
    kind = MethodKind.OFFLINE

    @classmethod
    def student_names(cls, cfg: MethodConfig) -> tuple[str, ...]:
        return ("student",)

    def __init__(self, cfg: OfflineConfig, env: BuildEnv) -> None:
        super().__init__(cfg, env)
        if env.get_teacher is None:
            raise UsageError(f"method '{self.name}' needs a trained teacher (engine.train's teachers=, "
                             "from kd_platform.teachers.prepare)")
        self.student = env.make_model(env.recipe.arch)
        self.teacher = env.get_teacher(cfg.teacher_arch)

    def logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(student logits, teacher logits)``; the teacher's carry no graph."""
        with torch.no_grad():
            z_t = self.teacher(x)
        return self.student(x), z_t

    def eval_networks(self) -> dict[str, Callable[[Tensor], Tensor]]:
        return {"student": self.student, "teacher": self.teacher}
