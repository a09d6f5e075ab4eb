"""ImageNet (ILSVRC-2012, 1000 classes) in the ImageFolder layout that torchvision's
``ImageNet`` and most preparation scripts produce::

    <data_dir>/train/<wnid>/*.JPEG     1.28 million training images
    <data_dir>/val/<wnid>/*.JPEG       the 50,000 official validation images, one folder per class

``data_dir`` may name that folder or the directory holding it as ``imagenet/``. Nothing is
downloaded. As in the distillation papers, the official validation set is the test split,
and our validation split is a stratified, seeded ``val_fraction`` of the training images.
Class ``i`` is the ``i``-th training folder in sorted order (torchvision's numbering, so
published weights predict our labels).

Training views are RandomResizedCrop + flip (augment ``rrc``, the only one that suits
images of every size); evaluation views resize the shorter side to 256 and take the
centre 224 (``crop_size`` scales both). The images are far too many to hold decoded, so
the two data paths differ from the other datasets' (knob ``data_path``):

- ``device``: loader workers only read each file's bytes; a batch is decoded on the
  training device (nvJPEG on a GPU) and cropped, resized and flipped there, one sample at
  a time (``imagenet_augment``). The default on a GPU.
- ``loader``: loader workers decode with PIL and crop (torchvision's transforms), the
  usual PyTorch ImageNet pipeline. The default on the CPU, where decoding in several
  worker processes beats decoding in the training process.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kd_platform.config.recipe import Recipe
from kd_platform.data.augment import Normaliser, view_pipeline_names
from kd_platform.data.base import Batch, DataModule, PathNote
from kd_platform.data.imagenet_augment import (
    crop_boxes,
    decode_batch,
    device_decodable,
    draw_crops,
    eval_crop,
    eval_crops,
    train_crops,
)
from kd_platform.data.loader_data import LoaderDataModule, _guarded, default_workers
from kd_platform.data.registry import register_dataset
from kd_platform.data.sources import FileSource, data_root, read_image
from kd_platform.data.split import (
    EVAL_BATCH_SIZE,
    EvalSplits,
    Split,
    batches_per_epoch,
    epoch_order,
    fixed_subset,
    generator,
    split_train,
)
from kd_platform.errors import UsageError

FOLDER = "imagenet"
IMAGE_SIZE = 224
IMAGE_SUFFIXES = (".jpeg", ".jpg")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AUGMENT = "rrc"


def find_base(root: Path) -> Path:
    for base in (root, root / FOLDER):
        if (base / "train").is_dir() and (base / "val").is_dir():
            return base
    raise UsageError(f"ImageNet not found in {root}: expected {root / 'train'}/<wnid>/*.JPEG and "
                     f"{root / 'val'}/<wnid>/*.JPEG (the ImageFolder layout)")


def _class_folders(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def list_split(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Paths and labels of one split folder, and its classes. ``classes`` (train's) numbers
    the labels of val, whose folders must be among them; train's own folders number train's."""
    found = _class_folders(folder)
    if not found:
        loose = _images_in(folder)
        hint = (f"; its {len(loose)} images sit directly in it: sort them into <wnid>/ folders "
                "(e.g. with the devkit's ground truth)") if loose else ""
        raise UsageError(f"ImageNet: no class folders in {folder}{hint}")
    classes = classes or found
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for name in found:
        if name not in index:
            raise UsageError(f"ImageNet: {folder / name} is not a class of the training set")
        images = _images_in(folder / name)
        if not images:
            raise UsageError(f"ImageNet: no images in {folder / name}")
        paths += images
        labels += [index[name]] * len(images)
    return paths, labels, classes


class ImageFiles:
    """The loader path's images: one file per sample decoded by PIL, at its own size (the
    training pipeline crops it) or as its evaluation view (``eval_view``)."""

    def __init__(self, paths: Sequence[str], crop: int, eval_view: bool) -> None:
        self.paths, self.crop, self.eval_view = paths, crop, eval_view
        self.shape = (3, crop, crop)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Tensor:
        img = read_image(self.paths[i], None)
        return eval_crop(img, self.crop) if self.eval_view else img

    def decoded(self) -> Tensor:
        raise NotImplementedError("ImageNet is never held decoded: its device path decodes batches")


