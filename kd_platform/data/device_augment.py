"""Batched, per-sample augmentation of ``uint8`` images on the training device: the device
path's forms of ``none``, ``shift``, ``standard``, ``rotate``, ``cutout`` and ``rrc``, with the
semantics of :func:`kd_platform.data.augment.build_pipeline`. ``rrc`` (RandomResizedCrop)
resizes one image at a time (``imagenet_augment``): its boxes go back to the host once a batch.

Shift, flip and rotation are one coordinate map per sample: every output pixel is read
from one source pixel of the zero-padded batch, so a whole batch is one ``gather`` with no
Python loop over samples and no float copy of the images. Rotation is nearest-neighbour,
so mapping coordinates (rather than resampling a float image) gives the same pixels, and
a pixel that any step moves outside the image reads the padding, i.e. the zero fill.

The per-sample parameters are drawn on the CPU from a caller's generator, for a whole
epoch at once, and moved to the device once: no step waits for the host, and CPU and GPU
runs see the same stream. Cosines and sines are taken on the CPU too, so the device does
only exact integer-valued arithmetic plus one rounding per coordinate.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_platform.config.recipe import DEVICE_AUGMENTATIONS
from kd_platform.data.augment import ROTATION_DEGREES, cutout_size, shift_padding
from kd_platform.data.imagenet_augment import crop_boxes, draw_crops, train_crops
from kd_platform.errors import UsageError

Params = dict[str, Tensor]

STEPS: dict[str, tuple[str, ...]] = {
    "none": (),
    "shift": ("shift",),
    "standard": ("shift", "flip"),
    "rotate": ("shift", "flip", "rotate"),
    "cutout": ("shift", "flip", "cutout"),
    "rrc": ("rrc",),  # RandomResizedCrop + flip, one image at a time (imagenet_augment)
}


class BatchAugment:
    """One named augmentation for square ``image_size`` images; ``fill`` is the colour cutout
    paints, in stored intensities (``augment.mean_colour``)."""

    def __init__(self, name: str, image_size: int, fill: Sequence[int]) -> None:
        if name not in STEPS:
            raise UsageError(f"the device data path has no '{name}' augmentation "
                             f"(it has {', '.join(DEVICE_AUGMENTATIONS)})")
        self.name, self.steps, self.size = name, STEPS[name], image_size
        self.pad, self.cut = shift_padding(image_size), cutout_size(image_size)
        self.fill = torch.tensor(list(fill), dtype=torch.uint8).view(1, -1, 1, 1)
        self._fills: dict[torch.device, Tensor] = {}

    def draw(self, n: int, g: torch.Generator) -> Params:
        """Parameters of ``n`` samples, on the CPU, drawn from ``g`` in a fixed order."""
        p: Params = {}
        for step in self.steps:
            if step == "shift":
                p["dy"] = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
                p["dx"] = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            elif step == "flip":
                p["flip"] = torch.rand(n, generator=g) < 0.5
            elif step == "rotate":
                rad = torch.empty(n, dtype=torch.float64).uniform_(-ROTATION_DEGREES, ROTATION_DEGREES,
                                                                   generator=g) * (math.pi / 180)
                p["cos"], p["sin"] = torch.cos(rad).float(), torch.sin(rad).float()
            elif step == "rrc":
                u, p["flip"] = draw_crops(n, g)
                p["box"] = crop_boxes(torch.tensor([[self.size, self.size]]).expand(n, 2), u)
            elif step == "cutout":
                p["cy"] = torch.randint(0, self.size, (n,), generator=g)
                p["cx"] = torch.randint(0, self.size, (n,), generator=g)
        return p

    def __call__(self, batch: Tensor, p: Params) -> Tensor:
        """``batch`` ``uint8 (B, C, H, W)`` augmented with the parameters ``p`` of its samples
        (on the batch's device)."""
        if "box" in p:
            return train_crops(batch.unbind(0), p["box"], p["flip"], self.size)
        out = self._warp(batch, p) if "dy" in p else batch
        return self._cutout(out, p["cy"], p["cx"]) if "cy" in p else out

    def _warp(self, batch: Tensor, p: Params) -> Tensor:
        b, c, h, w = batch.shape
        padded = F.pad(batch, (self.pad, self.pad, self.pad, self.pad))
        pos = self._source_positions(p, h, w).reshape(b, 1, h * w).expand(b, c, h * w)
        return padded.view(b, c, -1).gather(2, pos).view(b, c, h, w)

    def _source_positions(self, p: Params, h: int, w: int) -> Tensor:
        """``(B, H, W)``: for every output pixel, its flat position in the padded batch.

        Walks the pipeline backwards: the rotation's output pixel comes from a pixel of the
        flipped image, which comes from a mirrored pixel of the crop, which is the padded
        image offset by the sample's shift."""
        b, device = len(p["dy"]), p["dy"].device
        y = torch.arange(h, device=device).view(1, h, 1)
        x = torch.arange(w, device=device).view(1, 1, w)
        inside = None
        if "cos" in p:
            y, x, inside = _rotated_source(p["cos"].view(b, 1, 1), p["sin"].view(b, 1, 1), h, w)
        if "flip" in p:
            x = torch.where(p["flip"].view(b, 1, 1), w - 1 - x, x)
        pos = (y + p["dy"].view(b, 1, 1)) * (w + 2 * self.pad) + x + p["dx"].view(b, 1, 1)
        # Position 0 is the padding's corner: zero, whatever the shift.
        return pos.expand(b, h, w) if inside is None else torch.where(inside, pos, 0)

    def _cutout(self, batch: Tensor, cy: Tensor, cx: Tensor) -> Tensor:
        """The ``cut`` x ``cut`` square centred on ``(cy, cx)`` painted ``fill`` (clipped to
        the image where it hangs over the border)."""
        b, _, h, w = batch.shape
        half = self.cut // 2
        rows = _within(torch.arange(h, device=batch.device), (cy - half).view(b, 1), self.cut)
        cols = _within(torch.arange(w, device=batch.device), (cx - half).view(b, 1), self.cut)
        mask = (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
        return torch.where(mask, self._fill(batch.device), batch)

    def _fill(self, device: torch.device) -> Tensor:
        if device not in self._fills:
            self._fills[device] = self.fill.to(device)
        return self._fills[device]


def _within(coords: Tensor, start: Tensor, length: int) -> Tensor:
    return (coords >= start) & (coords < start + length)


def _rotated_source(cos: Tensor, sin: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest source pixel ``(y, x)`` of every output pixel of a counter-clockwise rotation
    about the image centre (as ``torchvision``'s ``rotate``), and whether it lies inside."""
    cy, cx = (h - 1) / 2, (w - 1) / 2
    v = torch.arange(h, device=cos.device, dtype=torch.float32).view(1, h, 1) - cy
    u = torch.arange(w, device=cos.device, dtype=torch.float32).view(1, 1, w) - cx
    # The inverse map: image rows grow downwards, so a visual counter-clockwise turn by a
    # reads its output at (u, v) from (u cos a - v sin a, u sin a + v cos a).
    sx = torch.round(u * cos - v * sin + cx).long()
    sy = torch.round(u * sin + v * cos + cy).long()
    inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    return sy, sx, inside
