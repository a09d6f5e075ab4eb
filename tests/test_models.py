"""The architecture zoo: interface, input flexibility, parameter counts, multi-branch ResNets."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from kd_platform.errors import UsageError
from kd_platform.models import build_model, build_multibranch, model_names
from kd_platform.models.resnet import RESNET_SPECS

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "resnet110_bottleneck",
    "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_20_8",
    "vgg8", "vgg13", "vgg16", "mobilenetv2", "shufflenetv1", "shufflenetv2", "densenet40_12",
}
NAMES = model_names()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_expected_architecture_is_registered() -> None:
    assert EXPECTED <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_interface_on_cifar_and_on_tiny_one_channel_inputs(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    assert model.forward(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert sys.modules[type(model).__module__].__doc__, "the module must say which definition it follows"

    gray = build_model(name, num_classes=5, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        fmap = gray.features(x)
        logits = gray(x)
    assert logits.shape == (2, 5)
    assert isinstance(gray.feature_channels, int)
    assert fmap.dim() == 4 and fmap.shape[:2] == (2, gray.feature_channels)
    torch.testing.assert_close(gray.classify(fmap), logits)


# Published parameter counts, checked the way they were published: a figure given to k
# decimals (in millions) must equal our count rounded to k decimals, i.e. be within half a
# unit of its last digit, and with the class count the figure was reported for.
#   (name, classes, figure in M, decimals, source)
PUBLISHED = [
    # Zagoruyko & Komodakis 2016, "Wide Residual Networks", Table 4 (one column for CIFAR-10/100;
    # the counts are those of the 10-class head).
    ("wrn_40_1", 10, 0.6, 1, "WRN paper, Table 4"),
    ("wrn_40_2", 10, 2.2, 1, "WRN paper, Table 4"),
    # Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation", CIFAR-100 settings table.
    ("wrn_16_2", 100, 0.70, 2, "Overhaul (Heo et al. 2019), CIFAR-100 setup (c)"),
    ("resnet56", 100, 0.86, 2, "Overhaul (Heo et al. 2019), CIFAR-100 setup (d)"),
    # CRD-benchmark figures for CIFAR-100 as tabulated across the offline-KD literature that
    # reuses RepDistiller's models (Tian et al. 2020).
    ("resnet8x4", 100, 1.23, 2, "CRD benchmark, CIFAR-100"),
    ("resnet32x4", 100, 7.43, 2, "CRD benchmark, CIFAR-100"),
    ("wrn_40_2", 100, 2.26, 2, "CRD benchmark, CIFAR-100"),
    ("wrn_40_1", 100, 0.57, 2, "CRD benchmark, CIFAR-100"),
    ("resnet32", 100, 0.47, 2, "CRD benchmark, CIFAR-100"),
    ("vgg13", 100, 9.46, 2, "CRD benchmark, CIFAR-100"),
    ("mobilenetv2", 100, 0.81, 2, "CRD benchmark, CIFAR-100"),
    ("shufflenetv1", 100, 0.95, 2, "CRD benchmark, CIFAR-100"),
    ("shufflenetv2", 100, 1.36, 2, "CRD benchmark, CIFAR-100"),
    # Huang et al. 2017, "Densely Connected Convolutional Networks", Table 2, DenseNet (L=40,
    # k=12): one column for C10/C100; 1.0M is the 10-class count (100 classes give 1.06M).
    ("densenet40_12", 10, 1.0, 1, "DenseNet paper, Table 2"),
]


@pytest.mark.parametrize("name,classes,figure,decimals,source", PUBLISHED,
                         ids=[f"{p[0]}-{p[1]}cls-{p[2]}M" for p in PUBLISHED])
def test_parameter_count_matches_published_figure(name: str, classes: int, figure: float,
                                                  decimals: int, source: str) -> None:
    count = n_params(build_model(name, classes))
    half_unit = 0.5 * 10 ** (6 - decimals)
    assert abs(count - figure * 1e6) <= half_unit, f"{name}: {count} vs {figure}M ({source})"


# He et al. 2016, Table 6 (CIFAR-10): 0.27/0.46/0.66/0.85/1.7M. Their networks use
# parameter-free zero-padding shortcuts (option A); ours, like the benchmarks', project with
# 1x1 conv + BN, so those projections are subtracted before comparing.
HE_2016 = [("resnet20", 0.27, 2), ("resnet32", 0.46, 2), ("resnet44", 0.66, 2),
           ("resnet56", 0.85, 2), ("resnet110", 1.7, 1)]


@pytest.mark.parametrize("name,figure,decimals", HE_2016, ids=[h[0] for h in HE_2016])
def test_cifar_resnets_match_he_et_al_without_projections(name: str, figure: float, decimals: int) -> None:
    model = build_model(name, 10)
    projections = sum(n_params(m) for n, m in model.named_modules()
                      if n.endswith("shortcut") and not isinstance(m, nn.Identity))
    count = n_params(model) - projections
    assert abs(count - figure * 1e6) <= 0.5 * 10 ** (6 - decimals), f"{name}: {count}"


def _bottleneck_cifar_resnet(blocks: int, width_factor: int, classes: int) -> int:
    """Closed-form count for the stem-16, planes-16/32/64, expansion-4 bottleneck ResNet."""
    total, c_in = 3 * 16 * 9 + 2 * 16, 16
    for stage, planes in enumerate((16, 32, 64)):
        width, c_out = planes * width_factor, planes * 4
        for j in range(blocks):
            total += c_in * width + 9 * width * width + width * c_out + 2 * (2 * width + c_out)
            if j == 0:  # every stage's first block changes the channel count
                total += c_in * c_out + 2 * c_out
            c_in = c_out
    return total + c_in * classes + classes


def test_online_papers_bottleneck_networks_match_their_closed_form() -> None:
    # No published count was found for these two; the closed form pins their definitions
    # (ResNet-110: [12, 12, 12] bottlenecks; WRN-20-8: [2, 2, 2] bottlenecks, 8x inner width).
    assert n_params(build_model("resnet110_bottleneck", 100)) == _bottleneck_cifar_resnet(12, 1, 100)
    assert n_params(build_model("wrn_20_8", 100)) == _bottleneck_cifar_resnet(2, 8, 100)
    assert build_model("resnet110_bottleneck", 100).feature_channels == 256
    assert build_model("wrn_20_8", 100).feature_channels == 256


def test_resnet18_matches_torchvision_count_up_to_its_small_image_stem() -> None:
    # torchvision's ImageNet ResNet-18 has 11,689,512 parameters with a 7x7 stem; ours has a
    # 3x3 stem (no max-pool) for 64x64 inputs: 64 * 3 * (49 - 9) = 7,680 fewer.
    assert n_params(build_model("resnet18", num_classes=1000)) == 11_689_512 - 7_680


def test_unknown_architecture_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        build_model("resnet9000", 10)


MULTIBRANCH_NAMES = sorted(RESNET_SPECS)


def test_every_registered_resnet_has_a_multibranch_form() -> None:
    # The CIFAR ResNets; the TinyImageNet resnet18 has four stages and no multi-branch form yet.
    resnets = {n for n in NAMES if n.startswith("resnet") and n != "resnet18"}
    assert resnets <= set(MULTIBRANCH_NAMES)


# One of each kind for the forward passes (basic, 4x wide, deep bottleneck, wide bottleneck);
# the structural checks below, which need no forward pass, cover every name.
FORWARD_NAMES = ["resnet20", "resnet8x4", "resnet110_bottleneck", "wrn_20_8"]


@pytest.mark.parametrize("name", FORWARD_NAMES)
@pytest.mark.parametrize("branches", [2, 3])
def test_multibranch_outputs(name: str, branches: int) -> None:
    torch.manual_seed(0)
    net = build_multibranch(name, num_classes=6, in_channels=1, branches=branches)
    width = net.feature_channels
    assert net.ensemble_head.in_features == branches * width

    x = torch.randn(2, 1, 8, 8)
    branch_logits, ensemble_logits = net(x)
    assert len(branch_logits) == branches
    assert all(t.shape == (2, 6) for t in branch_logits)
    assert ensemble_logits.shape == (2, 6)

    net.eval()
    with torch.no_grad():
        fmaps = net.features(x)
        eval_branch, eval_ensemble = net(x)
        again_branch, again_ensemble = net.classify(fmaps)
    assert len(fmaps) == branches and all(f.dim() == 4 and f.shape[:2] == (2, width) for f in fmaps)
    torch.testing.assert_close(again_ensemble, eval_ensemble)
    for a, b in zip(again_branch, eval_branch):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", MULTIBRANCH_NAMES)
def test_multibranch_shares_the_trunk_and_separates_the_branches(name: str) -> None:
    branches = 3
    torch.manual_seed(0)
    net = build_multibranch(name, num_classes=6, branches=branches)
    single = build_model(name, num_classes=6)
    assert net.feature_channels == single.feature_channels
    assert net.ensemble_head.in_features == branches * single.feature_channels

    # One trunk (stem + first two stages), B private last stages and heads, one ensemble head.
    trunk = n_params(single.stem) + n_params(single.layer1) + n_params(single.layer2)
    per_branch = n_params(single.layer3) + n_params(single.fc)
    assert n_params(net.trunk) == trunk
    assert n_params(net) == trunk + branches * per_branch + n_params(net.ensemble_head)

    branch_ids = [{id(p) for p in b.parameters()} for b in net.branches]
    for i in range(branches):
        for j in range(i + 1, branches):
            assert not branch_ids[i] & branch_ids[j]
    first_convs = [next(p for p in b.parameters() if p.dim() == 4) for b in net.branches]
    assert not torch.equal(first_convs[0], first_convs[1]), "branches should start from different weights"


def test_every_branch_trains_the_shared_trunk() -> None:
    net = build_multibranch("resnet8", num_classes=4, branches=2)
    trunk_conv = net.trunk[0][0].weight
    for i in range(2):
        net.zero_grad()
        branch_logits, _ = net(torch.randn(2, 3, 8, 8))
        branch_logits[i].sum().backward()
        assert trunk_conv.grad is not None and trunk_conv.grad.abs().sum() > 0
        assert all(p.grad is None or not p.grad.any()
                   for k, b in enumerate(net.branches) if k != i for p in b.parameters())


def test_multibranch_rejects_unknown_names_and_empty_ensembles() -> None:
    with pytest.raises(UsageError):
        build_multibranch("vgg8", 10)
    with pytest.raises(UsageError):
        build_multibranch("resnet20", 10, branches=0)


@pytest.mark.parametrize("arch", model_names())
def test_stage_features_are_the_forward_pass(arch):
    """Every stage is tapped in order; the last tap is what the head pools, and every tap of a
    stride-2 network halves the resolution at most once per stage."""
    torch.manual_seed(0)
    net = build_model(arch, 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    taps = net.stage_features(x)
    names = list(taps)
    assert names[-1].startswith("stage") and all(n == "stem" or n.startswith("stage") for n in names)
    assert len(names) >= 3
    last = taps[names[-1]]
    assert last.shape[1] == net.feature_channels
    torch.testing.assert_close(net.features(x), last)
    torch.testing.assert_close(net(x), net.classify(last))
    sizes = [t.shape[-1] for t in taps.values()]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] <= 32


def test_multibranch_stage_features_end_in_every_branch():
    net = build_multibranch("resnet20", 10, branches=2).eval()
    x = torch.randn(2, 3, 32, 32)
    taps = net.stage_features(x)
    assert list(taps) == ["stem", "stage1", "stage2", "stage3/branch1", "stage3/branch2"]
    for got, want in zip([taps["stage3/branch1"], taps["stage3/branch2"]], net.features(x)):
        torch.testing.assert_close(got, want)