def check_imagenet(recipe: Recipe) -> None:
    lacking = [a for a in recipe.augment_names() if a != AUGMENT]
    if lacking:
        knob = "augment" if recipe.augment != AUGMENT else "view_augments"
        raise UsageError(f"knob '{knob}': imagenet takes augmentation '{AUGMENT}' (RandomResizedCrop + flip), "
                         f"not '{lacking[0]}'")


def choose_path(recipe: Recipe, device: torch.device) -> tuple[str, str]:
    if recipe.data_path != "auto":
        return recipe.data_path, f"data_path={recipe.data_path}"
    if device.type == "cuda":
        return "device", f"JPEGs are decoded in batches on {device}"
    return "loader", f"JPEGs are decoded by loader processes: the training device is {device.type}"


@register_dataset("imagenet", check=check_imagenet)
def build_imagenet(recipe: Recipe, seed: int, device: torch.device, rank: int, world: int) -> DataModule:
    base = find_base(data_root(recipe))
    train_paths, train_labels, classes = list_split(base / "train")
    test_paths, test_labels, _ = list_split(base / "val", classes)
    crop = recipe.crop_size or IMAGE_SIZE
    path, reason = choose_path(recipe, device)
    train_files, test_files = ImageFiles(train_paths, crop, False), ImageFiles(test_paths, crop, True)
    train = Split(train_files, torch.arange(len(train_paths)), torch.tensor(train_labels))
    splits = split_train(train, recipe.val_fraction, seed)
    # Validation is held out of train's files but seen as evaluation views.
    eval_train = ImageFiles(train_paths, crop, True)
    splits = {k: Split(eval_train, s.indices, s.labels) if k == "val" else s for k, s in splits.items()}
    splits["test"] = Split(test_files, torch.arange(len(test_paths)), torch.tensor(test_labels))
    args = (splits, len(classes), crop, recipe, seed, device, rank, world, reason)
    return ImageNetDeviceData(*args) if path == "device" else ImageNetLoaderData(*args)


