"""A run's trained networks as MLflow models, and the registration of a sweep's best one.

The networks are rebuilt from the run's final checkpoint, in the process that writes the run
(the sweep's driver, a plain run's), rather than in the trial: that process already reaches
the store (a trial on a cluster's GPU node may not), a trial stopped by ASHA never gets this
far, and a store that is away holds this write with the run's others.

Each network is what ``Method.analysis_networks`` names: every student as its plain
architecture (fused students unstacked through ``member_state_dict``), and OKDPH's mean HWM.
It is logged in eval mode on the CPU with MLflow's pickle format, whose ``load_model`` gives
the architecture's own ``nn.Module`` (so loading needs ``kd_platform`` importable); the
export format (``pt2``) would load without it, but its modules refuse ``.eval()``, which
every user of a classifier calls.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

from kd_platform.errors import UsageError, error_line
from kd_platform.run.checkpoint import STATE_FILE, load_checked
from kd_platform.run.spec import RunSpec, data_recipe

log = logging.getLogger(__name__)

LOG_MODELS = ("none", "best", "completed")
"""``--log-models``: nothing; only the network a sweep registers; every network of every run
that trains to its last epoch."""
DEFAULT_LOG_MODELS = "completed"
MODEL_TAG = "model."        # run tag ``model.<network>``: the network's ``models:/<id>`` URI
PARAMS_METRIC = "model/params/"
SIZE_METRIC = "model/size_mb/"
ERROR_TAG = "model.error"


def knobs_hash(spec: RunSpec) -> str:
    """The configuration's identity, seed aside: runs of one configuration share it."""
    knobs = {k: v for k, v in spec.all_knobs().items() if k != "seed"}
    return hashlib.sha256(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def network_arch(spec: RunSpec, network: str) -> str:
    """A network's architecture: its own ``<network>_arch`` knob where the method has one, else
    the recipe's ``arch`` (students, and the HWM that averages them)."""
    recipe, cfg = spec.resolved()
    return str(getattr(cfg, f"{network}_arch", None) or recipe.arch)


def registered_name(spec: RunSpec, network: str) -> str:
    recipe, _ = spec.resolved()
    return f"kd-{spec.method}-{recipe.dataset}-{network_arch(spec, network)}"


_SHAPES: dict[tuple, tuple[int, int, int]] = {}


def data_shape(spec: RunSpec) -> tuple[int, int, int]:
    """(classes, channels, image size) of a run's data, read once per dataset in a process."""
    import torch

    from kd_platform.data import build_data
    recipe = data_recipe(spec)
    key = (recipe.dataset, recipe.data_dir, recipe.val_fraction)
    if key not in _SHAPES:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the run itself logged the dataset's warnings
        try:
            data = build_data(recipe, spec.seed, torch.device("cpu"))
        finally:
            root.setLevel(level)
        _SHAPES[key] = int(data.num_classes), int(data.in_channels), int(data.image_size)
    return _SHAPES[key]


def fetch_state(location: str, scratch: Path) -> dict[str, Any]:
    """The checkpoint at ``location`` (a directory holding ``STATE_FILE``, local or on storage
    Ray reaches), fetched into ``scratch`` when remote."""
    if location.startswith("file://"):
        location = location[len("file://"):]
    if "://" in location:
        from ray.train import Checkpoint
        Checkpoint(location).to_directory(str(scratch))
        location = str(scratch)
    return load_checked(Path(location) / STATE_FILE)


def load_networks(spec: RunSpec, state: Mapping[str, Any]) -> dict[str, Any]:
    """The method's plain networks (``analysis_networks``) with the checkpoint's weights, each a
    separate CPU module in eval mode."""
    import copy
    from dataclasses import replace
    from types import SimpleNamespace

    import torch

    from kd_platform.methods.base import freeze
    from kd_platform.models import build_model
    from kd_platform.run.engine import build_method
    fused = bool((state.get("layout") or {}).get("fused", False))
    spec = replace(spec, recipe={**spec.recipe, "fused": "true" if fused else "false"})
    classes, channels, size = data_shape(spec)
    device = torch.device("cpu")

    def untrained_teacher(arch: str) -> Any:  # its trained weights come with the checkpoint
        return freeze(build_model(arch, classes, channels))
    method = build_method(spec, SimpleNamespace(num_classes=classes, in_channels=channels, image_size=size), device,
                          untrained_teacher)
    method.load_state_dict(state["method"])
    method.eval()
    return {name: copy.deepcopy(net).float().eval() for name, net in method.analysis_networks().items()}


def network_names(spec: RunSpec) -> list[str]:
    """The names of the networks ``load_networks`` gives for ``spec`` (built untrained, on the CPU)."""
    import torch

    from kd_platform.methods.base import freeze
    from kd_platform.models import build_model
    from kd_platform.run.engine import build_method
    classes, channels, size = data_shape(spec)
    shape = SimpleNamespace(num_classes=classes, in_channels=channels, image_size=size)

    def teacher(arch: str) -> Any:
        return freeze(build_model(arch, classes, channels))
    return list(build_method(spec, shape, torch.device("cpu"), teacher).analysis_networks())


def _signature(classes: int, channels: int, size: int) -> tuple[Any, Any]:
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    images = (-1, channels, size, size)
    sig = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), images)]),
                         outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))
    return sig, np.zeros((1, channels, size, size), dtype=np.float32)


def _not_pickle_note(record: logging.LogRecord) -> bool:
    """MLflow's advice against pickle is weighed in this module's docstring."""
    return "Pickle or CloudPickle" not in record.getMessage()


def size_of(net: Any) -> tuple[int, float]:
    """Parameters, and megabytes of the saved module (what the model's file holds)."""
    import torch
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return sum(p.numel() for p in net.parameters()), buffer.tell() / 1e6


