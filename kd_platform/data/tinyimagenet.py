"""TinyImageNet (the Stanford CS231n subset of ImageNet): 200 classes of 64x64 JPEGs, 500
training and 50 validation images per class, in the layout of ``tiny-imagenet-200.zip``::

    tiny-imagenet-200/wnids.txt                      one WordNet id per line (the classes)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG
    tiny-imagenet-200/val/images/*.JPEG
    tiny-imagenet-200/val/val_annotations.txt        file <tab> wnid <tab> bounding box

``data_dir`` may name ``tiny-imagenet-200`` itself or the directory holding it. Nothing is
downloaded. The official test images carry no labels, so, as in the distillation papers,
the official validation set is the test split, and our validation split is a stratified,
seeded ``val_fraction`` of the training images. Class ``i`` is the ``i``-th WordNet id in
sorted order, as a folder-per-class reader would number them.

On the loader path images are decoded in the loader workers; on the device path all of
them are decoded once into one array cached under ``tiny-imagenet-200/.kd_decoded/`` (or
``~/.cache/kd_platform/decoded/`` when the data directory is read-only; see ``sources``).
Either way a file that does not decode stops the run with a one-line error naming it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.transforms import v2

from kd_platform.config.recipe import Recipe
from kd_platform.data.base import DataModule
from kd_platform.data.data_path import build_file_data
from kd_platform.data.registry import register_dataset
from kd_platform.data.sources import CACHE_FOLDER, FileSource, data_root
from kd_platform.data.split import Split, split_train
from kd_platform.errors import UsageError

IMAGE_SIZE = 64
FOLDER = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg")
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)


def find_base(root: Path) -> Path:
    for base in (root, root / FOLDER):
        if (base / "wnids.txt").is_file():
            return base
    raise UsageError(f"TinyImageNet not found in {root}: expected {root / FOLDER / 'wnids.txt'} "
                     f"(extract tiny-imagenet-200.zip there)")


def read_wnids(base: Path) -> list[str]:
    path = base / "wnids.txt"
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise UsageError(f"corrupt TinyImageNet file {path}: expected distinct WordNet ids, one per line")
    return sorted(wnids)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"TinyImageNet: directory {folder} is missing")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def list_train(base: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        found = _images_in(base / "train" / wnid / "images")
        if not found:
            raise UsageError(f"TinyImageNet: no images in {base / 'train' / wnid / 'images'}")
        paths += [str(p) for p in found]
        labels += [label] * len(found)
    return paths, labels


def list_val(base: Path, wnids: list[str]) -> tuple[list[str], list[int]]:
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UsageError(f"TinyImageNet: file {ann} is missing")
    present = {p.name for p in _images_in(base / "val" / "images")}
    index = {w: i for i, w in enumerate(wnids)}
    paths, labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or fields[1].strip() not in index:
            raise UsageError(f"corrupt TinyImageNet file {ann}: line {n} names no known class")
        name = fields[0].strip()
        if name not in present:
            raise UsageError(f"TinyImageNet: {ann} line {n} names {base / 'val' / 'images' / name}, which is missing")
        paths.append(str(base / "val" / "images" / name))
        labels.append(index[fields[1].strip()])
    if not paths:
        raise UsageError(f"corrupt TinyImageNet file {ann}: no annotations")
    return paths, labels


@register_dataset("tinyimagenet")
def build_tinyimagenet(recipe: Recipe, seed: int, device: torch.device, rank: int, world: int) -> DataModule:
    base = find_base(data_root(recipe))
    wnids = read_wnids(base)
    train_paths, train_labels = list_train(base, wnids)
    test_paths, test_labels = list_val(base, wnids)
    # One source for both splits: the device path decodes (and caches) one array.
    source = FileSource(train_paths + test_paths, IMAGE_SIZE, cache_dir=base / CACHE_FOLDER)
    n_train = len(train_paths)
    train = Split(source, torch.arange(n_train), torch.tensor(train_labels))
    test = Split(source, torch.arange(n_train, n_train + len(test_paths)), torch.tensor(test_labels))
    splits = {**split_train(train, recipe.val_fraction, seed), "test": test}
    return build_file_data(recipe.dataset, splits, len(wnids), IMAGE_SIZE, MEAN, STD, recipe, seed, device,
                           rank, world, policy=v2.AutoAugmentPolicy.IMAGENET)
