"""The device data path: batched per-sample augmentation, its seeded stream and shards, the
choice between the device and loader paths, and TinyImageNet's decode cache.

Augmentations are checked against independent per-sample computations (slicing, and
torchvision's own rotate), not against the batched code's formulas.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_files import TINY_WNIDS, file_recipe, write_cifar10, write_tinyimagenet
from torchvision.transforms.v2 import functional as TF

from kd_platform.config.recipe import DEVICE_AUGMENTATIONS, Recipe
from kd_platform.data import build_data, sources
from kd_platform.data import cifar as cifar_module
from kd_platform.data.augment import cutout_size, mean_colour, shift_padding
from kd_platform.data.device_augment import STEPS, BatchAugment
from kd_platform.data.device_data import DeviceDataModule
from kd_platform.data.sources import ArraySource
from kd_platform.data.split import Split, generator
from kd_platform.errors import UsageError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("c10")
    return root, write_cifar10(root)


pytestmark = pytest.mark.usefixtures("no_network")




def _same_image(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``n`` copies of one random RGB image with no zero pixel (so zero fill is visible)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(1, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)
    return img.expand(n, -1, -1, -1).contiguous()


def _translated(img: torch.Tensor, oy: int, ox: int) -> torch.Tensor:
    """``out[y, x] = img[y + oy, x + ox]`` where that lies inside, else 0."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(0, -oy):h - max(0, oy), max(0, -ox):w - max(0, ox)] = \
        img[..., max(0, oy):h - max(0, -oy), max(0, ox):w - max(0, -ox)]
    return out


def _candidates(img: torch.Tensor, p: int, flips: bool) -> tuple[torch.Tensor, list[tuple[int, int, bool]]]:
    """Every translation of ``img`` by ``[-p, p]`` in each axis (and its mirror image)."""
    mirrors = (False, True) if flips else (False,)
    keys = [(oy, ox, f) for oy in range(-p, p + 1) for ox in range(-p, p + 1) for f in mirrors]
    imgs = [_translated(img, oy, ox) for oy, ox, _ in keys]
    return torch.stack([TF.horizontal_flip(t) if f else t for t, (_, _, f) in zip(imgs, keys)]), keys


