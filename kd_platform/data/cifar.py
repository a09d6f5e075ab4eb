"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009): 32x32 colour images, 50,000 for training and
10,000 for testing, read from the python pickles under ``data_dir``.

Files: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``, as the official archives extract. When that folder
is absent, torchvision downloads and extracts the archive into ``data_dir`` (under a file
lock, so concurrent trials download once); when that fails, the run stops with a one-line
error naming the folder.

Files matching the official checksums are read by ``torchvision.datasets.CIFAR10/100``.
torchvision refuses anything else, including a deliberately subsampled copy, so such files
are read by this module's own reader of the same pickle format (with a warning saying the
checksums differ); a file that reader cannot make sense of is reported by name.

The validation split is a stratified, seeded ``val_fraction`` of the official training set;
the official test set is the test split.

The pickles already hold decoded ``uint8`` arrays, so the device data path copies them to
the device as they are; there is nothing to decode and no decode cache.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from kd_platform.config.recipe import Recipe
from kd_platform.data.base import DataModule
from kd_platform.data.data_path import build_file_data
from kd_platform.data.registry import register_dataset
from kd_platform.data.sources import ArraySource, data_root
from kd_platform.data.split import Split, check_labels, split_train
from kd_platform.errors import UsageError

log = logging.getLogger(__name__)

IMAGE_SIZE = 32


@dataclass(frozen=True)
class CifarFormat:
    title: str
    tv_class: type[datasets.CIFAR10]  # CIFAR100 subclasses it
    num_classes: int
    label_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def folder(self) -> str:
        return self.tv_class.base_folder

    def files(self) -> list[tuple[str, str]]:
        """``(file name, official md5)`` of every file the format needs."""
        meta = self.tv_class.meta
        return [*self.tv_class.train_list, *self.tv_class.test_list, (meta["filename"], meta["md5"])]


# Per-channel statistics of each training set, the values the CIFAR literature normalises with.
CIFAR10 = CifarFormat("CIFAR-10", datasets.CIFAR10, 10, "labels",
                      (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = CifarFormat("CIFAR-100", datasets.CIFAR100, 100, "fine_labels",
                       (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_cache: dict[tuple, Arrays] = {}


def download(fmt: CifarFormat, root: Path) -> None:
    """Let torchvision download and extract the official archive into ``root``."""
    fmt.tv_class(root=str(root), train=False, download=True)


def ensure_files(fmt: CifarFormat, root: Path) -> Path:
    """The extracted folder, downloaded first when it is absent altogether.

    A folder that exists but lacks files is left alone: downloading would extract over
    whatever the user put there."""
    folder = root / fmt.folder
    if not folder.is_dir():
        from filelock import FileLock
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"{fmt.title}: cannot create data directory {root}: {err.strerror}") from None
        lock, failed = root / f".{fmt.folder}.lock", ""
        with FileLock(str(lock)):
            if not folder.is_dir():
                log.info("%s: %s is absent; downloading %s", fmt.title, folder, fmt.tv_class.url)
                try:
                    download(fmt, root)
                except Exception as err:  # noqa: BLE001 - any failure means the same to the user
                    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    failed = (f"{fmt.title} not found in {folder} and downloading it failed ({reason}); "
                              f"extract {fmt.tv_class.filename} into {root}")
                    (root / fmt.tv_class.filename).unlink(missing_ok=True)
        if failed:  # a failed command leaves nothing behind: no lock, no partial archive, no new folder
            lock.unlink(missing_ok=True)
            if created and not any(root.iterdir()):
                root.rmdir()
            raise UsageError(failed)
    missing = [name for name, _ in fmt.files() if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"{fmt.title}: file {folder / missing[0]} is missing")
    return folder


# What a pickle of plain data (dicts, lists, strings, numbers, numpy arrays) may construct.
# Anything else in a data file is an attempt to run code on load, which a plain pickle.load
# would do: os.system and its like are refused before they are ever imported.
_DATA_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((f"numpy.{core}.{mod}", fn) for core in ("core", "_core")
      for mod, fn in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))),
})


class ForbiddenGlobal(pickle.UnpicklingError):
    pass


