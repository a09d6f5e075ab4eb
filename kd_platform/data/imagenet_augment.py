"""The ImageNet transforms in their batched, per-sample form, and JPEG decoding in batches.

Training: RandomResizedCrop (area 8%-100% of the image, aspect ratio 3/4-4/3, ten tries and
then a centre crop, as torchvision's) to ``size`` and a horizontal flip. Evaluation: the
shorter side resized to ``size * 256 / 224`` (256 for 224) and a centre crop of ``size``.

Images of a batch differ in size, so the crop boxes are worked out on the host from each
image's shape (the random draws themselves come for a whole epoch from a caller's
generator, so a run's stream depends only on its seed), and each image is cropped and
resized on its own device; the outputs stack into one ``uint8 (B, 3, size, size)`` batch.
The same code serves a CPU run, where the loader path is usually faster, and the tests.

:func:`decode_batch` decodes a batch of JPEG files on the device with
``torchvision.io.decode_jpeg`` (nvJPEG on a GPU). A few ImageNet files are not what the
GPU decoder takes (CMYK JPEGs, a PNG named ``.JPEG``): a header check sends those through
PIL on the host, and a file nothing can decode is a one-line error naming it. Where the
device decoder raises on files its header check accepted, they go through PIL too: counted
in :data:`DECODED` and logged once, so a run never claims device decoding it did not do.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from kd_platform.data.sources import read_image

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
TRIES = 10
EVAL_RESIZE = 256 / 224
# Start-of-frame markers of baseline and extended/progressive Huffman JPEGs, the ones
# torchvision's GPU decoder handles (with one or three colour components).
_DEVICE_SOF = (0xC0, 0xC1, 0xC2)
_ANY_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

log = logging.getLogger(__name__)

DECODED: Counter[str] = Counter()
"""Files this process decoded, by how: ``device`` (``decode_jpeg`` on the device), ``pil_header``
(sent to PIL by the header check) and ``pil_after_error`` (the device decoder raised)."""


def eval_resize(size: int) -> int:
    """The shorter side before the evaluation centre crop: 256 for 224."""
    return int(round(size * EVAL_RESIZE))


def draw_crops(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform draws for ``n`` samples' crops ``(n, TRIES, 4)`` and their flips ``(n,)``, on the CPU."""
    return torch.rand(n, TRIES, 4, generator=g, dtype=torch.float64), torch.rand(n, generator=g) < 0.5


def crop_boxes(sizes: Tensor, u: Tensor) -> Tensor:
    """``(B, 4)`` boxes ``(top, left, height, width)`` of RandomResizedCrop for images of
    ``sizes`` ``(B, 2)`` (height, width) from the draws ``u`` (``draw_crops``): the first of
    the tries whose box fits, else the centre crop clamped to the ratio range."""
    h_img, w_img = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = h_img * w_img * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[..., 0])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    top = torch.floor(u[..., 2] * (h_img - h + 1))
    left = torch.floor(u[..., 3] * (w_img - w + 1))
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # 0 when none fits: masked below
    pick = [t.gather(1, first).squeeze(1) for t in (top, left, h, w)]
    # No try fitted: the whole image, cut to the nearest allowed aspect ratio, centred.
    ratio = (w_img / h_img).squeeze(1)
    fw = torch.where(ratio > RATIO[1], torch.round(h_img.squeeze(1) * RATIO[1]), w_img.squeeze(1))
    fh = torch.where(ratio < RATIO[0], torch.round(w_img.squeeze(1) / RATIO[0]), h_img.squeeze(1))
    fallback = [torch.div(h_img.squeeze(1) - fh, 2, rounding_mode="floor"),
                torch.div(w_img.squeeze(1) - fw, 2, rounding_mode="floor"), fh, fw]
    any_fit = fits.any(dim=1)
    return torch.stack([torch.where(any_fit, p, f) for p, f in zip(pick, fallback)], dim=1).long()


def train_crops(images: Sequence[Tensor], boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """``images`` (``uint8 (3, h_i, w_i)`` on one device) cropped to ``boxes``, resized to
    ``size`` x ``size`` (bilinear, antialiased) and flipped where ``flips``: ``(B, 3, size, size)``."""
    out = torch.stack([TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
                       for img, (top, left, h, w) in zip(images, boxes.tolist())])
    flips = flips.to(out.device).view(-1, 1, 1, 1)
    return torch.where(flips, out.flip(-1), out)


def eval_crop(img: Tensor, size: int) -> Tensor:
    """One image's evaluation view: the shorter side resized to :func:`eval_resize`, centre crop ``size``."""
    return TF.center_crop(TF.resize(img, [eval_resize(size)], antialias=True), [size, size])


def eval_crops(images: Sequence[Tensor], size: int) -> Tensor:
    return torch.stack([eval_crop(img, size) for img in images])


def device_decodable(data: bytes | Tensor) -> bool:
    """Whether a file's header says the GPU decoder takes it: a JPEG (not a PNG named
    ``.JPEG``) whose frame is Huffman-coded with one or three components (not CMYK)."""
    raw = data[:65536].numpy().tobytes() if isinstance(data, Tensor) else data[:65536]
    if raw[:2] != b"\xff\xd8":
        return False
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return False
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(raw[pos + 2:pos + 4], "big")
        if marker in _ANY_SOF:
            components = raw[pos + 9] if pos + 9 < len(raw) else 0
            return marker in _DEVICE_SOF and components in (1, 3)
        pos += 2 + length
    return False


def decode_batch(files: Sequence[Tensor], paths: Sequence[str], device: torch.device,
                 on_device: Sequence[bool] | None = None) -> list[Tensor]:
    """The files' bytes (``uint8`` 1-D tensors on the CPU) decoded to RGB ``uint8 (3, h, w)``
    on ``device``: those ``on_device`` says the device decoder takes in one batched call,
    the rest through PIL on the host (``paths`` name the files, for errors)."""
    flags = list(on_device) if on_device is not None else [device_decodable(f) for f in files]
    out: list[Tensor | None] = [None] * len(files)
    batch = [i for i, ok in enumerate(flags) if ok]
    if batch:
        try:
            decoded = decode_jpeg([files[i] for i in batch], mode=ImageReadMode.RGB, device=device)
            DECODED["device"] += len(batch)
        except RuntimeError:
            decoded = [_decode_one(files[i], paths[i], device) for i in batch]  # find the file that failed
        for i, img in zip(batch, decoded):
            out[i] = img
    for i, ok in enumerate(flags):
        if not ok:
            out[i] = read_image(paths[i], None).to(device)
            DECODED["pil_header"] += 1
    return out  # type: ignore[return-value]


def _decode_one(data: Tensor, path: str, device: torch.device) -> Tensor:
    try:
        img = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        DECODED["device"] += 1
        return img
    except RuntimeError as err:
        if not DECODED["pil_after_error"]:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            log.warning("decode_jpeg on %s failed (%s); such files are decoded with PIL on the host", device, first)
        DECODED["pil_after_error"] += 1
        return read_image(path, None).to(device)  # PIL decodes what it can, or names the file