def log_networks(c: Any, uri: str, run_id: str, spec: RunSpec, networks: Mapping[str, Any], step: int,
                 tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """Log each network as an MLflow PyTorch model of run ``run_id`` (a LoggedModel named after
    the network, with the run's params, an input example and signature of the data's shape,
    and tags for the method, architecture, dataset and knobs hash); tag the run with each
    model's URI and log its size. Returns ``{network: model_id}``."""
    import mlflow.pytorch
    import torch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from kd_platform.tracking import log_metrics, set_tags
    recipe, _ = spec.resolved()
    signature, example = _signature(*data_shape(spec))
    experiment_id = c.get_run(run_id).info.experiment_id
    quiet = logging.getLogger("mlflow.pytorch")
    quiet.addFilter(_not_pickle_note)
    logged, sizes = {}, {}
    try:
        for name, net in networks.items():
            model_tags = {"method": spec.method, "network": name, "arch": network_arch(spec, name),
                          "dataset": recipe.dataset, "knobs_hash": knobs_hash(spec), "seed": str(spec.seed),
                          **(tags or {})}
            # An explicit LoggedModel: MLflow would otherwise file it under the process's current
            # experiment (the Default one) rather than the run's.
            model = c.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags=model_tags)
            with _use_tracking_uri(uri):
                mlflow.pytorch.log_model(net, name=name, model_id=model.model_id, run_id=run_id, step=step,
                                         signature=signature, input_example=example,
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                         serialization_format="pickle")
            logged[name] = model.model_id
            params, mb = size_of(net)
            sizes.update({PARAMS_METRIC + name: params, SIZE_METRIC + name: mb})
    finally:
        quiet.removeFilter(_not_pickle_note)
    set_tags(c, run_id, {MODEL_TAG + name: f"models:/{mid}" for name, mid in logged.items()})
    log_metrics(c, run_id, sizes, step=step)
    return logged


def log_run_models(c: Any, uri: str, run_id: str, spec: RunSpec, location: str,
                   only: list[str] | None = None, tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """Log the networks of the checkpoint at ``location`` (``only``: these of them) to ``run_id``.
    A run whose networks cannot be rebuilt is tagged with why (``model.error``); its training
    stands, and no exception leaves here except the store's own."""
    from kd_platform.tracking import set_tags
    with tempfile.TemporaryDirectory(prefix="kd-model-") as scratch:
        try:
            state = fetch_state(location, Path(scratch))
            networks = load_networks(spec, state)
        except Exception as exc:  # noqa: BLE001 - bookkeeping of a finished run
            reason = error_line(exc)
            log.warning("models of run %s not logged: %s", run_id, reason)
            set_tags(c, run_id, {ERROR_TAG: reason[:500]})
            return {}
        if only is not None:
            networks = {k: v for k, v in networks.items() if k in only}
        return log_networks(c, uri, run_id, spec, networks, int(state.get("epoch", 0)), tags)


def logged_models(run: Any) -> dict[str, str]:
    """``{network: model_id}`` of a run's logged models, from its tags."""
    return {k[len(MODEL_TAG):]: v.split("/", 1)[-1].lstrip("/") for k, v in run.data.tags.items()
            if k.startswith(MODEL_TAG) and v.startswith("models:/")}


def best_network(c: Any, run_ids: list[str], names_of: Any = None) -> tuple[float, Any, str] | None:
    """Among the networks of these runs (``names_of(run)``; default: the ones logged as models),
    the one with the highest validation accuracy, as (accuracy, run, network). The test split
    stays out of the choice."""
    best: tuple[float, Any, str] | None = None
    for run in (c.get_run(r) for r in run_ids if r):
        for name in (names_of or logged_models)(run):
            acc = run.data.metrics.get(f"val/acc/{name}")
            if acc is not None and (best is None or acc > best[0]):
                best = (acc, run, name)
    return best


def register(c: Any, name: str, model_id: str, run_id: str, tags: Mapping[str, Any]) -> str:
    """Register model ``model_id`` as a new version of ``name``; the console's line. A store
    without a model registry is that line, not a failure."""
    try:
        try:
            c.create_registered_model(name, description="The best network of kd-platform sweeps "
                                                        "(see each version's tags)")
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
        # The artifacts' own location: a ``models:/`` source would be resolved against the process's
        # current tracking URI, not this client's store.
        source = c.get_logged_model(model_id).artifact_location
        version = c.create_model_version(name, source, run_id=run_id,
                                         tags={k: str(v) for k, v in tags.items()}, model_id=model_id)
    except Exception as exc:  # noqa: BLE001 - the sweep's results stand without a registry
        return (f"Model registry: not available on this store ({error_line(exc)[:200]}); "
                f"the model stays at models:/{model_id}")
    return f"Registered {name} version {version.version} (models:/{name}/{version.version})"


def check_artifact_location(uri: str, experiment: str) -> None:
    """Fail before anything starts where the experiment's artifacts (models, reports) could not
    be written: a local artifact location that this user cannot write to. A server's own
    artifact store is the server's to check."""
    from kd_platform.tracking import artifact_root, raw_client
    location: str | None = None
    if uri.startswith("sqlite:///"):
        exp = raw_client(uri).get_experiment_by_name(experiment) if Path(uri[len("sqlite:///"):]).is_file() else None
        root = artifact_root(uri)
        location = exp.artifact_location if exp is not None else (f"{root}/{experiment}" if root else None)
    if not location or not (location.startswith("file:") or "://" not in location):
        return
    path = Path(location[len("file://"):] if location.startswith("file://") else location.removeprefix("file:"))
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"MLflow store {uri}: artifact location '{location}' of experiment '{experiment}' is not "
                         f"writable ('{existing}')")
