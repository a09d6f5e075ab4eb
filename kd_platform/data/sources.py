"""Where a dataset's images come from: random access for the loader path (one image at a
time, in its worker processes) and all at once for the device path (one ``uint8`` array).

CIFAR's pickles are already arrays (:class:`ArraySource`), so there is nothing to decode
and nothing to cache. TinyImageNet is one JPEG per sample (:class:`FileSource`): the
device path needs them decoded, which takes minutes for the full set, so they are decoded
once and the array is cached on disk beside the data, keyed by the file list with every
file's size and modification time, so that changed files get a new entry rather than stale
pixels. Concurrent trials take a file lock and decode once; the cache file appears by an
atomic rename, so a reader never sees half of one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from kd_platform.config.recipe import Recipe
from kd_platform.errors import UsageError

log = logging.getLogger(__name__)

CACHE_FOLDER = ".kd_decoded"
DECODE_FORMAT = "rgb-uint8-nchw-1"  # part of the cache key: bump when decoding changes


class ImageSource(Protocol):
    """The images of one file set as ``uint8``: one ``(C, H, W)`` at a time, or all of them."""

    shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def image(self, i: int) -> Tensor: ...

    def decoded(self) -> Tensor:
        """Every image, ``(N, C, H, W)`` ``uint8`` on the CPU (possibly a strided view)."""
        ...


class ArraySource:
    """Images already decoded into one ``uint8`` array ``(N, H, W, C)`` (CIFAR's pickles,
    digits)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = (array.shape[3], array.shape[1], array.shape[2])

    def __len__(self) -> int:
        return len(self.array)

    def image(self, i: int) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[i].transpose(2, 0, 1)))

    def decoded(self) -> Tensor:
        return torch.from_numpy(self.array).permute(0, 3, 1, 2)


def read_image(path: str, image_size: int | None) -> Tensor:
    """One image file as RGB ``uint8 (3, image_size, image_size)`` (its own size for
    ``None``); a file that does not decode is a one-line error naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            # Some TinyImageNet JPEGs are greyscale; every network expects three channels.
            img = TF.pil_to_tensor(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise UsageError(f"corrupt image file {path}: {err}") from None
    if image_size is not None and img.shape[-2:] != (image_size, image_size):
        img = TF.resize(img, [image_size, image_size], antialias=True)
    return img


class FileSource:
    """One image file per sample (TinyImageNet's JPEGs), decoded to RGB on access, or all at
    once through the decode cache in ``cache_dir`` (see the module's docstring)."""

    def __init__(self, paths: Sequence[str], image_size: int, cache_dir: Path | None = None) -> None:
        self.paths = list(paths)
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.shape = (3, image_size, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int) -> Tensor:
        return read_image(self.paths[i], self.image_size)

    def decoded(self) -> Tensor:
        dirs = [d for d in (self.cache_dir, user_cache_dir()) if d is not None]
        return torch.from_numpy(load_or_decode(self.paths, self.image_size, dirs))


def user_cache_dir() -> Path:
    """Where decoded arrays go when the data's own directory is not writable."""
    return Path.home() / ".cache" / "kd_platform" / "decoded"


def decode_files(paths: Sequence[str], image_size: int) -> np.ndarray:
    """Every file decoded into one ``uint8 (N, 3, image_size, image_size)`` array, by a pool
    of threads (the JPEG decoder releases the GIL)."""
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)

    def fill(i: int) -> None:
        out[i] = read_image(paths[i], image_size).numpy()

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1))
    try:
        for done in [pool.submit(fill, i) for i in range(len(paths))]:
            done.result()
    finally:
        # A corrupt file ends the run: the remaining files need not be decoded first.
        pool.shutdown(wait=True, cancel_futures=True)
    log.info("decoded %d image files in %.1f s", len(paths), time.perf_counter() - t0)
    return out


def decode_key(paths: Sequence[str], image_size: int) -> str:
    """SHA-256 of the file list with every file's size and modification time."""
    h = hashlib.sha256(f"{DECODE_FORMAT} {image_size}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as err:
            raise UsageError(f"image file {path} cannot be read: {err.strerror}") from None
        h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached array at ``path``, or None when there is none or it is not what we expect
    (then it is decoded again and replaced)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        log.warning("decode cache %s is unreadable (%s); decoding again", path, err)
        return None
    if array.dtype != np.uint8 or array.shape != shape:
        log.warning("decode cache %s holds %s %s, expected uint8 %s; decoding again",
                    path, array.dtype, array.shape, shape)
        return None
    return array


def _write_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log.warning("could not write decode cache %s (%s); continuing without it", path, err.strerror)


def _decode_under_lock(folder: Path, key: str, paths: Sequence[str], image_size: int) -> np.ndarray | None:
    """Decode into ``folder``'s cache while holding its lock, or None if ``folder`` is not
    writable. Whoever waited for the lock finds the array the holder wrote."""
    from filelock import FileLock
    target = folder / f"{key}.npy"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Checked first: a lock file that cannot be created may otherwise be retried forever.
        if not os.access(folder, os.W_OK):
            return None
        lock = FileLock(str(folder / f"{key}.lock"))
        lock.acquire()
    except OSError:
        return None
    try:
        shape = (len(paths), 3, image_size, image_size)
        array = _load_cached(target, shape)
        if array is None:
            log.info("decoding %d image files once into %s", len(paths), target)
            array = decode_files(paths, image_size)
            _write_atomically(target, array)
        return array
    finally:
        lock.release()


def load_or_decode(paths: Sequence[str], image_size: int, cache_dirs: Sequence[Path]) -> np.ndarray:
    """The decoded files, from the first of ``cache_dirs`` that has them, else decoded once
    into the first writable one, else (none writable) decoded without a cache."""
    key = decode_key(paths, image_size)
    shape = (len(paths), 3, image_size, image_size)
    for folder in cache_dirs:
        array = _load_cached(folder / f"{key}.npy", shape)
        if array is not None:
            return array
    for folder in cache_dirs:
        array = _decode_under_lock(folder, key, paths, image_size)
        if array is not None:
            return array
    log.warning("no writable decode cache directory (tried %s); decoding %d image files without caching",
                ", ".join(map(str, cache_dirs)) or "none", len(paths))
    return decode_files(paths, image_size)


def data_root(recipe: Recipe) -> Path:
    if not recipe.data_dir:
        raise UsageError(f"dataset '{recipe.dataset}' is read from files: set knob 'data_dir' to the "
                         "directory that holds them")
    return Path(recipe.data_dir).expanduser()