def _match(out: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per output: the index of the one candidate it equals exactly (-1 when none does)."""
    eq = (out[:, None] == candidates[None]).flatten(2).all(2)
    assert bool((eq.sum(1) <= 1).all())
    return torch.where(eq.any(1), eq.float().argmax(1), torch.tensor(-1))


def _draw(name: str, n: int, size: int, seed: int = 0) -> tuple[BatchAugment, dict]:
    aug = BatchAugment(name, size, (1, 2, 3))
    return aug, aug.draw(n, generator(seed, 123))


# ---------------------------------------------------------------- batched augmentation

def test_device_forms_are_exactly_the_recipes_device_augmentations():
    assert tuple(STEPS) == DEVICE_AUGMENTATIONS
    with pytest.raises(UsageError, match="no 'randaugment'"):
        BatchAugment("randaugment", 32, (0, 0, 0))


def test_shift_translates_each_sample_by_its_own_offset_with_zero_fill():
    size, n = 16, 400
    p = shift_padding(size)
    batch = _same_image(n, size)
    aug, params = _draw("shift", n, size)
    out = aug(batch, params)
    candidates, keys = _candidates(batch[0], p, flips=False)
    found = _match(out, candidates)
    assert bool((found >= 0).all())  # every output is the image translated within [-p, p], zero filled
    offsets = [keys[i][:2] for i in found.tolist()]
    assert len(set(offsets)) == (2 * p + 1) ** 2  # every offset occurs: each sample draws its own
    assert offsets == list(zip((params["dy"] - p).tolist(), (params["dx"] - p).tolist()))


def test_standard_flips_about_half_the_samples_after_the_shift():
    size, n = 16, 1000
    batch = _same_image(n, size, seed=1)
    aug, params = _draw("standard", n, size)
    out = aug(batch, params)
    candidates, keys = _candidates(batch[0], shift_padding(size), flips=True)
    found = _match(out, candidates)
    assert bool((found >= 0).all())
    flipped = torch.tensor([keys[i][2] for i in found.tolist()])
    assert 0.44 < flipped.float().mean().item() < 0.56
    assert torch.equal(flipped, params["flip"])


@pytest.mark.parametrize("size", [8, 32])
def test_rotate_matches_torchvision_rotate_of_the_standard_image_per_sample(size):
    n = 64
    batch = _same_image(n, size, seed=2)
    aug, params = _draw("rotate", n, size)
    out = aug(batch, params)
    standard = BatchAugment("standard", size, (0, 0, 0))(batch, {k: params[k] for k in ("dy", "dx", "flip")})
    angles = torch.rad2deg(torch.atan2(params["sin"], params["cos"]))
    assert float(angles.abs().max()) <= 15.0 + 1e-4 and float(angles.std()) > 5.0
    for i in range(n):  # the reference: torchvision's nearest, zero-fill rotation, one sample at a time
        assert torch.equal(out[i], TF.rotate(standard[i], float(angles[i]))), i
    assert len({o.numpy().tobytes() for o in out}) > n // 2  # each sample its own transform


def test_cutout_paints_a_square_per_sample_anywhere_over_the_standard_image():
    size, n = 32, 200
    fill = (7, 8, 9)
    batch = _same_image(n, size, seed=3).clamp(min=10)  # no pixel has the fill colour by chance
    aug = BatchAugment("cutout", size, fill)
    params = aug.draw(n, generator(0, 5))
    out = aug(batch, params)
    base = BatchAugment("standard", size, fill)(batch, {k: params[k] for k in ("dy", "dx", "flip")})
    side, half = cutout_size(size), cutout_size(size) // 2
    painted = (out == torch.tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
    boxes = set()
    for i, (cy, cx) in enumerate(zip(params["cy"].tolist(), params["cx"].tolist())):
        expect = torch.zeros(size, size, dtype=torch.bool)
        expect[max(0, cy - half):min(size, cy - half + side), max(0, cx - half):min(size, cx - half + side)] = True
        assert torch.equal(painted[i], expect), i
        assert torch.equal(out[i][:, ~expect], base[i][:, ~expect])  # elsewhere: the standard image
        boxes.add((cy, cx))
    assert len(boxes) > n // 2  # centres differ between samples
    corner = torch.tensor([cy < half or cx < half for cy, cx in boxes])
    assert bool(corner.any())  # squares may hang over the border


def test_none_leaves_the_batch_as_it_is():
    batch = _same_image(4, 8)
    aug, params = _draw("none", 4, 8)
    assert params == {} and aug(batch, params) is batch


# ---------------------------------------------------------------- the module's stream

def _indexed_module(n: int, recipe: Recipe, rank: int = 0, world: int = 1, seed: int = 0,
                    size: int = 8) -> DeviceDataModule:
    """A module over ``n`` distinct random images whose label is their index."""
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (n, size, size, 3), dtype=np.uint8)
    source = ArraySource(images)
    splits = {"train": Split(source, torch.arange(n), torch.arange(n)),
              "test": Split(source, torch.arange(n)[:10], torch.arange(n)[:10])}
    return DeviceDataModule("synthetic", splits, n, (0.5,) * 3, (0.25,) * 3, recipe, seed, CPU, rank, world)


def _stream(d, epoch: int, num_views: int = 1) -> list[list[torch.Tensor]]:
    return [[*b.views, b.y] for b in d.train_batches(epoch, num_views)]


def _same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))
                                    for x, y in zip(a, b))


def test_same_seed_same_stream_other_seed_other_stream_and_resume_is_exact():
    recipe = file_recipe(augment="cutout", batch_size=16)
    d = _indexed_module(100, recipe)
    seen = [_stream(d, e, num_views=2) for e in range(3)]
    assert not _same(seen[0], seen[1])  # a new epoch, a new order and new augmentation
    fresh = _indexed_module(100, recipe)
    assert _same(_stream(fresh, 2, num_views=2), seen[2])  # resumed at epoch 2: what epoch 2 was
    other = _indexed_module(100, recipe, seed=1)
    assert not _same(_stream(other, 0, num_views=2), seen[0])


def test_two_ranks_take_disjoint_shards_covering_the_epoch_but_the_remainder():
    recipe = file_recipe(augment="standard", batch_size=14)  # 7 per rank
    ranks = [_indexed_module(101, recipe, rank=r, world=2) for r in (0, 1)]
    ys = []
    for d in ranks:
        batches = list(d.train_batches(epoch=4, num_views=1))
        # 50 per rank: seven batches of 7 and a single sample, which is dropped (BatchNorm).
        assert len(batches) == d.steps_per_epoch() == 7
        assert all(len(b.y) == 7 for b in batches)
        ys.append(torch.cat([b.y for b in batches]))
    assert not set(ys[0].tolist()) & set(ys[1].tolist())
    # Together: the epoch's permutation (shared by the ranks, dealt alternately) minus the
    # world remainder (its 101st sample) and each rank's dropped last sample (its 99th, 100th).
    order = torch.randperm(101, generator=generator(0, 4))
    assert sorted(ys[0].tolist() + ys[1].tolist()) == sorted(order[:98].tolist())
    assert ranks[0].batch_size == 7


def test_batches_are_the_labelled_images():
    recipe = file_recipe(augment="none", batch_size=16)
    d = _indexed_module(40, recipe)
    images = torch.from_numpy(np.random.default_rng(0).integers(1, 256, (40, 8, 8, 3), dtype=np.uint8))
    for b in d.train_batches(epoch=1, num_views=1):
        expect = (images[b.y].permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        assert torch.allclose(b.x, expect, atol=1e-6)


def test_per_network_views_are_independent_and_view_augments_apply_per_view(cifar10_dir, monkeypatch):
    root, raw = cifar10_dir
    same = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard",
                              view_augments="standard,standard"), seed=0, device=CPU)
    assert same.path == "device"
    b = next(same.train_batches(epoch=0, num_views=2))
    assert not torch.equal(b.view(0), b.view(1))  # the same augmentation, drawn independently per view
    d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard",
                           view_augments="none,cutout,rotate"), seed=0, device=CPU)
    assert d.path == "device"
    applied: list[str] = []
    real_call = BatchAugment.__call__

    def recording(self, batch, params):
        applied.append(self.name)
        return real_call(self, batch, params)
    monkeypatch.setattr(BatchAugment, "__call__", recording)
    batch = next(d.train_batches(epoch=0, num_views=3))
    assert applied == ["none", "cutout", "rotate"]
    fmt = cifar_module.CIFAR10
    plain = torch.from_numpy(raw["x_train"].reshape(-1, 3, 32, 32))
    plain = (plain.float() / 255 - torch.tensor(fmt.mean).view(1, 3, 1, 1)) / torch.tensor(fmt.std).view(1, 3, 1, 1)
    by_row = {r.numpy().tobytes() for r in plain.flatten(1)}
    assert all(r.numpy().tobytes() in by_row for r in batch.view(0).flatten(1))  # 'none': as stored
    mean_pixels = (batch.view(1).abs() < 0.02).all(1).flatten(1).sum(1)
    assert bool((mean_pixels >= 8 * 8).all())  # cutout: at least a corner of the square, mean colour
    assert not any(r.numpy().tobytes() in by_row for r in batch.view(2).flatten(1))
    # A single shared view keeps 'augment'.
    shared = next(d.train_batches(epoch=0, num_views=1))
    assert not all(r.numpy().tobytes() in by_row for r in shared.x.flatten(1))


def test_cifar_cutout_paints_the_datasets_mean_colour_at_different_places(cifar10_dir):
    root, _ = cifar10_dir
    d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="cutout"), seed=0, device=CPU)
    aug = d.augments["cutout"]
    assert aug.fill.flatten().tolist() == mean_colour(cifar_module.CIFAR10.mean)
    x = next(d.train_batches(epoch=0, num_views=1)).x
    at_mean = (x.abs() < 0.02).all(1)  # the mean colour normalises to zero in every channel
    assert len({m.numpy().tobytes() for m in at_mean}) > len(x) // 2  # squares at different places


def test_device_and_loader_paths_agree_on_labels_and_unaugmented_images(cifar10_dir):
    root, _ = cifar10_dir
    paths = {p: build_data(file_recipe(dataset="cifar10", data_dir=str(root), data_path=p), seed=2, device=CPU)
             for p in ("device", "loader")}
    assert {p: d.path for p, d in paths.items()} == {"device": "device", "loader": "loader"}
    for split in ("train", "val", "test"):
        dev, load = (list(d.eval_batches(split)) for d in paths.values())
        assert len(dev) == len(load)
        for (xd, yd), (xl, yl) in zip(dev, load):
            assert torch.equal(yd, yl) and torch.equal(xd, xl), split
    # Unaugmented training batches: the same order on both paths, hence the same batches.
    assert _same(_stream(paths["device"], 3), _stream(paths["loader"], 3))


# ---------------------------------------------------------------- choosing a path

def test_auto_picks_device_for_device_augmentations_and_loader_otherwise(cifar10_dir, caplog):
    root, _ = cifar10_dir

    def path(**kw) -> str:
        return build_data(file_recipe(dataset="cifar10", data_dir=str(root), **kw), seed=0, device=CPU).path
    with caplog.at_level(logging.INFO, logger="kd_platform.data"):
        d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard"), seed=0, device=CPU)
        assert "data path" not in caplog.text  # quiet until it trains: a recipe check builds modules too
        for _ in range(2):
            next(d.train_batches(0, 1))
    assert d.path == "device" and caplog.text.count("data path") == 1
    assert "cifar10: device data path" in caplog.text and "fit in 1/4 of the free memory" in caplog.text
    for augment in DEVICE_AUGMENTATIONS:
        assert path(augment=augment) == "device", augment
    assert path(augment="randaugment") == "loader"
    assert path(augment="standard", view_augments="rotate,autoaugment") == "loader"  # per-view ones count
    assert path(augment="standard", data_path="loader") == "loader"
    assert path(augment="standard", data_path="device") == "device"
    with pytest.raises(UsageError, match="knob 'data_path'.*'randaugment'"):
        path(augment="randaugment", data_path="device")


def test_auto_takes_the_loader_when_the_data_does_not_fit(cifar10_dir, monkeypatch, caplog):
    from kd_platform.data import data_path
    root, _ = cifar10_dir
    n_bytes = (200 + 40) * 3 * 32 * 32
    monkeypatch.setattr(data_path, "free_memory", lambda device: 4 * n_bytes - 1)
    with caplog.at_level(logging.INFO, logger="kd_platform.data"):
        d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard"), seed=0, device=CPU)
        next(d.train_batches(0, 1))
    assert d.path == "loader" and "cifar10: loader data path (decoded images" in caplog.text
    assert "exceed 1/4 of the free memory" in caplog.text
    monkeypatch.setattr(data_path, "free_memory", lambda device: 4 * n_bytes)
    assert build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard"), seed=0,
                      device=CPU).path == "device"


def test_digits_is_device_only_and_refuses_what_the_device_cannot_do():
    d = build_data(file_recipe(augment="rotate"), seed=0, device=CPU)
    assert d.path == "device" and d.in_channels == 1
    shifted = build_data(file_recipe(augment="shift"), seed=0, device=CPU)
    assert not torch.equal(next(d.train_batches(0, 1)).x, next(shifted.train_batches(0, 1)).x)
    with pytest.raises(UsageError, match="knob 'data_path': dataset 'digits' is held in memory and has no "
                                         "loader path"):
        build_data(file_recipe(data_path="loader"), seed=0, device=CPU)
    with pytest.raises(UsageError, match="knob 'augment'.*'randaugment'"):
        build_data(file_recipe(augment="randaugment"), seed=0, device=CPU)
    with pytest.raises(UsageError, match="knob 'view_augments'.*'autoaugment'"):
        build_data(file_recipe(view_augments="rotate,autoaugment"), seed=0, device=CPU)


def test_digits_cutout_paints_the_mean_on_digits_stored_scale():
    d = build_data(file_recipe(augment="cutout", batch_size=64), seed=0, device=CPU)
    fill = d.augments["cutout"].fill
    assert fill.flatten().tolist() == [120]  # mean 0.5 of the stored 0..240
    assert torch.equal(d.normalise(fill), torch.zeros(1, 1, 1, 1))
    plain = build_data(file_recipe(augment="standard", batch_size=64), seed=0, device=CPU)
    cut, kept = next(d.train_batches(0, 1)).x, next(plain.train_batches(0, 1)).x
    changed = cut != kept  # the same shift and flip (same seed and view): only the square differs
    assert bool(changed.flatten(1).any(1).float().mean() > 0.5) and bool((cut[changed] == 0).all())


# ---------------------------------------------------------------- TinyImageNet's decode cache

def _tinyfile_recipe(root: Path, **kw) -> Recipe:
    return file_recipe(**{"dataset": "tinyimagenet", "data_dir": str(root), "val_fraction": 0.25, "batch_size": 8,
                      **kw})


def _count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = sources.decode_files

    def counted(paths, image_size):
        calls.append(len(paths))
        return real(paths, image_size)
    monkeypatch.setattr(sources, "decode_files", counted)
    return calls


def _first_test_image(root: Path) -> torch.Tensor:
    d = build_data(_tinyfile_recipe(root), seed=0, device=CPU)
    assert d.path == "device"
    return next(d.eval_batches("test"))[0][0]


def test_tinyimagenet_is_decoded_once_cached_and_re_decoded_when_files_change(tmp_path, monkeypatch):
    base = write_tinyimagenet(tmp_path, per_class_train=4, per_class_val=2)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    calls = _count_decodes(monkeypatch)
    d = build_data(_tinyfile_recipe(tmp_path), seed=0, device=CPU)
    assert calls == []  # building alone decodes nothing
    first = next(d.train_batches(epoch=0, num_views=1))
    assert calls == [16 + 8]  # train and test decoded once, into one array
    entries = list((base / ".kd_decoded").glob("*.npy"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    cached = np.load(entries[0])
    assert cached.shape == (24, 3, 64, 64) and cached.dtype == np.uint8
    # The cached pixels are the files' pixels, in the splits' order.
    expect = sources.read_image(d.splits["test"].source.paths[16], 64)
    assert torch.equal(torch.from_numpy(cached[16]), expect)
    again = build_data(_tinyfile_recipe(tmp_path), seed=0, device=CPU)
    second = next(again.train_batches(epoch=0, num_views=1))
    assert calls == [24] and entries[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert not (tmp_path / "home").exists()

    # A changed file is a new entry with the new pixels.
    val_image = base / "val" / "images" / "val_0.JPEG"
    before = _first_test_image(tmp_path)
    from PIL import Image
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(val_image, quality=95)
    after = _first_test_image(tmp_path)
    assert len(calls) == 2 and len(list((base / ".kd_decoded").glob("*.npy"))) == 2
    assert not torch.equal(before, after)


def test_decode_cache_falls_back_to_the_user_cache_then_to_none(tmp_path, monkeypatch, caplog):
    base = write_tinyimagenet(tmp_path, per_class_train=2, per_class_val=1)
    (base / ".kd_decoded").write_text("not a directory")  # the data directory's cache is unusable
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    calls = _count_decodes(monkeypatch)
    reference = _first_test_image(tmp_path)
    assert len(list((home / ".cache" / "kd_platform" / "decoded").glob("*.npy"))) == 1
    assert torch.equal(_first_test_image(tmp_path), reference) and len(calls) == 1
    home.mkdir(exist_ok=True)
    (home / ".cache").rename(home / "moved")
    (home / ".cache").write_text("not a directory either")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_first_test_image(tmp_path), reference)
    assert len(calls) == 2 and "without caching" in caplog.text


def test_concurrent_first_uses_decode_once(tmp_path, monkeypatch):
    base = write_tinyimagenet(tmp_path, per_class_train=2, per_class_val=1)
    paths = sorted(str(p) for p in base.rglob("*.JPEG"))
    calls = _count_decodes(monkeypatch)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(
        sources.load_or_decode(paths, 64, [base / ".kd_decoded"]))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert all(np.array_equal(r, results[0]) for r in results)
    assert not [p for p in os.listdir(base / ".kd_decoded") if p.endswith(".tmp")]


def test_corrupt_jpeg_on_the_device_path_is_one_line_naming_the_file(tmp_path):
    base = write_tinyimagenet(tmp_path, per_class_train=2, per_class_val=1)
    bad = base / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])
    d = build_data(_tinyfile_recipe(tmp_path, val_fraction=0.0), seed=0, device=CPU)
    with pytest.raises(UsageError) as err:
        next(d.eval_batches("test"))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not list((base / ".kd_decoded").glob("*.npy"))  # nothing half-decoded is cached


# ---------------------------------------------------------------- on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_batches_never_wait_for_the_host():
    cuda = torch.device("cuda")
    d = build_data(file_recipe(augment="rotate", view_augments="cutout,standard", batch_size=64), seed=0,
                   device=cuda)
    cpu = build_data(file_recipe(augment="rotate", view_augments="cutout,standard", batch_size=64), seed=0, device=CPU)
    d.images  # the one-time upload is allowed to wait
    batches = d.train_batches(epoch=1, num_views=2)
    first = next(batches)  # the epoch's parameters are uploaded once, before the first step
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [b.views for b in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rest
    expect = next(cpu.train_batches(epoch=1, num_views=2))
    assert all(torch.equal(a.cpu(), b) for a, b in zip(first.views, expect.views))
    assert math.isfinite(float(first.x.sum()))
