"""File datasets (CIFAR-10/100, TinyImageNet), augmentation pipelines and recipe presets.

No dataset can be downloaded here, so each test writes a tiny copy in the dataset's real
on-disk format (CIFAR's pickled batches, TinyImageNet's JPEG tree; ``dataset_files``) and
reads it through ``build_data``, the path every run takes. Tests of what a data module
yields run on both data paths (``PATHS``); ``test_device_data`` covers what is particular
to the device path.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_files import TINY_WNIDS, dump_pickle, file_recipe, write_cifar10, write_cifar100, write_tinyimagenet

from kd_platform.config.knobs import build_config
from kd_platform.config.recipe import AUGMENTATIONS, Recipe
from kd_platform.data import build_data
from kd_platform.data import cifar as cifar_module
from kd_platform.errors import UsageError

CPU = torch.device("cpu")
PATHS = ("device", "loader")


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("c10")
    return root, write_cifar10(root)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_tinyimagenet(root)
    return root


pytestmark = pytest.mark.usefixtures("no_network")




def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def _matches(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row of ``x``: whether some row of ``reference`` equals it up to float rounding."""
    dist = torch.cdist(x.flatten(1), reference.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    return dist.min(1).values < 1e-3


def _normalised(raw_rows: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(raw_rows.reshape(-1, 3, 32, 32)).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("path", PATHS)
def test_cifar10_shapes_splits_and_pixel_layout(cifar10_dir, path):
    root, raw = cifar10_dir
    d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), data_path=path), seed=3, device=CPU)
    assert d.path == path
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 3, 32)
    train, val, test = d.splits["train"], d.splits["val"], d.splits["test"]
    assert len(train) + len(val) == 200 and len(test) == 40
    assert torch.bincount(val.labels, minlength=10).tolist() == [2] * 10  # 10% of 20 per class
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    other = build_data(file_recipe(dataset="cifar10", data_dir=str(root)), seed=4, device=CPU)
    assert not torch.equal(val.indices, other.splits["val"].indices)  # validation follows the seed
    # The test split is the official test batch, in file order, pixels channel-major.
    xs, ys = zip(*d.eval_batches("test"))
    x, y = torch.cat(xs), torch.cat(ys)
    assert y.tolist() == raw["y_test"].tolist()
    assert torch.allclose(x, _normalised(raw["x_test"], cifar_module.CIFAR10.mean, cifar_module.CIFAR10.std),
                          atol=1e-5)
    batches = list(d.train_batches(epoch=0, num_views=1))
    assert len(batches) == d.steps_per_epoch() == 6  # 180 samples in batches of 32
    assert batches[0].x.shape == (32, 3, 32, 32) and batches[0].x.dtype == torch.float32
    assert sum(len(b.y) for b in batches) == len(train)


def test_cifar100_fine_labels_and_stratified_validation(tmp_path):
    raw = write_cifar100(tmp_path)
    d = build_data(file_recipe(dataset="cifar100", data_dir=str(tmp_path), val_fraction=0.25), seed=0, device=CPU)
    assert d.num_classes == 100
    assert torch.bincount(d.splits["val"].labels, minlength=100).tolist() == [1] * 100
    assert torch.bincount(d.splits["train"].labels, minlength=100).tolist() == [3] * 100
    assert d.splits["test"].labels.tolist() == raw["y_test"].tolist()  # fine, not coarse, labels


def test_official_checksums_go_through_torchvision(tmp_path, monkeypatch, caplog):
    """torchvision reads only files whose md5 matches the official release; give it the
    generated files' checksums and it must produce exactly what the own reader produces."""
    import torchvision.datasets as tvd
    raw = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5["batches.meta"]})
    monkeypatch.setattr(cifar_module, "_read_own", lambda *a: pytest.fail("official files read by the own reader"))
    with caplog.at_level(logging.WARNING):
        x_train, y_train, x_test, y_test = cifar_module.load_arrays(cifar_module.CIFAR10, tmp_path)
    assert "checksums" not in caplog.text
    own = cifar_module.read_batch(cifar_module.CIFAR10, folder / "test_batch")
    assert np.array_equal(x_test, own[0]) and np.array_equal(y_test, raw["y_test"])
    assert np.array_equal(y_train, raw["y_train"]) and x_train.shape == (200, 32, 32, 3)