class ImageNetLoaderData(LoaderDataModule):
    """The loader path: :class:`LoaderDataModule` with the training split decoded at full
    size for the ``rrc`` pipeline and the evaluation splits as evaluation views."""

    def __init__(self, splits: dict[str, Split], num_classes: int, crop: int, recipe: Recipe, seed: int,
                 device: torch.device, rank: int, world: int, reason: str) -> None:
        super().__init__("imagenet", splits, num_classes, crop, MEAN, STD, recipe, seed, device, rank, world,
                         reason=reason)

    def train_eval_batches(self, n: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        data = self.splits["train"]
        views = ImageFiles(cast(FileSource, data.source).paths, self.image_size, True)
        pick = fixed_subset(len(data), n, seed)
        for start in range(0, len(pick), EVAL_BATCH_SIZE):
            pos = pick[start:start + EVAL_BATCH_SIZE]
            x = torch.stack([views.image(int(data.indices[p])) for p in pos])
            yield self._to_device(x), data.labels[pos].to(self.device)


class _FileBytes(Dataset):
    """File ``i`` as its bytes and whether the device decoder takes it (read in a loader worker)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[bytes, bool, int]:
        try:
            with open(self.paths[i], "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise UsageError(f"image file {self.paths[i]} cannot be read: {err.strerror}") from None
        return data, device_decodable(data), i


def _packed(items: list[tuple[bytes, bool, int]]) -> tuple[Tensor, list[int], list[bool], list[int]]:
    """A batch of files as ONE byte tensor with their lengths: a tensor per file would cost a
    shared-memory file descriptor each on its way out of the worker."""
    joined = b"".join(d for d, _, _ in items)
    flat = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
    return flat, [len(d) for d, _, _ in items], [ok for _, ok, _ in items], [i for _, _, i in items]


class _Listed:
    """A batch sampler replaying the batches of file indices it was last given."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


class ImageNetDeviceData:
    """The device path: files read as bytes by loader workers, every batch decoded, cropped,
    resized and flipped on ``device``. The epoch's order and the training views' crops and
    flips depend only on ``(seed, epoch, rank)`` (the order is ``split.epoch_order``, view
    ``v``'s draws come from ``generator(seed, epoch, rank, v)``), as on the other datasets."""

    in_channels = 3
    path = "device"

    def __init__(self, splits: dict[str, Split], num_classes: int, crop: int, recipe: Recipe, seed: int,
                 device: torch.device, rank: int, world: int, reason: str) -> None:
        self.splits, self.num_classes, self.image_size = splits, num_classes, crop
        self.note = PathNote("imagenet", self.path, reason)
        self.device, self.seed, self.rank, self.world = device, seed, rank, world
        self.batch_size = max(1, recipe.batch_size // world)
        self.augment, self.view_augments = recipe.augment, recipe.view_augment_list()
        self._evals = EvalSplits("imagenet", splits)
        self.val_is_test = self._evals.val_is_test
        self.normalise = Normaliser(MEAN, STD)
        workers = default_workers(world) if recipe.loader_workers < 0 else recipe.loader_workers
        self.workers, self._pin = workers, device.type == "cuda"
        self._train_batches = _Listed()
        self._train = self._loader(splits["train"], self._train_batches, persistent=True)

    def _loader(self, split: Split, batches: _Listed, persistent: bool) -> DataLoader:
        paths = cast(FileSource, split.source).paths
        return DataLoader(_FileBytes(paths), batch_sampler=batches, collate_fn=_packed,
                          num_workers=self.workers, pin_memory=self._pin,
                          persistent_workers=persistent and self.workers > 0)

    def _decoded(self, packed: tuple[Tensor, list[int], list[bool], list[int]], paths: Sequence[str]) -> list[Tensor]:
        flat, lengths, on_device, files = packed
        return decode_batch(list(flat.split(lengths)), [paths[i] for i in files], self.device, on_device)

    def steps_per_epoch(self) -> int:
        return batches_per_epoch(len(self.splits["train"]), self.batch_size, self.world)

    def train_batches(self, epoch: int, num_views: int) -> Iterator[Batch]:
        self.note.log_once()
        split, bs = self.splits["train"], self.batch_size
        order = epoch_order(len(split), self.seed, epoch, self.rank, self.world)
        steps = self.steps_per_epoch()
        files = split.indices[order]
        self._train_batches.batches = [files[b * bs:(b + 1) * bs].tolist() for b in range(steps)]
        # Every view is 'rrc' (check_imagenet): only the draws differ between views.
        views = len(view_pipeline_names(self.augment, self.view_augments, num_views))
        draws = [draw_crops(len(order), generator(self.seed, epoch, self.rank, v)) for v in range(views)]
        for b, items in enumerate(_guarded(self._train)):
            images = self._decoded(items, cast(FileSource, split.source).paths)
            sizes = torch.tensor([tuple(img.shape[-2:]) for img in images])
            part = slice(b * bs, b * bs + len(images))
            x = [self.normalise(train_crops(images, crop_boxes(sizes, u[part]), flip[part], self.image_size))
                 for u, flip in draws]
            yield Batch(x, split.labels[order[part]].to(self.device))

    def _eval_views(self, split: Split, positions: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        batches = _Listed()
        batches.batches = [split.indices[positions[s:s + EVAL_BATCH_SIZE]].tolist()
                           for s in range(0, len(positions), EVAL_BATCH_SIZE)]
        for b, items in enumerate(_guarded(self._loader(split, batches, persistent=False))):
            pos = positions[b * EVAL_BATCH_SIZE:(b + 1) * EVAL_BATCH_SIZE]
            x = eval_crops(self._decoded(items, cast(FileSource, split.source).paths), self.image_size)
            yield self.normalise(x), split.labels[pos].to(self.device)

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's every ``world``-th sample as evaluation views."""
        data = self.splits[self._evals.resolve(split)]
        return self._eval_views(data, torch.arange(self.rank, len(data), self.world))

    def train_eval_batches(self, n: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The training split's fixed subset of ``n`` samples as evaluation views; every rank gets all."""
        data = self.splits["train"]
        return self._eval_views(data, fixed_subset(len(data), n, seed))
