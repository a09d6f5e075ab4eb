"""Datasets behind one interface, registered by name (layer: data; imports only config,
errors and registry).

A :class:`DataModule` yields training batches already on the device (sharded across
data-parallel workers, every shuffle and augmentation drawn from generators derived
from ``(seed, epoch, rank)`` so a resumed run sees the same stream) and evaluation
batches for the validation and test splits. Its ``path`` says how the images get there:
``"device"`` (held on the device, augmented in whole batches, ``device_data``) or
``"loader"`` (DataLoader workers, one image at a time, ``loader_data``).
"""
from __future__ import annotations

from kd_platform.data.base import Batch, DataModule, PathNote
from kd_platform.data.registry import build_data, check_recipe, dataset_names, register_dataset

__all__ = ["Batch", "DataModule", "PathNote", "build_data", "check_recipe", "dataset_names", "register_dataset"]
