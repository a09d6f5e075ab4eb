"""Writers of the datasets' real on-disk formats (CIFAR's pickled batches, TinyImageNet's
and ImageNet's JPEG trees), for tests and benchmarks that cannot download the real sets."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from kd_platform.config.knobs import build_config
from kd_platform.config.recipe import Recipe


def _balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def dump_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar10(root: Path, per_class_train: int = 20, per_class_test: int = 4, seed: int = 0) -> dict:
    """``cifar-10-batches-py`` as the official archive extracts: five training batches, a
    test batch and ``batches.meta``, each a pickled dict with ``data`` rows of 3072 bytes
    (channel-major) and a ``labels`` list."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    y_train = _balanced_labels(10, per_class_train, rng)
    x_train = rng.integers(0, 256, (len(y_train), 3072), dtype=np.uint8)
    for b, (xs, ys) in enumerate(zip(np.array_split(x_train, 5), np.array_split(y_train, 5)), 1):
        names = [f"img_{b}_{i}.png" for i in range(len(ys))]
        dump_pickle(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": ys.tolist(),
                                                 "data": xs, "filenames": names})
    y_test = _balanced_labels(10, per_class_test, rng)
    x_test = rng.integers(0, 256, (len(y_test), 3072), dtype=np.uint8)
    dump_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y_test.tolist(),
                                        "data": x_test, "filenames": [f"t_{i}.png" for i in range(len(y_test))]})
    dump_pickle(folder / "batches.meta", {"num_cases_per_batch": len(y_train) // 5, "num_vis": 3072,
                                          "label_names": [f"class{c}" for c in range(10)]})
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_cifar100(root: Path, per_class_train: int = 4, per_class_test: int = 1, seed: int = 1) -> dict:
    """``cifar-100-python``: ``train``, ``test`` and ``meta``, with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, per_class in (("train", per_class_train), ("test", per_class_test)):
        y = _balanced_labels(100, per_class, rng)
        x = rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)
        dump_pickle(folder / name, {"filenames": [f"{name}_{i}.png" for i in range(len(y))], "batch_label": name,
                                    "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(), "data": x})
        out[f"x_{name}"], out[f"y_{name}"] = x, y
    dump_pickle(folder / "meta", {"fine_label_names": [f"fine{c}" for c in range(100)],
                                  "coarse_label_names": [f"coarse{c}" for c in range(20)]})
    return out


TINY_WNIDS = ["n09999999", "n01443537", "n02085620", "n04067472"]  # deliberately unsorted, as in the file


def write_tinyimagenet(root: Path, per_class_train: int = 10, per_class_val: int = 3) -> Path:
    """``tiny-imagenet-200``: wnids.txt, train/<wnid>/images/*.JPEG (+ boxes file), val/images
    and val/val_annotations.txt, with real JPEGs; one training image is greyscale, as some
    of the real ones are."""
    from PIL import Image
    rng = np.random.default_rng(2)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for wnid in TINY_WNIDS:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class_train):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            img = Image.fromarray(pixels).convert("L") if (wnid, i) == (TINY_WNIDS[0], 0) else Image.fromarray(pixels)
            img.save(folder / f"{wnid}_{i}.JPEG", quality=90)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class_train)))
    lines, n = [], 0
    for wnid in TINY_WNIDS:
        for _ in range(per_class_val):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                base / "val" / "images" / f"val_{n}.JPEG", quality=90)
            lines.append(f"val_{n}.JPEG\t{wnid}\t1\t2\t60\t61")
            n += 1
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(root: Path, per_class_train: int = 6, per_class_val: int = 2, classes: int = 3,
                   sides: tuple[int, int] = (40, 120), seed: int = 3) -> Path:
    """``imagenet/train/<wnid>/*.JPEG`` and ``imagenet/val/<wnid>/*.JPEG`` with real JPEGs whose
    sides are drawn from ``sides`` (so sizes and aspect ratios differ); as in the real set, one
    training image is greyscale and one is a CMYK JPEG. The pixels are smooth noise (coarse
    noise scaled up), which compresses about as well as photographs do."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    wnids = IMAGENET_WNIDS if classes == len(IMAGENET_WNIDS) else [f"n{c:08d}" for c in range(classes)]
    base = root / "imagenet"
    for split, per_class in (("train", per_class_train), ("val", per_class_val)):
        for c, wnid in enumerate(wnids):
            folder = base / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
                coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
                img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
                if split == "train" and (c, i) == (0, 0):
                    img = img.convert("L")
                elif split == "train" and (c, i) == (1, 0):
                    img = img.convert("CMYK")
                img.save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return base


def file_recipe(**kw) -> Recipe:
    """A recipe for small file-dataset tests: no augmentation, batch 32, no loader processes."""
    return build_config(Recipe, {"augment": "none", "batch_size": 32, "loader_workers": 0, **kw})
