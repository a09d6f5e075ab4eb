"""The training recipe: knobs every method shares (data, architecture, optimiser, schedule).

Method knobs live in each method's own ``Config``; a run's full description is one
flat mapping that splits into a :class:`Recipe` and a method config with no key in both.
"""
from __future__ import annotations

from dataclasses import dataclass

from .knobs import knob


@dataclass(frozen=True)
class Recipe:
    dataset: str = knob("digits", help="dataset name (digits ships with scikit-learn)")
    data_dir: str = knob("", help="where file-based datasets live")
    val_fraction: float = knob(0.1, low=0.0, high=0.5, help="stratified validation split held out of train")
    arch: str = knob("resnet8", help="network architecture (students, or the single network)")
    epochs: int = knob(5, low=1, high=100000)
    batch_size: int = knob(64, low=1, high=65536)
    optimizer: str = knob("sgd", choices=("sgd",))
    lr: float = knob(0.1, low=0.0, high=10.0)
    momentum: float = knob(0.9, low=0.0, high=1.0)
    nesterov: bool = knob(False)
    weight_decay: float = knob(5e-4, low=0.0, high=1.0)
    schedule: str = knob("cosine", choices=("cosine", "multistep", "constant"))
    milestones: str = knob("", help="comma-separated epochs where multistep multiplies the lr by lr_decay")
    lr_decay: float = knob(0.1, low=0.0, high=1.0)
    augment: str = knob("shift", choices=("none", "shift"),
                        help="training augmentation; 'shift' = random translation by up to 1/8 of the image")

    def milestone_list(self) -> list[int]:
        return [int(m) for m in self.milestones.split(",") if m.strip()]
