"""The architecture zoo, registered by name (layer: models; imports only errors and registry).

Every model is a :class:`~kd_platform.models.base.ZooNet`: it maps ``(N, C, H, W)`` images
of any size and channel count to logits and exposes the pieces distillation methods need:

- ``stage_features(x)``: every stage's output by name (``stem``, ``stage1``..), in order;
- ``features(x)``: the last stage's map ``(N, feature_channels, h, w)``;
- ``classify(fmap)``: pooling and the linear head, so ``forward(x) == classify(features(x))``;
- ``feature_channels``: the channel count of that map.

Adding an architecture is one ``@register_model("name")`` builder in a module of this
package; the registry (``models/registry.py``) imports every module here on first use.
"""
from __future__ import annotations

from kd_platform.models.base import ZooNet
from kd_platform.models.multibranch import build_multibranch
from kd_platform.models.registry import build_model, model_names, register_model

__all__ = ["ZooNet", "build_model", "build_multibranch", "model_names", "register_model"]
