"""Layer teachers: the teacher stage that runs before an offline method is built, and its
cross-node store. Imports run and below; MLflow records of a teacher live in tracking.

Trained, frozen teachers for offline methods: trained once, cached on disk, reused by every run.

A teacher is described by everything that changes it: the dataset and its split, the
architecture, the seed and the teacher's own recipe (the offline method's ``teacher_*``
knobs). It is trained with the engine itself (method ``ce``) and stored under the sha256
of that description's canonical JSON::

    <cache>/<hash>/teacher.pt   the network's state_dict (what ``--teacher-checkpoint`` takes too)
    <cache>/<hash>/meta.json    the description and the teacher's accuracies

Whatever is trained on top of a teacher alone (IE-KD's auto-encoder) is cached the same
way, keyed by the teacher's hash and its own recipe. Runs that need a missing entry at
the same time (a sweep's concurrent trials, DDP ranks) take an exclusive ``flock`` on
``<hash>/.lock``; the one that waited finds the finished file and only loads it. Files
are written atomically, and ``teacher.pt`` last, so its presence means the entry is whole.

On a cluster the cache is node-local, and a second tier stops every node from training its
own copy: the asset ``teacher_store`` (the sweep's ``--storage-path``, ``teachers/`` under it)
names storage every node reaches, from which a node fetches what it lacks and to which it
publishes what it trained (``kd_platform.teachers.store``). A run reports where each entry
came from (``teacher.source``: ``cache``, ``fetched``, ``trained`` or ``checkpoint``).
``$KD_TEACHER_CACHE`` in a node's environment names that node's own cache, for nodes whose
local disks are not at the path the command line gave.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from kd_platform.data import DataModule, build_data
from kd_platform.errors import UsageError
from kd_platform.methods import get_method
from kd_platform.methods.base import MethodKind, freeze
from kd_platform.models import build_model
from kd_platform.models.base import ZooNet
from kd_platform.models.torchvision_zoo import PUBLISHED, published_teacher
from kd_platform.run import engine
from kd_platform.run.checkpoint import load_checked, save_atomic
from kd_platform.run.spec import RunSpec
from kd_platform.teachers.store import ERRORS as STORE_ERRORS
from kd_platform.teachers.store import TRAINED, TeacherStore, fetch_or_make, origin

log = logging.getLogger(__name__)

TEACHER_FILE, META_FILE, LOCK_FILE = "teacher.pt", "meta.json", ".lock"
FORMAT = 1
"""Part of every description: bump it when a change to training makes old cache entries wrong."""
ARTIFACT_DIR = "teacher"
CACHED, CHECKPOINT = "cache", "checkpoint"
"""Sources of an entry besides the store's ``FETCHED`` and ``TRAINED``: this node's cache, the user's file."""
CACHE_ENV = "KD_TEACHER_CACHE"


