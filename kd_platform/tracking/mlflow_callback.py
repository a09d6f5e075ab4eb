"""A Ray Tune callback, living in the sweep driver, that keeps one MLflow child run per trial.

Logging from the driver (rather than from each trial) means a trial that ASHA stops or
that crashes still gets its run closed with the right status, and the sqlite store has
a single writer. A resumed sweep finds each trial's existing run by its Ray trial id
instead of opening a duplicate.

Writes go through a ``BufferedClient``: while the store is away (a server restarting, a sqlite
file locked by another sweep) they are held in order and sent when it is back, so a callback
neither raises into Tune nor holds up the sweep. ``close`` (after the sweep's last write) waits
for the queue to drain, or keeps what is left in the sweep directory and says so.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kd_platform import tracking
from kd_platform.run.checkpoint import CHECKPOINT_TAG, checkpoint_location
from kd_platform.run.evaluation import warning_tags
from kd_platform.run.spec import Assets, RunSpec, data_recipe
from kd_platform.tracking.mlflow_writer import (
    PATIENCE_ENV,
    BufferedClient,
    StoreUnavailable,
    Write,
    is_transient,
    patience_s,
    string_tags,
)
from kd_platform.tracking.models import DEFAULT_LOG_MODELS, log_run_models
from kd_platform.tracking.system_metrics import log_samples
from kd_platform.tracking.teacher_artifacts import record_teacher

TRIAL_TAG = "ray.trial_id"
# Strings a trial reports about where it trains (trial.py); gpu_ids is "" on a CPU trial.
PLACEMENT_KEYS = ("node_id", "gpu_ids", "train_worker_nodes", "train_worker_gpus")
GPU_KEYS = ("gpu_ids", "train_worker_gpus")  # tagged even when empty: the run had no GPU
REPLAYED_TAG = "epochs_replayed"
log = logging.getLogger(__name__)


class MlflowTrialLogger(Callback):
    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, method: str,
                 fixed: dict[str, Any], seed: int, epochs: int, tags: dict[str, str],
                 unsent: Path | None = None, assets: Assets | None = None,
                 log_models: str = DEFAULT_LOG_MODELS) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.log_models = log_models  # "completed": every trial that trains to its last epoch logs its networks
        self.assets = assets or Assets()
        self.method, self.fixed, self.seed, self.epochs, self.tags = method, fixed, seed, epochs, tags
        self.runs: dict[str, str] = {}
        self.last_epoch: dict[str, int] = {}
        self.teachers_logged: set[str] = set()  # hashes of teachers already stored on the parent run
        self.placement: dict[str, dict[str, str]] = {}  # per trial, the placement tags last written
        self.warned: set[str] = set()  # trials already tagged with what their metrics warn about
        self.logged_epoch: dict[str, int] = {}  # per trial, the last epoch its MLflow run holds
        self.replayed: dict[str, int] = {}  # per trial, epochs trained again after a restart
        self.checkpoints: dict[str, str] = {}  # per trial, the checkpoint location last tagged
        self.datasets: dict[tuple, Any] = {}  # per data recipe and seed, the dataset its runs log
        self.existing_epoch: dict[str, int] = {}  # per trial whose run a resumed sweep found: its last epoch
        self.system_step: dict[str, int] = {}  # per trial, the step of its next system metrics point
        self.unsent = unsent  # where writes the store never took are kept (and, on resume, read back)
        self.gave_up = False
        self._client: BufferedClient | None = None

    @property
    def client(self) -> BufferedClient:
        if self._client is None:
            self._client = BufferedClient(tracking.raw_client(self.uri), self._open,
                                          lambda trial_id, step: 0 < step <= self.existing_epoch.get(trial_id, 0),
                                          spill_to=self.unsent, handlers={"log_models": self._log_models})
            if self.unsent and self._client.load(self.unsent):
                log.warning("sending %d MLflow write(s) kept in %s", len(self._client.pending), self.unsent)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def run_id(self, trial: Any) -> str:
        """The trial's run id; while the store is away, a stand-in that its queued writes carry."""
        if trial.trial_id not in self.runs:
            self.runs[trial.trial_id] = self.client.open(trial.trial_id, {"config": dict(trial.config)})
        return self.client.run_id(self.runs[trial.trial_id])

    def run_of(self, trial_id: str) -> str | None:
        """The MLflow run id of a trial this callback has logged, or None."""
        handle = self.runs.get(trial_id)
        return None if handle is None else self.client.run_id(handle)

    def _open(self, write: Write) -> str:
        """Find the trial's run (a resumed sweep's) or create it, with its params, dataset and tags.
        Safe to run again after any failure: a run made by a try whose reply was lost is found."""
        trial_id, config = write.args["trial"], write.args["config"]
        c = self.client.client
        run_id = write.args.get("created")
        if run_id is None:
            found = c.search_runs([self.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                                  f"tags.`{tracking.PARENT_TAG}` = '{self.parent_run_id}'")
            if found and found[0].data.params:
                run_id = found[0].info.run_id
                tracking.reopen(c, run_id, found[0].data.tags)
                self.existing_epoch[trial_id] = _last_epoch(c, run_id)
                self.logged_epoch[trial_id] = max(self.logged_epoch.get(trial_id, 0), self.existing_epoch[trial_id])
                self.replayed[trial_id] = int(found[0].data.tags.get(REPLAYED_TAG, 0))
                self.runs[trial_id] = run_id
                return run_id
            seed = self.spec_of(config).seed
            tags = string_tags({**self.tags, "seed": seed, **self.run_tags(config), TRIAL_TAG: trial_id,
                                tracking.PARENT_TAG: self.parent_run_id})
            run_id = found[0].info.run_id if found else c.create_run(
                self.experiment_id, run_name=f"{self.spec_of(config).method}-{trial_id}", tags=tags).info.run_id
            write.args["created"] = run_id
        spec = self.spec_of(config)
        tracking.log_params(c, run_id, spec.all_knobs())
        self.log_dataset(c, run_id, spec)
        tracking.set_tags(c, run_id, {f"swept.{k}": v for k, v in config.items()})
        self.runs[trial_id] = run_id
        return run_id

    def spec(self, trial: Any) -> RunSpec:
        return self.spec_of(trial.config)

    def run_tags(self, config: dict[str, Any]) -> dict[str, Any]:
        """Tags of one trial's run besides the sweep's own (a comparison names its cell)."""
        return {}

    def spec_of(self, config: dict[str, Any]) -> RunSpec:
        config = dict(config)
        seed = int(config.pop("seed", self.seed))  # ablations repeat each cell over seeds
        return RunSpec.from_flat(self.method, {**self.fixed, **config}, seed, self.assets)

    def log_dataset(self, c: Any, run_id: str, spec: RunSpec) -> None:
        """The trial's data as the run's dataset input; described once per data recipe and seed
        (a TPE sweep: once; an ablation: once per seed), here in the driver."""
        recipe = data_recipe(spec)
        key = (recipe.dataset, recipe.data_dir, recipe.val_fraction, spec.seed)
        if key not in self.datasets:
            try:
                self.datasets[key] = tracking.describe_data(recipe, spec.seed)
            except Exception as exc:  # bookkeeping only: the trial reports its own data errors
                log.warning("dataset of %s not recorded: %s", run_id, exc)
                self.datasets[key] = None
        if self.datasets[key] is not None:
            tracking.log_dataset(c, run_id, self.datasets[key])

    def record_teacher(self, trial: Any, run_id: str) -> None:
        """Tag an offline trial with its teacher; the file itself goes to the parent run once."""
        record_teacher(self.client, run_id, self.spec(trial), self.parent_run_id, self.teachers_logged,
                       getattr(trial, "last_result", None))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result.get("epoch", 0))
        self.last_epoch[trial.trial_id] = epoch
        run_id = self.run_id(trial)
        if 0 < epoch <= self.logged_epoch.get(trial.trial_id, 0):
            # Tune persists a trial's checkpoint only after its callbacks have seen the result:
            # a driver killed in between (or a trial that dies then) resumes one checkpoint
            # earlier and trains that epoch again. MLflow keeps the first record, one per step.
            self.replayed[trial.trial_id] = self.replayed.get(trial.trial_id, 0) + 1
            tracking.set_tags(self.client, run_id, {REPLAYED_TAG: self.replayed[trial.trial_id]})
        else:  # guarded: a resumed run found only once the store is back may hold the epoch already
            tracking.log_metrics(self.client, run_id, result, step=epoch, guard=[trial.trial_id, epoch])
            self.logged_epoch[trial.trial_id] = max(epoch, self.logged_epoch.get(trial.trial_id, 0))
        self.system_step[trial.trial_id] = log_samples(self.client, run_id, result,
                                                       self.system_step.get(trial.trial_id, 0))
        self.tag_placement(trial, run_id, result)
        warnings = warning_tags(result)
        if warnings and trial.trial_id not in self.warned:
            tracking.set_tags(self.client, run_id, warnings)
            self.warned.add(trial.trial_id)

    def tag_placement(self, trial: Any, run_id: str, result: dict) -> None:
        """Tags the run with the node(s) and GPU(s) it trains on; written on the first result
        and again only if a restarted trial reports another placement, not once per epoch."""
        placement = {k: str(result[k]) for k in PLACEMENT_KEYS
                     if result.get(k) or (k in result and k in GPU_KEYS)}
        if placement and placement != self.placement.get(trial.trial_id):
            tracking.set_tags(self.client, run_id, placement)
            self.placement[trial.trial_id] = placement

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self.tag_checkpoint(trial, checkpoint)

    def tag_checkpoint(self, trial: Any, checkpoint: Any) -> None:
        """Tags the run with where its latest checkpoint is (``analysis.flatness`` reads it)."""
        location = checkpoint_location(checkpoint)
        if location and location != self.checkpoints.get(trial.trial_id):
            tracking.set_tags(self.client, self.run_id(trial), {CHECKPOINT_TAG: location})
            self.checkpoints[trial.trial_id] = location

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        last = self.last_epoch.get(trial.trial_id) or self.logged_epoch.get(trial.trial_id, 0)
        stopped = last < int(self.spec(trial).recipe.get("epochs", self.epochs))
        tracking.set_tags(self.client, run_id, {
            "trial_outcome": "asha_stopped" if stopped else "completed",
            "asha_stopped": str(stopped).lower(), "epochs_run": last})
        self.tag_checkpoint(trial, getattr(trial, "checkpoint", None))
        self.record_teacher(trial, run_id)
        location = self.checkpoints.get(trial.trial_id)
        if self.log_models == "completed" and not stopped and location:
            self.client.submit(Write("log_models", run_id, {"config": dict(trial.config), "location": location}))
        self.client.set_terminated(run_id, status="FINISHED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Close the runs of trials that this sweep's Tune state does not know.

        A driver killed after starting a trial but before Tune's next experiment snapshot
        leaves that trial out of the snapshot; the resumed sweep asks its searcher for a
        replacement, and the first trial's run would stay RUNNING forever beside it. It is
        ended as KILLED and moved to MLflow's trash (restorable), so that a sweep shows
        exactly the trials it ran.

        First every held write is sent (waiting up to the patience), so that the runs' states are
        the store's; if the store is still away, ``close`` reports it."""
        if self.client.flush():
            self.gave_up = True
            return
        known = {t.trial_id for t in trials}
        try:
            running = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{self.parent_run_id}' "
                                                    f"and attributes.status = 'RUNNING'")
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("MLflow store away again: runs of trials lost with a killed driver stay RUNNING")
            return
        for run in running:
            if run.data.tags.get(TRIAL_TAG) in known:
                continue
            tracking.set_tags(self.client, run.info.run_id, {
                "trial_outcome": "lost", "error": "the sweep driver died before Ray Tune recorded this trial; "
                                                  "the resumed sweep ran another trial in its place"})
            self.client.set_terminated(run.info.run_id, status="KILLED")
            self.client.delete_run(run.info.run_id)

    def _log_models(self, run_id: str, args: dict[str, Any]) -> None:
        """A completed trial's networks as MLflow models (a queued write: held while the store is away)."""
        log_run_models(self.client.client, self.uri, run_id, self.spec_of(args["config"]), args["location"])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_id(trial)
        tracking.set_tags(self.client, run_id, {"trial_outcome": "failed", "error": _error_text(trial)})
        self.record_teacher(trial, run_id)
        self.client.set_terminated(run_id, status="FAILED")


    def close(self) -> None:
        """After the sweep's last write: every held write sent, or kept in ``unsent`` and reported
        in one line (``StoreUnavailable``); a resumed sweep sends them."""
        patience = 0.0 if self.gave_up else patience_s()
        left = self.client.flush(patience)
        if self.unsent:
            self.client.spill(self.unsent)
        if left:
            kept = f"kept in {self.unsent}; --resume sends them" if self.unsent else "not kept"
            raise StoreUnavailable(f"MLflow store {self.uri} still away after waiting {patience_s():.0f}s "
                                   f"(${PATIENCE_ENV}): {left} write(s) unsent, {kept}")


def _last_epoch(client: Any, run_id: str) -> int:
    history = client.get_metric_history(run_id, "epoch")
    return int(max((m.value for m in history), default=0)) if history else 0


def _error_text(trial: Any) -> str:
    """The last line of the trial's traceback (the exception and its message)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return "trial failed (no error file recorded)"