class DataUnpickler(pickle.Unpickler):
    """Loads a pickle of plain data only: a global outside ``_DATA_GLOBALS`` raises instead of
    being imported, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _DATA_GLOBALS:
            raise ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def load_data_pickle(fh: Any) -> Any:
    # The official pickles were written by Python 2; latin1 maps their byte strings 1:1.
    return DataUnpickler(fh, encoding="latin1").load()


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return load_data_pickle(fh)
    except ForbiddenGlobal as err:
        raise UsageError(f"refused {path}: it asks to load {err}, which a data file never holds "
                         f"(loading it could run code)") from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle can raise almost anything
        raise UsageError(f"corrupt {path.parent.name} file {path}: cannot unpickle it "
                         f"({type(err).__name__})") from None


def read_batch(fmt: CifarFormat, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 32, 32, 3)`` ``uint8`` and labels of one pickled batch, checked for shape."""
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry or fmt.label_key not in entry:
        raise UsageError(f"corrupt {fmt.title} file {path}: no 'data' and '{fmt.label_key}' entries")
    data, labels = np.asarray(entry["data"]), np.asarray(entry[fmt.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE \
            or labels.shape != (len(data),):
        raise UsageError(f"corrupt {fmt.title} file {path}: data {data.dtype} {tuple(data.shape)} "
                         f"with {labels.size} labels, expected uint8 (N, 3072) with N labels")
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue values).
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_meta(fmt: CifarFormat, path: Path) -> list[str]:
    meta = _unpickle(path)
    key = fmt.tv_class.meta["key"]
    if not isinstance(meta, dict) or len(meta.get(key, ())) != fmt.num_classes:
        raise UsageError(f"corrupt {fmt.title} file {path}: expected {fmt.num_classes} '{key}'")
    return list(meta[key])


def _read_own(fmt: CifarFormat, folder: Path) -> Arrays:
    read_meta(fmt, folder / fmt.tv_class.meta["filename"])
    parts = []
    for names in (fmt.tv_class.train_list, fmt.tv_class.test_list):
        batches = [read_batch(fmt, folder / name) for name, _ in names]
        parts += [np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])]
    return parts[0], parts[1], parts[2], parts[3]


def _read_torchvision(fmt: CifarFormat, root: Path) -> Arrays:
    """The official files through torchvision, which checks every checksum first."""
    train = fmt.tv_class(root=str(root), train=True, download=False)
    test = fmt.tv_class(root=str(root), train=False, download=False)
    return (np.asarray(train.data), np.asarray(train.targets, dtype=np.int64),
            np.asarray(test.data), np.asarray(test.targets, dtype=np.int64))


def load_arrays(fmt: CifarFormat, root: Path) -> Arrays:
    """``(x_train, y_train, x_test, y_test)`` with images ``uint8 (N, 32, 32, 3)``.

    Kept per process (keyed by the files' sizes and times), since an offline run loads the
    data for its teacher and again for itself, and Ray reuses trial processes."""
    folder = ensure_files(fmt, root)
    stats = tuple((name, (folder / name).stat().st_size, (folder / name).stat().st_mtime_ns)
                  for name, _ in fmt.files())
    key = (str(folder.resolve()), stats)
    if key not in _cache:
        try:
            arrays = _read_torchvision(fmt, root)
        except RuntimeError:  # torchvision's answer to any checksum mismatch
            differ = [name for name, md5 in fmt.files() if not check_integrity(str(folder / name), md5)]
            log.warning("%s: %s in %s differ from the official release's checksums; reading them anyway",
                        fmt.title, ", ".join(differ) or "files", folder)
            arrays = _read_own(fmt, folder)
        for labels, what in ((arrays[1], "training"), (arrays[3], "test")):
            check_labels(torch.from_numpy(labels), fmt.num_classes, f"{fmt.title} {what} files in {folder}")
        _cache.clear()  # one dataset at a time: a process switching datasets should not hoard both
        _cache[key] = arrays
    return _cache[key]


def build_cifar(fmt: CifarFormat, recipe: Recipe, seed: int, device: torch.device, rank: int,
                world: int) -> DataModule:
    x_train, y_train, x_test, y_test = load_arrays(fmt, data_root(recipe))
    train = Split(ArraySource(x_train), torch.arange(len(y_train)), torch.from_numpy(y_train))
    test = Split(ArraySource(x_test), torch.arange(len(y_test)), torch.from_numpy(y_test))
    splits = {**split_train(train, recipe.val_fraction, seed), "test": test}
    return build_file_data(recipe.dataset, splits, fmt.num_classes, IMAGE_SIZE, fmt.mean, fmt.std,
                           recipe, seed, device, rank, world)


@register_dataset("cifar10")
def build_cifar10(recipe: Recipe, seed: int, device: torch.device, rank: int, world: int) -> DataModule:
    return build_cifar(CIFAR10, recipe, seed, device, rank, world)


@register_dataset("cifar100")
def build_cifar100(recipe: Recipe, seed: int, device: torch.device, rank: int, world: int) -> DataModule:
    return build_cifar(CIFAR100, recipe, seed, device, rank, world)