def description_hash(description: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``description``."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_cache() -> Path:
    """Where teachers go when a run names no cache (programmatic use; the CLI always names one)."""
    return Path.home() / ".cache" / "kd-platform" / "teachers"


def cache_dir(spec: RunSpec) -> Path:
    """This node's cache: ``$KD_TEACHER_CACHE`` where the node sets it, else the run's asset."""
    return Path(os.environ.get(CACHE_ENV) or spec.assets.teacher_cache or default_cache())


def teacher_store(spec: RunSpec) -> TeacherStore | None:
    """The shared tier of the run's cache (asset ``teacher_store``), or None without one or
    when it cannot be opened (then each node trains its own, with a warning)."""
    uri = spec.assets.teacher_store
    if not uri:
        return None
    try:
        return TeacherStore(uri)
    except STORE_ERRORS as exc:
        log.warning("teacher store %s cannot be opened (%s): teachers are not shared between nodes", uri, exc)
        return None


def source_tag(kind: str) -> str:
    """The run tag saying where a cache entry of ``kind`` came from."""
    return "teacher.source" if kind == "teacher" else f"teacher.{kind}.source"


def teacher_spec(spec: RunSpec, arch: str | None = None) -> RunSpec:
    """The ``ce`` run that trains the teacher ``arch`` (default: the method's ``teacher_arch``) of ``spec``."""
    recipe, cfg = spec.resolved()
    if not hasattr(cfg, "teacher_recipe"):
        raise UsageError(f"method '{spec.method}' does not learn from a trained teacher")
    return RunSpec("ce", {}, asdict(cfg.teacher_recipe(recipe, arch)), spec.seed)


def teacher_description(spec: RunSpec, arch: str | None = None) -> dict[str, Any]:
    ts = teacher_spec(spec, arch)
    return {"format": FORMAT, "kind": "teacher", "method": ts.method, **ts.all_knobs()}


@lru_cache(maxsize=16)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered while the file is unchanged."""
    st = Path(path).stat()
    return _file_sha256(str(path), st.st_mtime_ns, st.st_size)


def teacher_info(spec: RunSpec) -> dict[str, str]:
    """``teacher.hash`` and ``teacher.path`` of an offline run's teacher, for run tags; ``{}`` otherwise.

    The path is where the teacher is (or will be, once a run has trained it)."""
    if get_method(spec.method).kind != "offline":
        return {}
    user = spec.assets.teacher_checkpoint
    if user:
        return {"teacher.hash": file_hash(Path(user)), "teacher.path": user}
    digest = description_hash(teacher_description(spec))
    return {"teacher.hash": digest, "teacher.path": str(cache_dir(spec) / digest / TEACHER_FILE)}


@contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Training a teacher in the middle of building a run must not move the run's random
    streams, or a run would differ depending on whether its teacher was already cached."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def cached_file(cache: Path, description: Mapping[str, Any], filename: str,
                make: Callable[[], tuple[Any, dict[str, Any]]],
                store: TeacherStore | None = None) -> tuple[Path, str]:
    """``<cache>/<hash>/<filename>``, made by ``make() -> (object to save, extra meta)`` if missing.

    Returns the path and where it came from: ``CACHED`` (already here), ``FETCHED`` (copied
    from ``store``) or ``TRAINED`` (this call ran ``make`` and published the result to
    ``store``). Exactly one of several processes of a node asking at once goes further than
    the local cache: the others block on the lock and then find the file. Across nodes the
    store's own claim does the same (see ``kd_platform.teachers.store``)."""
    digest = description_hash(description)
    folder = Path(cache) / digest
    target = folder / filename
    if target.is_file():
        return target, CACHED
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even if make() raises
        if target.is_file():
            return target, CACHED

        def make_here() -> None:
            obj, extra = make()
            _write_json_atomic(folder / META_FILE, {"hash": digest, "description": dict(description), **extra,
                                                    "made_by": origin()})
            save_atomic(obj, target)
        if store is None:
            make_here()
            return target, TRAINED
        return target, fetch_or_make(store, digest, folder, (META_FILE, filename), make_here)


def _write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_teacher(ts: RunSpec, device: torch.device) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train the ``ce`` run ``ts`` with the engine; its network's state_dict and its accuracies."""
    recipe, _ = ts.resolved()

    def report(metrics: dict[str, Any], save: Callable[[Path], None]) -> None:
        log.info("teacher %s epoch %d/%d  loss %.4f  val/acc %.2f", recipe.arch, metrics["epoch"],
                 recipe.epochs, metrics["train/loss/loss"], metrics["val/acc/net"])

    t0 = time.perf_counter()
    log.info("training teacher %s for %d epochs (cached for later runs)", recipe.arch, recipe.epochs)
    with _isolated_rng(device):
        trained = engine.fit(ts, report, device=device)
    final = trained.metrics
    # The cache holds the bare network, as the method contract names it (``ce``'s ``net``).
    net_state = {k: v.detach().cpu() for k, v in trained.method.analysis_networks()["net"].state_dict().items()}
    extra = {"val_acc": final.get("val/acc/net"), "test_acc": final.get("test/acc/net"),
             "train_s": round(time.perf_counter() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return net_state, extra


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict file, loaded with ``weights_only=True``; anything else is a one-line
    :class:`UsageError` naming the file."""
    try:
        state = load_checked(path)
    except UsageError as exc:
        raise UsageError(f"teacher {exc}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"teacher checkpoint '{path}' is not a state_dict (a mapping of names to tensors)")
    return dict(state)


def load_teacher_state(net: nn.Module, state: Mapping[str, Tensor], path: Path, arch: str) -> nn.Module:
    """``net`` with ``state`` loaded; a state of another architecture is a one-line
    :class:`UsageError` naming the file it came from."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        if wrong:
            k = wrong[0]
            detail = f"'{k}' has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
        else:
            detail = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise UsageError(f"teacher checkpoint '{path}' does not fit architecture '{arch}' "
                         f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped "
                         f"entries; e.g. {detail})")
    net.load_state_dict(state)
    return net


def check_teacher_checkpoint(path: Path, spec: RunSpec) -> None:
    """Fail now, before any run is created, if ``path`` cannot be ``spec``'s teacher."""
    state = read_state_dict(path)  # before the data: a corrupt file fails without loading any
    _, cfg = spec.resolved()
    data = build_data(engine.data_recipe(spec), spec.seed, torch.device("cpu"))
    load_teacher_state(build_model(cfg.teacher_arch, data.num_classes, data.in_channels), state, path,
                       cfg.teacher_arch)


class TeacherProvider:
    """``BuildEnv.get_teacher`` of a run: ``provider(arch)`` is that run's frozen teacher.

    With the asset ``teacher_checkpoint`` the teacher is the user's file; otherwise it
    comes from the cache, trained there first if missing (or fetched from the shared store).
    ``built`` lists the cache entries this provider had to make (the others it found ready
    or fetched); :meth:`tags` says where each kind of entry came from."""

    def __init__(self, spec: RunSpec, data: Any | None, device: torch.device) -> None:
        self.spec, self.device = spec, device
        if data is not None:
            self.bind(data)
        self.cache = cache_dir(spec)
        self.checkpoint = spec.assets.teacher_checkpoint
        self.built: list[str] = []
        self.sources: dict[str, str] = {}  # entry kind ("teacher", "iekd_autoencoder") -> its source
        self._teachers: dict[str, ZooNet] = {}

    def bind(self, data: Any) -> "TeacherProvider":
        """Shape the teachers this provider builds for ``data`` (its classes and channels)."""
        self.num_classes, self.in_channels = data.num_classes, data.in_channels
        return self

    def __call__(self, arch: str) -> ZooNet:
        if arch not in self._teachers:
            path = self.teacher_path(arch)
            net = build_model(arch, self.num_classes, self.in_channels)
            load_teacher_state(net, read_state_dict(path), path, arch)
            freeze(net.to(self.device))
            self._teachers[arch] = net
        return self._teachers[arch]

    def teacher_hash(self, arch: str) -> str:
        if self.checkpoint:
            return file_hash(Path(self.checkpoint))
        return description_hash(teacher_description(self.spec, arch))

    def tags(self) -> dict[str, str]:
        """Run tags: where each entry this run uses came from (``teacher.source`` and the like)."""
        return {source_tag(kind): source for kind, source in self.sources.items()}

    def teacher_path(self, arch: str) -> Path:
        if self.checkpoint:
            self.sources["teacher"] = CHECKPOINT
            return Path(self.checkpoint)
        published = published_teacher(self.spec.resolved()[0].dataset, arch)  # ImageNet: never trained here
        if published is not None:
            self.sources["teacher"] = PUBLISHED
            return published
        ts = teacher_spec(self.spec, arch)
        description = teacher_description(self.spec, arch)
        return self._cached(description, TEACHER_FILE, lambda: train_teacher(ts, self.device))

    def derived(self, arch: str, name: str, recipe: Mapping[str, Any],
                build: Callable[[DataModule], dict[str, Tensor]]) -> dict[str, Tensor]:
        """The state_dict ``build(train data)`` returns for teacher ``arch``, cached under the
        teacher's hash, ``name``, ``recipe``, the data and the seed.

        ``build`` runs with the global generators seeded by the run's seed (and restored
        afterwards) on the whole, unsharded training split with the run's batch size."""
        r = engine.data_recipe(self.spec)
        data_keys = ("dataset", "data_dir", "val_fraction", "augment", "batch_size")
        description = {"format": FORMAT, "kind": name, "teacher": self.teacher_hash(arch),
                       "recipe": dict(recipe), "data": {k: getattr(r, k) for k in data_keys},
                       "seed": self.spec.seed}

        def make() -> tuple[dict[str, Tensor], dict[str, Any]]:
            t0 = time.perf_counter()
            with _isolated_rng(self.device):
                engine.seed_everything(self.spec.seed)
                state = build(build_data(r, self.spec.seed, self.device))
            return ({k: v.detach().cpu() for k, v in state.items()},
                    {"train_s": round(time.perf_counter() - t0, 1)})
        return load_checked(self._cached(description, f"{name}.pt", make))

    def _cached(self, description: Mapping[str, Any], filename: str,
                make: Callable[[], tuple[Any, dict[str, Any]]]) -> Path:
        missing = not (self.cache / description_hash(description) / filename).is_file()
        path, source = cached_file(self.cache, description, filename, make,
                                   teacher_store(self.spec) if missing else None)
        self.sources.setdefault(str(description["kind"]), source)  # the first ask is where the run got it
        if source == TRAINED:
            self.built.append(path.parent.name)
        return path


def prepare(spec: RunSpec, device: torch.device) -> Callable[[Any], TeacherProvider] | None:
    """The teacher stage of a run, before its training: an offline method's teacher is made
    ready now (found in the cache, fetched from the shared store, or trained into the cache),
    so the run's own training never starts another. Returns what ``engine.train`` takes as
    ``teachers`` (the run's provider, once the data is known); None for other methods.

    What a method trains on top of the teacher alone (IE-KD's auto-encoder) is made here too,
    by the method's ``teacher_stage``, through the same provider and its cache."""
    method = get_method(spec.method)
    if method.kind != MethodKind.OFFLINE:
        return None
    provider = TeacherProvider(spec, None, device)
    _, cfg = spec.resolved()
    provider.teacher_path(cfg.teacher_arch)
    if method.has_teacher_stage():  # its teacher network is needed now, shaped for the data
        provider.bind(build_data(engine.data_recipe(spec), spec.seed, torch.device("cpu")))
        method.teacher_stage(cfg, provider)
    return provider.bind
