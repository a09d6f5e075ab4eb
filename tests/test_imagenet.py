"""ImageNet: the ImageFolder reader, the standard transforms on both data paths, torchvision's
networks in the zoo and published weights as teachers, and the ImageNet presets, on a tiny
ImageFolder of real JPEGs (sizes differ; one greyscale, one CMYK) written by the test."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, runs_in, sqlite_uri
from dataset_files import IMAGENET_WNIDS, file_recipe, write_imagenet
from torchvision import models as tvm
from torchvision.transforms import v2

from kd_platform.data import build_data
from kd_platform.data.imagenet_augment import RATIO, SCALE, crop_boxes, device_decodable, draw_crops, eval_crop
from kd_platform.errors import UsageError
from kd_platform.methods import get_method
from kd_platform.models import build_model
from kd_platform.models.torchvision_zoo import WEIGHTS, check_published_teacher, hub_file
from kd_platform.run.engine import RunSpec, train
from kd_platform.run.spec import Assets
from kd_platform.sweep.presets import preset_for_method, preset_methods
from kd_platform.teachers import TeacherProvider, prepare

pytestmark = pytest.mark.usefixtures("one_thread")

CROP = 32
PRESETS = ["imagenet-resnet34-resnet18", "imagenet-resnet50-mobilenet_v2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root, per_class_train=6, per_class_val=2)
    return root


def recipe(root: Path, **kw):
    return file_recipe(**{"dataset": "imagenet", "data_dir": str(root), "augment": "rrc", "crop_size": CROP,
                          "batch_size": 4, "val_fraction": 1 / 3, **kw})


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache of the test's own."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def place_published(arch: str, num_classes: int = len(IMAGENET_WNIDS), seed: int = 0) -> dict:
    """A torchvision network's state_dict saved where the hub cache keeps ``arch``'s published weights."""
    torch.manual_seed(seed)
    make = {"tv_resnet18": tvm.resnet18, "tv_resnet34": tvm.resnet34, "tv_resnet50": tvm.resnet50,
            "tv_mobilenet_v2": tvm.mobilenet_v2}[arch]
    state = make(num_classes=num_classes).state_dict()
    path = hub_file(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- the reader


@pytest.mark.parametrize("path", ["loader", "device"])
def test_reads_the_image_folder_with_its_labels_and_splits(root, path):
    data = build_data(recipe(root, data_path=path), 0, torch.device("cpu"))
    assert data.path == path and data.num_classes == 3 and data.in_channels == 3 and data.image_size == CROP
    splits = data.splits
    wnids = sorted(IMAGENET_WNIDS)
    for name, split in splits.items():
        for i, label in zip(split.indices.tolist(), split.labels.tolist()):
            assert Path(split.source.paths[i]).parent.name == wnids[label], name
    test_files = {Path(splits["test"].source.paths[i]).parent.parent.name for i in splits["test"].indices}
    assert test_files == {"val"} and len(splits["test"]) == 3 * 2
    train, val = set(splits["train"].indices.tolist()), set(splits["val"].indices.tolist())
    assert not train & val and len(train | val) == 3 * 6
    assert torch.bincount(splits["val"].labels).tolist() == [2, 2, 2]  # stratified: a third of each class
    assert {Path(splits["train"].source.paths[i]).parent.parent.name for i in train | val} == {"train"}


def _layout_error(tmp_path: Path, **kw) -> str:
    with pytest.raises(UsageError) as exc:
        build_data(recipe(tmp_path, **kw), 0, torch.device("cpu"))
    return _one_line(exc)


def test_missing_and_malformed_folders_are_one_line_errors(tmp_path):
    assert "ImageNet not found in" in _layout_error(tmp_path) and "train" in _layout_error(tmp_path)
    write_imagenet(tmp_path, per_class_train=2, per_class_val=1)
    base = tmp_path / "imagenet"
    # The official val archive extracts flat: its images are not yet in class folders.
    for folder in (base / "val").iterdir():
        for f in folder.iterdir():
            f.rename(base / "val" / f"{folder.name}_{f.name}")
        folder.rmdir()
    msg = _layout_error(tmp_path)
    assert f"no class folders in {base / 'val'}" in msg and "3 images sit directly in it" in msg
    (base / "val" / "n00000001").mkdir()
    assert f"{base / 'val' / 'n00000001'} is not a class" in _layout_error(tmp_path)
    (base / "val" / "n00000001").rmdir()
    (base / "val" / IMAGENET_WNIDS[0]).mkdir()
    assert f"no images in {base / 'val' / IMAGENET_WNIDS[0]}" in _layout_error(tmp_path)
    with pytest.raises(UsageError, match="knob 'augment': imagenet takes augmentation 'rrc'.*not 'standard'"):
        build_data(file_recipe(dataset="imagenet", data_dir=str(tmp_path), augment="standard"), 0,
                   torch.device("cpu"))


@pytest.mark.parametrize("path,workers", [("loader", 0), ("device", 0), ("device", 1)])
def test_a_corrupt_jpeg_is_a_one_line_error_naming_it(tmp_path, path, workers):
    write_imagenet(tmp_path, per_class_train=3, per_class_val=1)
    bad = tmp_path / "imagenet" / "train" / IMAGENET_WNIDS[2] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8" + bytes(range(256)) * 8)  # a JPEG's first marker, then noise
    data = build_data(recipe(tmp_path, data_path=path, val_fraction=0.0, batch_size=9, loader_workers=workers), 0,
                      torch.device("cpu"))
    with pytest.raises(UsageError) as exc:
        for _ in data.train_batches(0, 1):
            pass
    assert _one_line(exc).startswith(f"corrupt image file {bad}:")


# ---------------------------------------------------------------- the transforms


@pytest.mark.parametrize("path,workers", [("loader", 0), ("device", 0), ("device", 2)])
def test_train_and_eval_views_have_the_crop_shape(root, path, workers):
    data = build_data(recipe(root, data_path=path, loader_workers=workers), 0, torch.device("cpu"))
    assert data.steps_per_epoch() == 3
    batches = list(data.train_batches(0, 2))
    assert len(batches) == 3
    for batch in batches:
        assert [tuple(v.shape) for v in batch.views] == [(4, 3, CROP, CROP)] * 2 and batch.views[0].dtype == torch.float32
        assert not torch.equal(batch.views[0], batch.views[1])  # each view draws its own crops
    for split, n in (("val", 6), ("test", 6)):
        (x, y), = list(data.eval_batches(split))
        assert x.shape == (n, 3, CROP, CROP) and y.tolist() == [0, 0, 1, 1, 2, 2]
    (x, _), = list(data.train_eval_batches(5, 0))
    assert x.shape == (5, 3, CROP, CROP)


def test_both_paths_give_the_same_evaluation_views(root):
    """Resize 256 (scaled) + centre crop on either path, from the same files; the JPEG decoders
    may differ by a rounding step."""
    views = {p: torch.cat([x for x, _ in build_data(recipe(root, data_path=p), 0, torch.device("cpu"))
                           .eval_batches("test")]) for p in ("loader", "device")}
    assert (views["loader"] - views["device"]).abs().mean() < 0.05


def test_the_training_stream_depends_only_on_the_seed(root):
    a, b = (list(build_data(recipe(root, data_path="device"), 3, torch.device("cpu")).train_batches(1, 1))
            for _ in range(2))
    assert all(torch.equal(x.views[0], y.views[0]) and torch.equal(x.y, y.y) for x, y in zip(a, b))


def test_eval_view_is_resize_256_then_centre_crop_224():
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    expected = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(img)
    assert torch.equal(eval_crop(img, 224), expected)


def test_random_resized_crop_boxes_follow_torchvision():
    g = torch.Generator().manual_seed(0)
    n = 4000
    sizes = torch.stack([torch.randint(20, 500, (n,), generator=g), torch.randint(20, 500, (n,), generator=g)], 1)
    u, flips = draw_crops(n, g)
    boxes = crop_boxes(sizes, u)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    area = (h * w).double() / (sizes[:, 0] * sizes[:, 1]).double()
    # Rounding the sides moves area and ratio by a pixel's worth at most.
    slack = (1 / h.double() + 1 / w.double()) * 2
    assert (area >= SCALE[0] - slack).all() and (area <= SCALE[1] + slack).all()
    ratio = w.double() / h.double()
    assert (ratio >= RATIO[0] * (1 - slack)).all() and (ratio <= RATIO[1] * (1 + slack)).all()
    assert 0.45 < flips.double().mean() < 0.55
    # The mean area of torchvision's RandomResizedCrop on these images, estimated by its own sampler.
    torch.manual_seed(0)
    ref = torch.tensor([math.prod(v2.RandomResizedCrop.get_params(torch.empty(1, int(s[0]), int(s[1])),
                                                                    list(SCALE), list(RATIO))[2:]) / float(s[0] * s[1])
                        for s in sizes[:1000]])
    assert abs(area.mean().item() - ref.mean().item()) < 0.03
    # Nothing fits a 10x1000 strip: the whole height, cut to the widest ratio, centred.
    strip = crop_boxes(torch.tensor([[10, 1000]]), torch.full((1, 10, 4), 0.99, dtype=torch.float64))
    assert strip.tolist() == [[0, (1000 - 13) // 2, 10, 13]]


def test_device_decoder_takes_rgb_and_grey_jpegs_but_not_cmyk_or_png(root, tmp_path):
    from PIL import Image
    files = {p.name: p.read_bytes() for p in (root / "imagenet" / "train").rglob("*_0.JPEG")}
    modes = {p.name: Image.open(p).mode for p in (root / "imagenet" / "train").rglob("*_0.JPEG")}
    assert sorted(modes.values()) == ["CMYK", "L", "RGB"]
    for name, data in files.items():
        assert device_decodable(data) == (modes[name] != "CMYK"), modes[name]
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert not device_decodable((tmp_path / "x.png").read_bytes())


# ---------------------------------------------------------------- networks and teachers


@pytest.mark.parametrize("arch,make", [("tv_resnet18", tvm.resnet18), ("tv_resnet34", tvm.resnet34),
                                       ("tv_resnet50", tvm.resnet50), ("tv_mobilenet_v2", tvm.mobilenet_v2)])
def test_zoo_networks_load_torchvision_state_dicts_and_compute_torchvision_outputs(arch, make):
    torch.manual_seed(1)
    theirs = make(num_classes=5).eval()
    ours = build_model(arch, 5).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        taps = ours.stage_features(x)
    assert list(taps) == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert [t.shape[-1] for t in taps.values()][1:] == [16, 8, 4, 2]
    assert taps["stage4"].shape[1] == ours.feature_channels and ours.fc.out_features == 5


def _offline_spec(root: Path, tmp_path: Path, arch: str, **kw) -> RunSpec:
    return RunSpec.from_flat("kd", {"dataset": "imagenet", "data_dir": str(root), "augment": "rrc",
                                    "crop_size": CROP, "arch": "tv_resnet18", "teacher_arch": arch,
                                    "batch_size": 4, "loader_workers": 0, "val_fraction": 1 / 3, **kw}, seed=0,
                             assets=Assets(teacher_cache=str(tmp_path / "teachers")))


def test_a_published_teacher_loads_from_the_hub_cache_without_network(root, tmp_path, torch_home, no_network):
    state = place_published("tv_resnet34")
    assert hub_file("tv_resnet34").is_relative_to(torch_home)
    assert hub_file("tv_resnet34").name == Path(WEIGHTS["tv_resnet34"].url).name
    spec = _offline_spec(root, tmp_path, "tv_resnet34")
    check_published_teacher(spec)
    data = build_data(recipe(root), 0, torch.device("cpu"))
    provider = TeacherProvider(spec, data, torch.device("cpu"))
    teacher = provider("tv_resnet34")
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not any(p.requires_grad for p in teacher.parameters())
    assert provider.tags() == {"teacher.source": "published"} and not (tmp_path / "teachers").exists()


def test_an_imagenet_teacher_without_weights_or_checkpoint_is_a_one_line_error(root, tmp_path, torch_home,
                                                                                no_network):
    spec = _offline_spec(root, tmp_path, "tv_resnet50")
    with pytest.raises(UsageError) as exc:
        check_published_teacher(spec)
    msg = _one_line(exc)
    assert "no teacher 'tv_resnet50' for imagenet" in msg and str(hub_file("tv_resnet50")) in msg
    assert "could not be downloaded" in msg and "--teacher-checkpoint" in msg
    with pytest.raises(UsageError, match="torchvision publishes no weights for 'resnet18'"):
        check_published_teacher(_offline_spec(root, tmp_path, "resnet18"))
    data = build_data(recipe(root), 0, torch.device("cpu"))
    with pytest.raises(UsageError, match="never trained inside a run"):
        TeacherProvider(spec, data, torch.device("cpu"))("tv_resnet50")
    assert not (tmp_path / "teachers").exists()  # nothing was trained or cached


# ---------------------------------------------------------------- presets


def _preset_runs() -> list[tuple[str, str]]:
    return [(p, m) for p in PRESETS for m in preset_methods(p)]


def test_presets_hold_the_published_recipe():
    for preset in PRESETS:
        knobs = preset_for_method(preset, "kd")
        assert (knobs["epochs"], knobs["batch_size"], knobs["lr"], knobs["momentum"], knobs["weight_decay"],
                knobs["milestones"], knobs["augment"], knobs["dataset"]) == \
            (100, 256, 0.1, 0.9, 1e-4, "30,60,90", "rrc", "imagenet")
        assert {"ce", "kd", "dist", "cmkd", "dkd"} <= set(preset_methods(preset))  # every single and offline one
        assert "iekd" not in preset_methods(preset)
    assert (preset_for_method(PRESETS[0], "kd")["arch"], preset_for_method(PRESETS[0], "kd")["teacher_arch"]) == \
        ("tv_resnet18", "tv_resnet34")
    assert (preset_for_method(PRESETS[1], "kd")["arch"], preset_for_method(PRESETS[1], "kd")["teacher_arch"]) == \
        ("tv_mobilenet_v2", "tv_resnet50")


@pytest.mark.parametrize("preset,method", _preset_runs())
def test_every_preset_trains_one_epoch_with_a_published_teacher(preset, method, root, tmp_path, torch_home,
                                                                no_network):
    """The preset's own student; the teacher resnet18 (small) with published weights; 32-pixel
    crops. The teacher's reported test accuracy is that of the placed weights."""
    teacher_state = place_published("tv_resnet18", seed=5)
    knobs = {**preset_for_method(preset, method), "data_dir": str(root), "crop_size": CROP, "epochs": 1,
             "batch_size": 4, "loader_workers": 0, "val_fraction": 1 / 3,
             "data_path": "device" if preset == PRESETS[1] else "loader"}
    offline = get_method(method).kind == "offline"
    if offline:
        knobs["teacher_arch"] = "tv_resnet18"
    reports = []
    spec = RunSpec.from_flat(method, knobs, seed=0, assets=Assets(teacher_cache=str(tmp_path / "t")))
    final = train(spec, lambda m, save: reports.append(m), teachers=prepare(spec, torch.device("cpu")))
    assert len(reports) == 1 and math.isfinite(final["train/loss/loss"])
    assert 0 <= final["test/acc/students_mean"] <= 100
    if offline:
        assert final["teacher.source"] == "published"
        net = build_model("tv_resnet18", 3)
        net.load_state_dict(teacher_state)
        net.eval()
        data = build_data(recipe(root, data_path=knobs["data_path"]), 0, torch.device("cpu"))
        with torch.no_grad():
            correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in data.eval_batches("test"))
        assert final["test/acc/teacher"] == pytest.approx(100 * correct / 6)


@pytest.mark.slow
def test_the_command_line_trains_an_imagenet_preset(root, tmp_path, torch_home):
    place_published("tv_resnet18")
    uri = sqlite_uri(tmp_path / "m.db")
    out = run_cli("platform.train", "kd", "--preset", PRESETS[0], "--epochs", "1", "--set", f"data_dir={root}",
                  "--set", "batch_size=4", "--set", f"crop_size={CROP}", "--set", "loader_workers=0",
                  "--set", "val_fraction=0.34", "--set", "teacher_arch=tv_resnet18", "--tracking-uri", uri,
                  "--out", str(tmp_path / "res"), env={"TORCH_HOME": str(torch_home)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED" and run.data.tags["teacher.source"] == "published"
    assert run.data.params["arch"] == "tv_resnet18" and run.data.params["crop_size"] == str(CROP)
