"""Multi-branch ResNets for online distillation with peers (PCL, Wu & Gong 2021; DKEL).

Following PCL (and ONE, Lan et al. 2018, before it), the network is split after its second
stage: the stem and the first two stages form a trunk shared by all peers, and each of the
B peers (branches) owns a separately initialised copy of the last stage plus its own linear
head. The peer-ensemble teacher is a linear classifier over the concatenation of the B
pooled branch features, rather than a sum of branch logits, so it can be optimised on its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_platform.errors import UsageError
from kd_platform.models import wrn as _wrn  # noqa: F401  (registers the WRN-20-8 spec)
from kd_platform.models.base import init_weights
from kd_platform.models.resnet import RESNET_SPECS, ResNetSpec, make_stage, make_stem


class MultiBranchResNet(nn.Module):
    """Shared trunk, ``num_branches`` last stages with heads, and an ensemble head.

    ``forward(x)`` returns ``(branch_logits, ensemble_logits)``; ``features(x)`` the list of
    per-branch last-stage maps, each ``(N, feature_channels, h, w)``; and
    ``classify(fmaps)`` turns such a list into the same pair, so
    ``forward(x) == classify(features(x))``.
    """

    def __init__(self, spec: ResNetSpec, num_classes: int, in_channels: int = 3,
                 num_branches: int = 3) -> None:
        super().__init__()
        self.num_branches = num_branches
        self.trunk = nn.Sequential(make_stem(spec, in_channels), make_stage(spec, 0), make_stage(spec, 1))
        self.branches = nn.ModuleList(make_stage(spec, 2) for _ in range(num_branches))
        self.feature_channels = spec.out_channels
        self.heads = nn.ModuleList(nn.Linear(self.feature_channels, num_classes)
                                   for _ in range(num_branches))
        self.ensemble_head = nn.Linear(num_branches * self.feature_channels, num_classes)
        init_weights(self)

    def features(self, x: Tensor) -> list[Tensor]:
        shared = self.trunk(x)
        return [branch(shared) for branch in self.branches]

    def stage_features(self, x: Tensor) -> dict[str, Tensor]:
        """The trunk's stages (``stem``, ``stage1``, ``stage2``), then each branch's last stage
        as ``stage3/branch<i>`` (1-based), the maps ``features(x)`` returns."""
        out: dict[str, Tensor] = {}
        for name, stage in zip(("stem", "stage1", "stage2"), self.trunk):
            x = out[name] = stage(x)
        for i, branch in enumerate(self.branches, 1):
            out[f"stage3/branch{i}"] = branch(x)
        return out

    def classify(self, fmaps: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        pooled = [F.adaptive_avg_pool2d(f, 1).flatten(1) for f in fmaps]
        branch_logits = [head(p) for head, p in zip(self.heads, pooled)]
        return branch_logits, self.ensemble_head(torch.cat(pooled, 1))

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        return self.classify(self.features(x))


def multibranch_names() -> list[str]:
    """Architectures :func:`build_multibranch` accepts."""
    return sorted(RESNET_SPECS)


def build_multibranch(name: str, num_classes: int, in_channels: int = 3,
                      branches: int = 3) -> MultiBranchResNet:
    """A PCL-style multi-branch form of ResNet ``name``: shared stem and first two stages,
    ``branches`` separate last stages with their own heads, and a linear ensemble head over
    the concatenated pooled branch features. ``forward`` returns ``(branch_logits, ensemble)``."""
    if name not in RESNET_SPECS:
        raise UsageError(f"no multi-branch form of '{name}'; known: {', '.join(multibranch_names())}")
    if branches < 1:
        raise UsageError(f"a multi-branch network needs at least one branch, got {branches}")
    return MultiBranchResNet(RESNET_SPECS[name], num_classes, in_channels, branches)
