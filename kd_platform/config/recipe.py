"""The training recipe: knobs every method shares (data, architecture, optimiser, schedule).

Method knobs live in each method's own ``Config``; a run's full description is one
flat mapping that splits into a :class:`Recipe` and a method config with no key in both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kd_platform.config.knobs import knob
from kd_platform.errors import UsageError

if TYPE_CHECKING:
    import torch

AUGMENTATIONS = ("none", "shift", "standard", "rotate", "cutout", "randaugment", "autoaugment", "rrc")
"""Training augmentation pipelines by name; ``kd_platform.data.augment`` defines them."""

DEVICE_AUGMENTATIONS = ("none", "shift", "standard", "rotate", "cutout", "rrc")
"""The augmentations the device-resident data path draws per sample in whole batches
(``kd_platform.data.device_data``); the policy ones need the loader."""


@dataclass(frozen=True)
class Recipe:
    dataset: str = knob("digits", help="dataset name (digits ships with scikit-learn)")
    data_dir: str = knob("", help="where file-based datasets live (CIFAR is downloaded there when absent)")
    val_fraction: float = knob(0.1, low=0.0, high=0.5,
                               help="stratified validation split held out of train; 0 trains on all of "
                                    "train and then, on file datasets, 'val' metrics are test metrics "
                                    "(final runs only, never for tuning)")
    arch: str = knob("resnet8", help="network architecture (students, or the single network)")
    epochs: int = knob(5, low=1, high=100000)
    batch_size: int = knob(64, low=1, high=65536)
    optimizer: str = knob("sgd", choices=("sgd",))
    lr: float = knob(0.1, low=0.0, high=10.0)
    momentum: float = knob(0.9, low=0.0, high=1.0)
    nesterov: bool = knob(False)
    weight_decay: float = knob(5e-4, low=0.0, high=1.0)
    schedule: str = knob("cosine", choices=("cosine", "multistep", "constant"))
    milestones: str = knob("", form="epochs",
                           help="comma-separated epochs where multistep multiplies the lr by lr_decay")
    lr_decay: float = knob(0.1, low=0.0, high=1.0)
    augment: str = knob("shift", choices=AUGMENTATIONS,
                        help="training augmentation; 'shift' = random translation by up to 1/8 of the image, "
                             "'standard' = shift + horizontal flip, 'rotate' = standard + rotation up to 15 "
                             "degrees, 'cutout' = standard + a zeroed square of half the image side, "
                             "'randaugment' / 'autoaugment' = standard + that policy (loader path only, so "
                             "not for digits), 'rrc' = RandomResizedCrop (area 8-100%, aspect 3/4-4/3) + "
                             "horizontal flip, the ImageNet standard")
    crop_size: int = knob(0, low=0, high=1024,
                          help="imagenet: side of the training crop and of the evaluation centre crop (after "
                               "resizing the shorter side to crop_size * 256/224); 0: the standard 224")
    view_augments: str = knob("", help="comma-separated augmentations, one per network view, cycling, used "
                                       "only when a method asks for per-network views; empty: every view "
                                       "uses 'augment'")
    amp: str = knob("auto", choices=("auto", "off", "bf16"),
                    help="bf16 autocast; auto = on for CUDA devices that support bf16, off elsewhere")
    channels_last: str = knob("auto", choices=("auto", "true", "false"),
                              help="channels-last memory format; auto = on for CUDA")
    loader_workers: int = knob(-1, low=-1, high=256,
                               help="data-loading processes per training process for file datasets; "
                                    "-1 picks from the CPUs this process may use")
    data_path: str = knob("auto", choices=("auto", "device", "loader"),
                          help="device: the decoded dataset lives on the training device as uint8 and "
                               "batches are index gathers with batched per-sample augmentation; loader: "
                               "DataLoader workers decode and augment one image at a time; auto: device "
                               "when every augmentation in use has a device form and the data fits")
    fused: str = knob("auto", choices=("auto", "true", "false"),
                      help="train a method's homogeneous peers as one stacked model (one forward and "
                           "backward for all); auto: off until a GPU benchmark shows it faster")
    compile: str = knob("off", choices=("off", "on"),
                        help="torch.compile the training step; off until a GPU benchmark shows a gain")
    flatness: str = knob("off", choices=("off", "final"),
                         help="final: after the last epoch's test evaluation, measure every analysis network's "
                              "Hessian trace (Hutchinson), top Hessian eigenvalue and epsilon-sharpness on a "
                              "fixed subset of the training split (logged as flat/<measure>/<network>)")
    flatness_samples: int = knob(512, low=16, high=100000,
                                 help="training samples (a seeded, fixed subset, unaugmented) the flatness "
                                      "measures use")
    flatness_probes: int = knob(8, low=1, high=10000, help="Rademacher probes of the Hutchinson trace estimate")
    flatness_rho: float = knob(0.05, low=0.0, high=10.0,
                               help="radius of the epsilon-sharpness ball in parameter space (L2, as SAM's rho)")

    def __post_init__(self) -> None:
        # Checked here so that a typo fails when the knobs are read, before any trial starts.
        for name in self.view_augment_list():
            if name not in AUGMENTATIONS:
                raise UsageError(f"knob 'view_augments': unknown augmentation '{name}'; "
                                 f"known: {', '.join(AUGMENTATIONS)}")

    def check_data_path(self) -> None:
        """``data_path=device`` needs a device form of every augmentation in use. Called on the
        recipe the data sees (``engine.data_recipe``): per-view augmentations count only for a
        method that asks for per-network views."""
        if self.data_path == "device":
            lacking = [a for a in self.augment_names() if a not in DEVICE_AUGMENTATIONS]
            if lacking:
                raise UsageError(f"knob 'data_path': the device path has no '{lacking[0]}' augmentation "
                                 f"(it has {', '.join(DEVICE_AUGMENTATIONS)}); use data_path=loader or auto")

    def augment_names(self) -> list[str]:
        """Every augmentation a run may use: ``augment`` and the per-view ones."""
        return list(dict.fromkeys([self.augment, *self.view_augment_list()]))

    def device_augmentable(self) -> bool:
        return all(a in DEVICE_AUGMENTATIONS for a in self.augment_names())

    def autocast_dtype(self, device: "torch.device") -> "torch.dtype | None":
        import torch
        if self.amp == "bf16" or (self.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return None

    def use_channels_last(self, device: "torch.device") -> bool:
        return self.channels_last == "true" or (self.channels_last == "auto" and device.type == "cuda")

    def milestone_list(self) -> list[int]:
        return [int(m) for m in self.milestones.split(",") if m.strip()]

    def view_augment_list(self) -> list[str]:
        return [v.strip() for v in self.view_augments.split(",") if v.strip()]