def test_unofficial_files_are_read_with_a_warning(cifar10_dir, caplog):
    root, _ = cifar10_dir
    with caplog.at_level(logging.WARNING):
        cifar_module.load_arrays(cifar_module.CIFAR10, root)
    assert "differ from the official release's checksums" in caplog.text


@pytest.mark.parametrize("path", PATHS)
def test_two_workers_see_disjoint_equal_halves(cifar10_dir, path):
    root, _ = cifar10_dir
    recipe = file_recipe(dataset="cifar10", data_dir=str(root), batch_size=64, data_path=path)
    halves = [build_data(recipe, seed=0, device=CPU, rank=r, world=2) for r in (0, 1)]
    seen = [torch.cat([b.x for b in h.train_batches(epoch=5, num_views=1)]) for h in halves]
    n_train = len(halves[0].splits["train"])
    assert len(seen[0]) == len(seen[1]) == n_train // 2
    assert not _rows(seen[0]) & _rows(seen[1])
    assert halves[0].steps_per_epoch() == halves[1].steps_per_epoch() == 3  # 90 per rank, batch 32
    evals = [sum(len(y) for _, y in h.eval_batches("test")) for h in halves]
    assert sum(evals) == 40  # evaluation covers the split once across ranks


@pytest.mark.parametrize("path", PATHS)
def test_per_network_views_are_independent_and_reproducible(cifar10_dir, path):
    root, _ = cifar10_dir
    d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard", data_path=path),
                   seed=0, device=CPU)
    first = next(d.train_batches(epoch=2, num_views=3))
    again = next(d.train_batches(epoch=2, num_views=3))
    later = next(d.train_batches(epoch=3, num_views=3))
    assert len(first.views) == 3 and all(v.shape == (32, 3, 32, 32) for v in first.views)
    assert not torch.equal(first.view(0), first.view(1)) and not torch.equal(first.view(1), first.view(2))
    assert all(torch.equal(a, b) for a, b in zip(first.views, again.views)) and torch.equal(first.y, again.y)
    assert not torch.equal(first.y, later.y)
    if path == "device":
        return
    # The stream does not depend on how many loader processes produce it.
    pooled = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard", loader_workers=1,
                                data_path="loader"), seed=0, device=CPU)
    assert pooled.workers == 1 and pooled._train.persistent_workers
    other = next(pooled.train_batches(epoch=2, num_views=3))
    assert all(torch.equal(a, b) for a, b in zip(first.views, other.views))


def test_view_augments_give_each_network_its_pipeline(cifar10_dir):
    root, raw = cifar10_dir
    d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), augment="standard",
                           view_augments="none,cutout,randaugment"), seed=0, device=CPU)
    assert d.path == "loader"  # randaugment exists only per image
    batch = next(d.train_batches(epoch=0, num_views=3))
    fmt = cifar_module.CIFAR10
    plain = _normalised(raw["x_train"], fmt.mean, fmt.std)
    assert bool(_matches(batch.view(0), plain).all())  # 'none': the images exactly as stored
    near_zero = (batch.view(1).abs() < 0.02).flatten(1).sum(1)
    assert bool((near_zero >= 3 * 8 * 8).all())  # cutout paints at least an 8x8 corner the mean colour
    assert not bool(_matches(batch.view(2), plain).any())
    # A single shared view keeps 'augment', whatever view_augments says.
    shared = next(d.train_batches(epoch=0, num_views=1))
    assert not bool(_matches(shared.x, plain).all())


def test_every_pipeline_runs_on_both_image_sizes():
    from kd_platform.data.augment import build_pipeline
    for size in (32, 64):
        img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
        for name in AUGMENTATIONS:
            out = build_pipeline(name, size, (0.5, 0.5, 0.5))(img)
            assert out.shape == img.shape and out.dtype == torch.uint8, name


