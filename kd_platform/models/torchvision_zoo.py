"""torchvision's ImageNet networks in the zoo: ``tv_resnet18``, ``tv_resnet34``, ``tv_resnet50``
and ``tv_mobilenet_v2`` (the ``tv_`` prefix keeps them apart from the CIFAR-stem ``resnet18``
and ``mobilenetv2``), and their published weights as teachers.

Each is torchvision's own network with its layers held under torchvision's names, so that
torchvision's state_dicts, the published weights included, load as they are; the zoo's
stages are read off those layers: a ResNet's ``stem`` ends at the 56x56 map of a 224 input
(after the max-pool) and ``stage1``..``stage4`` are its ``layer1``..``layer4``; MobileNetV2's
stem ends at 112x112 and its stages at 56, 28, 14 and 7 (the last with the 1280-channel conv).

A teacher of an ``imagenet`` run is never trained by a run: it is the user's
``--teacher-checkpoint`` or the weights torchvision publishes for its architecture
(``IMAGENET1K_V1``, those the distillation papers start from: resnet34 73.31 top-1,
resnet50 76.13, mobilenet_v2 71.88), read from the torch hub cache
(``$TORCH_HOME/hub/checkpoints``) or downloaded into it.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models as tvm

from kd_platform.errors import UsageError
from kd_platform.models.base import Stage, ZooNet, split_sequential
from kd_platform.models.registry import register_model

log = logging.getLogger(__name__)

PUBLISHED_DATASET = "imagenet"
PUBLISHED = "published"
"""A teacher's ``teacher.source`` when it is torchvision's published weights."""
WEIGHTS: dict[str, Any] = {
    "tv_resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1,
    "tv_resnet34": tvm.ResNet34_Weights.IMAGENET1K_V1,
    "tv_resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1,
    "tv_mobilenet_v2": tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
}


def _first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """``conv``, or a fresh one like it for inputs of another channel count."""
    if in_channels == conv.in_channels:
        return conv
    kernel, stride, padding = (cast(tuple[int, int], t) for t in (conv.kernel_size, conv.stride, conv.padding))
    return nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding, bias=False)


class TorchvisionResNet(ZooNet):
    """torchvision's ResNet; stem = conv1, bn1, relu, maxpool."""

    _LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc")

    def __init__(self, net: tvm.ResNet, in_channels: int = 3) -> None:
        super().__init__()
        for name in self._LAYERS:
            setattr(self, name, getattr(net, name))
        self.conv1 = _first_conv(net.conv1, in_channels)
        self.feature_channels = net.fc.in_features

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> Iterator[tuple[str, Stage]]:
        layers = [cast(Stage, getattr(self, f"layer{i}")) for i in range(1, 5)]
        return iter([("stem", self._stem), *((f"stage{i}", layer) for i, layer in enumerate(layers, 1))])


class TorchvisionMobileNetV2(ZooNet):
    """torchvision's MobileNetV2. Its body is registered under torchvision's name ``features``,
    which ``ZooNet.features`` (a method) shadows as an attribute, hence ``body``; its head is
    ``classifier`` (dropout 0.2, then the linear layer ``fc``)."""

    # features[i]: stride-2 stem and the t=1 block (112x112), then 24, 32, 64+96, 160+320+1280 channels.
    _ENDS, _NAMES = [2, 4, 7, 14, 19], ["stem", "stage1", "stage2", "stage3", "stage4"]

    def __init__(self, net: tvm.MobileNetV2, in_channels: int = 3) -> None:
        super().__init__()
        self._modules["features"] = net.features  # add_module refuses a name the class defines
        self.classifier = net.classifier
        first = self.body[0][0]
        self.body[0][0] = _first_conv(first, in_channels)
        self.feature_channels = net.last_channel

    @property
    def body(self) -> nn.Sequential:
        return self._modules["features"]  # type: ignore[return-value]

    @property
    def fc(self) -> nn.Linear:  # type: ignore[override]
        return cast(nn.Linear, self.classifier[1])

    def stages(self) -> Iterator[tuple[str, Stage]]:
        return split_sequential(self.body, self._ENDS, self._NAMES)

    def classify(self, fmap: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(fmap, 1).flatten(1))


def _register(name: str, make: Callable[..., nn.Module], wrap: Callable[..., ZooNet]) -> None:
    @register_model(name)
    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        # torchvision's own initialisation (zero-initialised last BN off, as its reference recipe).
        return wrap(make(weights=None, num_classes=num_classes), in_channels)


for _name, _make in (("tv_resnet18", tvm.resnet18), ("tv_resnet34", tvm.resnet34), ("tv_resnet50", tvm.resnet50)):
    _register(_name, _make, TorchvisionResNet)
_register("tv_mobilenet_v2", tvm.mobilenet_v2, TorchvisionMobileNetV2)


def hub_file(arch: str) -> Path:
    """Where the torch hub cache keeps ``arch``'s published weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(WEIGHTS[arch].url).name


def published_weights(arch: str) -> tuple[Path | None, str]:
    """``arch``'s published weights in the hub cache, downloaded there first if missing,
    and, when there are none, why."""
    if arch not in WEIGHTS:
        return None, f"torchvision publishes no weights for '{arch}' (it does for {', '.join(WEIGHTS)})"
    path = hub_file(arch)
    if path.is_file():
        return path, ""
    url = WEIGHTS[arch].url
    prefix = re.search(r"-([a-f0-9]+)\.", path.name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s's published weights from %s", arch, url)
        torch.hub.download_url_to_file(url, str(path), prefix.group(1) if prefix else None, progress=False)
    except Exception as exc:  # noqa: BLE001 - no network, a proxy, a bad hash: all mean "not available"
        return None, f"they are not in the torch hub cache ({path}) and could not be downloaded ({exc})"
    return path, ""


def published_teacher(dataset: str, arch: str) -> Path | None:
    """The published weights that are ``arch``'s teacher state on ``dataset``; None where a
    teacher is trained and cached as usual (any dataset but ImageNet). An ImageNet teacher
    without them is a one-line error: training one from scratch inside a run would take days."""
    if dataset != PUBLISHED_DATASET:
        return None
    path, why = published_weights(arch)
    if path is None:
        raise UsageError(f"no teacher '{arch}' for imagenet: {why}; pass --teacher-checkpoint "
                         "(an ImageNet teacher is never trained inside a run)")
    return path



def check_published_teacher(spec: Any) -> None:
    """Fail now, before any run exists, when ``spec`` (a ``RunSpec`` of an offline method
    without ``--teacher-checkpoint``) is an ImageNet run whose teacher has no published weights."""
    recipe, cfg = spec.resolved()
    published_teacher(recipe.dataset, cfg.teacher_arch)