def test_missing_cifar_names_the_directory_after_a_failed_download(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(UsageError) as err:
        build_data(file_recipe(dataset="cifar100", data_dir=str(where)), seed=0, device=CPU)
    msg = str(err.value)
    assert str(where / "cifar-100-python") in msg and "download" in msg and "\n" not in msg
    assert not where.exists()  # no folder, lock file or partial archive left behind
    with pytest.raises(UsageError, match="data_dir"):
        build_data(file_recipe(dataset="cifar10"), seed=0, device=CPU)


def test_absent_folder_is_downloaded_once(tmp_path, monkeypatch):
    calls = []

    def fake_download(fmt, root):
        calls.append(root)
        write_cifar10(root)
    monkeypatch.setattr(cifar_module, "download", fake_download)
    for _ in range(2):
        build_data(file_recipe(dataset="cifar10", data_dir=str(tmp_path)), seed=0, device=CPU)
    assert calls == [tmp_path]


def test_incomplete_or_corrupt_cifar_files_are_named(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    recipe = file_recipe(dataset="cifar10", data_dir=str(tmp_path))
    good = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UsageError, match="data_batch_3"):
        build_data(recipe, seed=0, device=CPU)
    dump_pickle(folder / "data_batch_3", {"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4})  # wrong shape
    with pytest.raises(UsageError, match="corrupt CIFAR-10 file .*data_batch_3"):
        build_data(recipe, seed=0, device=CPU)
    (folder / "data_batch_3").unlink()
    with pytest.raises(UsageError, match="data_batch_3 is missing"):
        build_data(recipe, seed=0, device=CPU)


@pytest.mark.parametrize("path", PATHS)
def test_zero_val_fraction_evaluates_val_on_test_and_says_so(cifar10_dir, caplog, path):
    root, _ = cifar10_dir
    with caplog.at_level(logging.WARNING):
        d = build_data(file_recipe(dataset="cifar10", data_dir=str(root), val_fraction=0.0, data_path=path),
                       seed=0, device=CPU)
        val = [y for _, y in d.eval_batches("val")]
    assert d.val_is_test and len(d.splits["train"]) == 200
    assert torch.equal(torch.cat(val), torch.cat([y for _, y in d.eval_batches("test")]))
    assert "TEST set" in caplog.text
    with pytest.raises(UsageError, match="no split 'holdout'"):
        next(d.eval_batches("holdout"))


@pytest.mark.parametrize("path", PATHS)
def test_engine_trains_on_cifar_files(cifar10_dir, one_thread, path):
    from kd_platform.run.engine import RunSpec, train
    root, _ = cifar10_dir
    spec = RunSpec.from_flat("ce", {"dataset": "cifar10", "data_dir": str(root), "arch": "resnet8", "epochs": 1,
                                    "batch_size": 64, "augment": "cutout", "loader_workers": 0,
                                    "data_path": path}, seed=0)
    metrics = train(spec, lambda m, save: None)
    assert 0.0 <= metrics["val/acc/students_mean"] <= 100.0 and "test/acc/net" in metrics


# ---------------------------------------------------------------- TinyImageNet

@pytest.mark.parametrize("path", PATHS)
def test_tinyimagenet_layout_labels_and_splits(tiny_dir, path):
    d = build_data(file_recipe(dataset="tinyimagenet", data_dir=str(tiny_dir), val_fraction=0.2, batch_size=8,
                           data_path=path), seed=0, device=CPU)
    assert (d.num_classes, d.in_channels, d.image_size, d.path) == (4, 3, 64, path)
    assert torch.bincount(d.splits["val"].labels, minlength=4).tolist() == [2] * 4
    assert len(d.splits["train"]) == 32 and len(d.splits["test"]) == 12
    # Classes are the sorted WordNet ids; the official val annotations label the test split.
    order = sorted(TINY_WNIDS)
    test_paths = [d.splits["test"].source.paths[i] for i in d.splits["test"].indices.tolist()]
    ann = dict(line.split("\t")[:2] for line in
               (tiny_dir / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines())
    assert [order[c] for c in d.splits["test"].labels.tolist()] == [ann[Path(p).name] for p in test_paths]
    batch = next(d.train_batches(epoch=0, num_views=2))
    assert batch.x.shape == (8, 3, 64, 64) and len(batch.views) == 2
    x, _ = next(d.eval_batches("test"))
    assert x.shape == (12, 3, 64, 64)
    # data_dir may also name the extracted folder itself.
    same = build_data(file_recipe(dataset="tinyimagenet", data_dir=str(tiny_dir / "tiny-imagenet-200"),
                              val_fraction=0.2), seed=0, device=CPU)
    assert torch.equal(same.splits["val"].labels, d.splits["val"].labels)


def test_tinyimagenet_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(UsageError, match=str(tmp_path / "absent")):
        build_data(file_recipe(dataset="tinyimagenet", data_dir=str(tmp_path / "absent")), seed=0, device=CPU)
    base = write_tinyimagenet(tmp_path, per_class_train=4, per_class_val=1)
    bad = base / "train" / TINY_WNIDS[2] / "images" / f"{TINY_WNIDS[2]}_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    # On the loader path decoding happens in a loader process, on the device path in a pool
    # of threads; the error must still arrive as one line naming the file.
    for path in PATHS:
        d = build_data(file_recipe(dataset="tinyimagenet", data_dir=str(tmp_path), batch_size=16, loader_workers=1,
                               data_path=path), seed=0, device=CPU)
        with pytest.raises(UsageError) as err:
            list(d.train_batches(epoch=0, num_views=1))
        assert str(bad) in str(err.value) and "\n" not in str(err.value), path
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(UsageError, match="val_annotations.txt: line 1"):
        build_data(file_recipe(dataset="tinyimagenet", data_dir=str(tmp_path)), seed=0, device=CPU)


# ---------------------------------------------------------------- recipe knobs and presets

def test_view_augments_are_checked_when_read():
    assert Recipe(view_augments="rotate, cutout,randaugment").view_augment_list() == ["rotate", "cutout",
                                                                                      "randaugment"]
    with pytest.raises(UsageError, match="view_augments.*'sharpen'"):
        build_config(Recipe, {"view_augments": "rotate,sharpen"})


def test_every_preset_is_valid_for_every_method_it_names():
    from kd_platform.run.engine import RunSpec
    from kd_platform.sweep.presets import load_preset, preset_for_method, preset_methods, preset_names
    names = preset_names()
    assert {"digits", "cifar100-resnet32", "cifar100-resnet110", "cifar100-wrn_20_8", "cifar10-resnet32",
            "cifar100-resnet32x4-resnet8x4", "cifar100-resnet56-resnet20", "cifar100-wrn_40_2-wrn_40_1",
            "cifar10-resnet56-resnet20"} <= set(names)
    for name in names:
        assert load_preset(name)
        methods = preset_methods(name)
        assert methods, name
        for method in methods:
            spec = RunSpec.from_flat(method, preset_for_method(name, method), seed=0)
            spec.resolved()


def test_preset_contents_follow_the_recipes_table():
    from kd_platform.sweep.presets import load_preset, preset_for_method
    online = load_preset("cifar100-resnet32")
    assert (online["epochs"], online["batch_size"], online["lr"], online["milestones"]) == (300, 128, 0.1, "150,225")
    assert preset_for_method("cifar100-resnet32", "pcl")["nesterov"] is True
    assert preset_for_method("cifar100-resnet32", "dml")["nesterov"] is False
    assert preset_for_method("cifar100-resnet32", "okdph")["view_augments"] == "rotate,cutout,randaugment"
    assert "view_augments" not in preset_for_method("cifar100-resnet32", "dml")
    offline = load_preset("cifar100-resnet32x4-resnet8x4")
    assert (offline["arch"], offline["teacher_arch"], offline["epochs"], offline["batch_size"], offline["lr"]) == \
        ("resnet8x4", "resnet32x4", 240, 64, 0.05)
    assert "teacher_arch" not in preset_for_method("cifar100-resnet32x4-resnet8x4", "ce")
    ie = preset_for_method("cifar10-resnet56-resnet20", "iekd")
    assert (ie["epochs"], ie["nesterov"], ie["milestones"], ie["ae_epochs"]) == (160, True, "80,120", 30)
    assert "ae_epochs" not in preset_for_method("cifar10-resnet56-resnet20", "iedml")


def test_unknown_preset_lists_the_known_ones():
    from kd_platform.sweep.presets import load_preset
    with pytest.raises(UsageError, match="unknown preset 'cifar1000'.*cifar100-resnet32"):
        load_preset("cifar1000")
