"""A sweep: Ray Tune with Optuna's TPE and ASHA over one method's search space, one MLflow
parent run for the sweep and one child run per trial.

Layout of a sweep directory ``<out>/<name>/``: Ray Tune's experiment state and trial
checkpoints, ``optuna.db`` (the study, so a resumed sweep keeps its TPE history) and
``kd_sweep.json`` (what ``--resume`` needs: method, settings, MLflow parent run id).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd_platform import tracking
from kd_platform.errors import OneLineFailure, UsageError, error_line
from kd_platform.launch.launcher import Launch
from kd_platform.launch.trial import run_trial
from kd_platform.run.evaluation import collapsed
from kd_platform.run.spec import Assets
from kd_platform.sweep.ablate import Ablation
from kd_platform.sweep.confirm import (
    DEFAULT_SEEDS,
    DEFAULT_TOP,
    STAGE_TAG,
    Confirmed,
    ConfirmPlan,
    SearchTrial,
    Verdict,
    confirm_seeds,
    judge,
    markdown,
    plan_confirmation,
)
from kd_platform.sweep.disk import LOW_DISK_BYTES, DiskGuard, check_free, free_bytes
from kd_platform.sweep.space import SearchSpace
from kd_platform.tracking.models import DEFAULT_LOG_MODELS

log = logging.getLogger(__name__)
STATE_FILE = "kd_sweep.json"
LAYOUT = 2
"""Written into every sweep's state file. Ray pickles the searcher, scheduler and callbacks by
module path, so a sweep written before the package moved into layers (no ``layout``) cannot be
restored by this code: it is refused with one line instead of an unpickling traceback."""


@dataclass
class SweepSettings:
    method: str
    space: SearchSpace
    samples: int
    epochs: int
    max_concurrent: int | None  # None: as many trials as the Ray cluster fits, resolved by run_sweep
    seed: int
    tracking_uri: str
    experiment: str
    out: Path
    name: str
    launch: Launch
    address: str | None = None
    resume: bool = False
    parent_run_id: str | None = None
    verbose: int = 1  # 0: the summary only; 1: a header and a line per trial; 2: Ray Tune's tables and worker logs
    ablation: Ablation | None = None
    assets: Assets = field(default_factory=Assets)
    confirm_top: int = DEFAULT_TOP      # 0: no confirmation stage
    confirm_seeds: int = DEFAULT_SEEDS
    confirm_plan: ConfirmPlan | None = None  # set once the search has finished
    search: dict[str, Any] | None = None     # the search's summary, kept for a resumed confirmation
    finished: bool = False                   # the sweep ran to its end: --resume changes nothing
    experiment_id: str | None = None
    report: bool = True                      # write the analysis report at the end (not kept)
    log_models: str = DEFAULT_LOG_MODELS     # none | best | completed (see tracking.models)

    @property
    def confirms(self) -> bool:
        return self.ablation is None and self.confirm_top > 0 and self.confirm_seeds > 0

    @property
    def trial_fixed(self) -> dict[str, Any]:
        """Knobs every trial shares: the space's fixed ones and the sweep's epoch count."""
        pinned = self.ablation.pinned if self.ablation else {}
        return {**self.space.fixed, **pinned, "epochs": self.epochs}

    @property
    def experiment_path(self) -> str:
        """Ray Tune's experiment directory: under ``--storage-path`` (a bucket on a cluster)."""
        return f"{self.launch.storage_path.rstrip('/')}/{self.name}"

    @property
    def sweep_dir(self) -> Path:
        return self.out / self.name

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "space_source": self.space.source, "swept": self.space.swept,
                "fixed": self.space.fixed, "metric": self.space.metric, "mode": self.space.mode,
                "grace_period": self.space.grace_period, "reduction_factor": self.space.reduction_factor,
                "samples": self.samples, "epochs": self.epochs, "max_concurrent": self.max_concurrent,
                "seed": self.seed, "tracking_uri": self.tracking_uri, "experiment": self.experiment,
                "name": self.name, "launch": asdict(self.launch), "parent_run_id": self.parent_run_id,
                "ablation": self.ablation.to_json() if self.ablation else None, "assets": asdict(self.assets),
                "confirm_top": self.confirm_top, "confirm_seeds": self.confirm_seeds,
                "confirm_plan": self.confirm_plan.to_json() if self.confirm_plan else None, "search": self.search,
                "finished": self.finished, "experiment_id": self.experiment_id, "layout": LAYOUT,
                "log_models": self.log_models}

    @staticmethod
    def from_sweep_dir(path: Path) -> "SweepSettings":
        state = path / STATE_FILE
        if not state.is_file():
            raise UsageError(f"--resume: '{path}' holds no sweep (no {STATE_FILE})")
        try:
            d = json.loads(state.read_text())
            if d.get("layout") != LAYOUT:
                raise UsageError(f"--resume: '{path}' was written by an older layout of kd-platform and cannot be "
                                 "resumed by this one; finish it with the version that started it, or start anew")
            fixed, assets = _without_asset_keys(d["fixed"], d.get("assets"))
            space = SearchSpace(d["method"], d["space_source"], d["swept"], fixed, d["metric"], d["mode"],
                                d["samples"], d["epochs"], d["grace_period"], d["reduction_factor"])
            return SweepSettings(d["method"], space, d["samples"], d["epochs"], d["max_concurrent"], d["seed"],
                                 d["tracking_uri"], d["experiment"], path.parent, d["name"], Launch(**d["launch"]),
                                 resume=True, parent_run_id=d["parent_run_id"],
                                 ablation=Ablation(**d["ablation"]) if d.get("ablation") else None,
                                 assets=assets, confirm_top=d["confirm_top"], confirm_seeds=d["confirm_seeds"],
                                 confirm_plan=ConfirmPlan.from_json(d["confirm_plan"]) if d["confirm_plan"] else None,
                                 search=d["search"], finished=bool(d.get("finished")),
                                 experiment_id=d.get("experiment_id"),
                                 log_models=d.get("log_models", DEFAULT_LOG_MODELS))
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--resume: '{state}' is unreadable ({exc})") from None


def _without_asset_keys(fixed: dict[str, Any], assets: dict[str, Any] | None) -> tuple[dict[str, Any], Assets]:
    """Sweeps started before assets had their own entry kept them as ``asset.<name>`` fixed
    knobs; such a sweep resumes with them moved where they belong now."""
    old = {k[len("asset."):]: v for k, v in fixed.items() if k.startswith("asset.")}
    return {k: v for k, v in fixed.items() if not k.startswith("asset.")}, Assets.from_json({**old, **(assets or {})})


class SweepInterrupted(Exception):
    """Ctrl-C (or SIGINT) ended Tune early: its state is saved and the sweep resumes from it."""


def _after_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _fit(tuner: Any) -> Any:
    """``tuner.fit()``, raising SweepInterrupted where a Ctrl-C ended it.

    Tune answers SIGINT by saving its state and returning as if it were done. Its handler puts
    back the handler it found when the signal comes, and only then; so the handler installed
    here before ``fit`` is in place afterwards exactly when Tune was interrupted."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.signal(signal.SIGINT, _after_interrupt)
    results = tuner.fit()
    if main:
        interrupted = signal.getsignal(signal.SIGINT) is _after_interrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if interrupted:
            raise SweepInterrupted
    return results


@dataclass
class SweepOutcome:
    best_config: dict[str, Any]
    best_metric: float | None
    best_run_id: str | None
    parent_run_id: str
    experiment_id: str
    sweep_dir: Path
    trials: int
    failed: int
    stopped_early: int
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    verdict: Verdict | None = None  # the confirmation stage's, when it ran
    confirm_wall_s: float = 0.0
    warnings: list[str] = field(default_factory=list)  # what trials' metrics warned about, counted
    registered: str = ""  # the model registry's line, where the sweep registered (or tried to)


def _init_ray(address: str | None, dashboard: bool, log_to_driver: bool = True) -> None:
    # Checkpointing every epoch is deliberate (a crash costs at most one epoch); Tune's
    # warning about frequent experiment snapshots would only bury the trial table.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    else:
        ray.init(include_dashboard=dashboard, logging_level=logging.WARNING, configure_logging=True,
                 log_to_driver=log_to_driver)


class RayStart:
    """``ray.init`` on a background thread, so that the sweep's driver does its own setup while
    Ray's head processes come up (several seconds on a small machine); ``wait`` waits for it.

    The thread that starts a local cluster stays alive, idle, until the process ends: Ray's
    head processes are started with a parent-death signal, which Linux sends when the thread
    that forked them exits, not the process."""

    def __init__(self, address: str | None, dashboard: bool, log_to_driver: bool = True) -> None:
        self.error: BaseException | None = None
        self.ready = threading.Event()
        logging.getLogger("ray._private.worker").addFilter(_not_sigterm_note)
        threading.Thread(target=self._run, args=(address, dashboard, log_to_driver), name="ray-init",
                         daemon=True).start()

    def _run(self, address: str | None, dashboard: bool, log_to_driver: bool) -> None:
        import ray
        started = not ray.is_initialized()
        try:
            _init_ray(address, dashboard, log_to_driver)
        except BaseException as exc:  # raised again in the sweep's thread by wait()
            self.error = exc
            started = False
        finally:
            self.ready.set()
        if started:
            threading.Event().wait()

    def wait(self) -> None:
        self.ready.wait()
        if isinstance(self.error, ConnectionError):
            first = str(self.error).strip().splitlines()[0] if str(self.error).strip() else "no answer"
            raise UsageError(f"--address: no Ray cluster to join ({first})") from None
        if self.error is not None:
            raise self.error
        # Ray sets this handler only from the main thread: a SIGTERM ends the driver through
        # sys.exit, so that Ray and the MLflow runs are shut down as on Ctrl-C.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))


def _not_sigterm_note(record: logging.LogRecord) -> bool:
    """Ray's note that it set no SIGTERM handler off the main thread (RayStart.wait sets it)."""
    return "SIGTERM handler is not set" not in record.getMessage()


@dataclass(frozen=True)
class Packing:
    """How many trials run at once, and how they share the cluster's GPUs."""
    max_concurrent: int
    trials_per_gpu: float | None  # None when trials take no GPU
    line: str                     # one line for the console; empty when trials take no GPU


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _plural(x: float, word: str) -> str:
    return f"{_count(x)} {word}{'' if 0 < x <= 1 else 's'}"


def _max_resources() -> dict[str, float] | None:
    """The most an autoscaling cluster can grow to (what Ray Train itself checks), or None
    where the cluster publishes no autoscaler config (a fixed or local cluster).

    Private Ray API, on purpose: ``ray.cluster_resources()`` only counts the nodes already
    up, and no public call exposes the autoscaler's maximum; Ray Train reads this one for
    the same question. Any failure here only means "not known"."""
    try:
        from ray._private.state import state
        found = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: any failure only means "not known"
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def plan_packing(launch: Launch, samples: int, resources: dict[str, float], max_concurrent: int | None = None,
                 max_resources: dict[str, float] | None = None, resumed: bool = False) -> Packing:
    """Trials at once: ``max_concurrent`` when given, else as many as the cluster's CPUs and
    (when trials take GPUs) GPUs fit, at most ``samples`` and at least one.

    A trial needs ``launch.cpus`` CPUs and ``launch.gpus`` GPUs per worker; a TorchTrainer
    trial also holds 0.01 CPU for its driver (see ``_trainable``). Ray never splits one
    fractional GPU request across GPUs, so a GPU takes ``floor(1 / gpus)`` workers."""
    workers = 1 if launch.in_process() else launch.workers
    cpu_need = launch.cpus * workers + (0 if launch.in_process() else 0.01)
    totals = {k: float(resources.get(k, 0.0)) for k in ("CPU", "GPU")}
    grows = {k: v for k, v in (max_resources or {}).items() if k in totals and v > totals[k]}
    usable = {**totals, **grows}
    eps = 1e-9
    fits = {"CPU": math.floor(usable["CPU"] / cpu_need + eps)}
    per_gpu: float | None = None
    if launch.gpus > 0:
        whole = math.floor(usable["GPU"] + eps)
        if launch.gpus < 1:
            slots = math.floor(1 / launch.gpus + eps)  # workers one GPU takes
            per_gpu = slots / workers
            worker_slots = whole * slots
        else:
            per_gpu = 1 / (launch.gpus * workers)
            worker_slots = math.floor(whole / launch.gpus + eps)
        if whole > 0:
            fits["GPU"] = worker_slots // workers
    fit = max(1, min(samples, *fits.values()))
    chosen = max_concurrent if max_concurrent is not None else fit
    if launch.gpus <= 0 or per_gpu is None:
        return Packing(chosen, None, "")
    each = f"{_plural(launch.gpus, 'GPU')} and {_plural(launch.cpus, 'CPU')} each"
    if workers == 1:
        head = f"Packing: {_plural(per_gpu, 'trial')} per GPU ({each})" if per_gpu >= 1 else \
            f"Packing: 1 trial per {_plural(1 / per_gpu, 'GPU')} ({each})"
    else:
        head = (f"Packing: {workers} Ray Train workers per trial ({each}), "
                f"{_plural(per_gpu, 'trial')} per GPU")
    cluster = f"{_plural(totals['GPU'], 'GPU')} and {_plural(totals['CPU'], 'CPU')} in the cluster"
    if grows:
        cluster += (" now, up to " + " and ".join(_plural(usable[k], k) for k in ("GPU", "CPU") if k in grows)
                    + " as the autoscaler adds nodes")
    if "GPU" not in fits:
        cluster += " (no GPU yet: trials wait for GPU nodes to join)"
    if resumed:
        tail = f"up to {chosen} trials at once, as when the sweep started"
    elif max_concurrent is not None:
        tail = f"{fit} fit at once, --max-concurrent runs up to {chosen}"
    else:
        tail = f"up to {chosen} trials at once"
        if "GPU" in fits and fits["CPU"] < fits["GPU"] and fit == fits["CPU"] < samples:
            tail += " (the CPUs are the limit)"
    return Packing(chosen, round(per_gpu, 4), f"{head}; {cluster}: {tail}")


def _trainable(s: SweepSettings) -> Any:
    from ray import tune
    return with_trial_resources(tune.with_parameters(run_trial, method=s.method, fixed=s.trial_fixed,
                                                     seed=s.seed, launch=s.launch, assets=s.assets), s.launch)


def with_trial_resources(fn: Any, launch: Launch) -> Any:
    """A trainable with what one trial reserves on the cluster."""
    from ray import tune
    if launch.in_process():
        resources = {"CPU": launch.cpus, "GPU": launch.gpus}
    else:  # the trial only drives a TorchTrainer whose workers reserve the real resources
        resources = {"CPU": 0.01}
        import ray
        if "head" in ray.cluster_resources():  # cluster.yaml's marker: keep trial drivers on the head
            resources["head"] = 0.01
    return tune.with_resources(fn, resources)


def _parent_run(s: SweepSettings, c: Any, experiment_id: str, trials_per_gpu: float | None) -> str:
    if s.parent_run_id:
        tracking.reopen(c, s.parent_run_id)
        return s.parent_run_id
    run = c.create_run(experiment_id, run_name=s.name, tags={
        "kind": "ablation" if s.ablation else "sweep", "method": s.method, "seed": s.seed,
        "git_commit": tracking.git_commit(),
        "sweep_dir": str(s.sweep_dir), **tracking.package_versions(),
        **({"preset": s.space.extra["preset"]} if "preset" in s.space.extra else {})})
    params = {"samples": s.samples, "epochs": s.epochs, "max_concurrent": s.max_concurrent, "seed": s.seed,
              "metric": s.space.metric, "mode": s.space.mode, "space_file": s.space.source,
              "workers_per_trial": s.launch.workers, "cpus_per_trial": s.launch.cpus,
              "gpus_per_trial": s.launch.gpus,
              **({"trials_per_gpu": _count(trials_per_gpu)} if trials_per_gpu is not None else {}),
              **{f"fixed.{k}": v for k, v in s.space.fixed.items()},
              **{f"swept.{k}": json.dumps(v) for k, v in s.space.swept.items()}}
    if s.ablation:
        a = s.ablation
        params.update({"ablate": ",".join(a.knobs), "seeds": len(a.seeds), "from_sweep": a.from_sweep or "",
                       **{f"default.{k}": v for k, v in a.defaults.items()},
                       **{f"pinned.{k}": v for k, v in a.pinned.items()}})
    try:
        tracking.log_params(c, run.info.run_id, params)
    except BaseException:
        c.set_terminated(run.info.run_id, status="FAILED")
        raise
    return run.info.run_id


@dataclass
class Driver:
    """What a driver holds once it may start trials: the store, its experiment, the packing
    of trials on the cluster, and the lock on its directory (held while this object lives)."""
    client: Any
    experiment_id: str
    packing: Packing
    lock: Any


def start_driver(run_dir: Path, resume: bool, address: str | None, launch: Launch, trials: int,
                 max_concurrent: int | None, verbose: int, header: str, uri: str, experiment: str,
                 what: str) -> Driver:
    """Start (or join) Ray, open the MLflow store and the experiment, plan the packing, print the
    header, and create and lock ``run_dir``: the steps a sweep and a comparison share."""
    check_free(run_dir)
    lock = _hold(run_dir) if resume else None  # before Ray starts: a second driver changes nothing
    # Workers' own logs reach the console only with -v: the trials' results say what matters.
    if verbose < 2:
        _quiet_libraries()
    ray_start = RayStart(address, dashboard=not launch.in_process(), log_to_driver=verbose >= 2)
    # While Ray's processes start, this thread opens the MLflow store. The experiment and the
    # parent run wait for Ray: the default concurrency comes from the cluster's resources and
    # the parent run logs it, and a cluster that cannot be reached leaves no run in MLflow.
    if address or os.environ.get("RAY_ADDRESS"):
        ray_start.wait()  # a cluster that is not there: one line, before the MLflow store is touched
    c = tracking.client(uri)
    ray_start.wait()
    import ray
    packing = plan_packing(launch, trials, ray.cluster_resources(), max_concurrent, _max_resources(), resumed=resume)
    if verbose >= 1:
        print(header, flush=True)
    if packing.line:
        print(packing.line, flush=True)
    experiment_id = tracking.ensure_experiment(uri, experiment)
    try:
        run_dir.mkdir(parents=True, exist_ok=resume)
    except FileExistsError:
        raise UsageError(f"{what} directory '{run_dir}' was just created by another driver") from None
    return Driver(c, experiment_id, packing, lock or _hold(run_dir))


def run_sweep(s: SweepSettings) -> SweepOutcome:
    """Run (or resume) the sweep described by ``s``; every input was validated beforehand."""
    t0 = time.perf_counter()
    from kd_platform.sweep.progress import Progress
    from kd_platform.tracking.mlflow_callback import MlflowTrialLogger
    from kd_platform.tracking.mlflow_writer import UNSENT_FILE
    d = start_driver(s.sweep_dir, s.resume, s.address, s.launch, s.samples, s.max_concurrent, s.verbose,
                     _header(s), s.tracking_uri, s.experiment, "sweep")
    c, experiment_id, packing = d.client, d.experiment_id, d.packing  # d holds the directory's lock until return
    s.max_concurrent = packing.max_concurrent
    s.parent_run_id = _parent_run(s, c, experiment_id, packing.trials_per_gpu)
    confirm_results, confirm_wall = None, 0.0
    try:
        _save_state(s)
        stage = {} if s.ablation else {STAGE_TAG: "search"}
        logger = MlflowTrialLogger(s.tracking_uri, experiment_id, s.parent_run_id, s.method, s.trial_fixed,
                                   s.seed, s.epochs, tags={"method": s.method, "seed": str(s.seed),
                                                           "git_commit": tracking.git_commit(),
                                                           "sweep": s.name, "kind": "trial", **stage},
                                   unsent=s.sweep_dir / UNSENT_FILE, assets=s.assets, log_models=s.log_models)
        trainable = _trainable(s)
        progress = Progress(s.space.metric, s.epochs, list(s.ablation.grid if s.ablation else s.space.swept),
                            s.samples, "ablation" if s.ablation else "search")
        guard = DiskGuard([str(s.sweep_dir), s.launch.storage_path], s.max_concurrent or 1)
        callbacks = [logger, progress, guard] if s.verbose == 1 else [logger, guard]
        if s.confirm_plan is None:  # the search (or the ablation) has not finished yet
            results = _fit(_search_tuner(s, trainable, callbacks))
            if not s.ablation:
                _fail_stale_optuna_trials(s)
            s.search = _search_summary(s, results, logger)
        if s.confirms and (s.confirm_plan is not None or (s.search or {}).get("best_value") is not None):
            if s.confirm_plan is None:
                trials = [SearchTrial(**t) for t in s.search.pop("trials")]
                s.confirm_plan = plan_confirmation(trials, s.space, s.epochs, s.confirm_top,
                                                   confirm_seeds(s.seed, s.confirm_seeds))
                _save_state(s)
            logger.tags[STAGE_TAG] = "confirm"
            progress.start("confirm", len(s.confirm_plan.points()))
            t_confirm = time.perf_counter()
            confirm_results = _fit(_confirm_tuner(s, trainable, callbacks, s.confirm_plan))
            confirm_wall = time.perf_counter() - t_confirm
    except SweepInterrupted:
        close_interrupted(c, logger, experiment_id, s.parent_run_id, guard)
        raise
    except BaseException as exc:
        close_failed(exc, c, experiment_id, s.parent_run_id, s.sweep_dir)
        raise
    verdict = _verdict(s, confirm_results, logger) if confirm_results is not None else None
    # The parent's last writes join the trials' queue: all are sent, or kept in the sweep directory.
    outcome = _finish(s, logger.client, experiment_id, verdict, time.perf_counter() - t0)
    outcome.confirm_wall_s = confirm_wall
    outcome.warnings = progress.warnings()
    if verdict is not None and verdict.rows and s.log_models != "none":
        outcome.registered = register_best(s, logger, verdict)
    logger.close()
    s.finished, s.experiment_id = True, experiment_id
    _save_state(s)
    return outcome


def close_interrupted(c: Any, logger: Any, experiment_id: str, parent_run_id: str, guard: DiskGuard) -> None:
    """After Ctrl-C: runs of the trials Tune stopped are closed, not left RUNNING (``--resume``
    reopens them), and the held writes are sent. Where the disk guard sent the Ctrl-C, its one
    line is raised."""
    _close_running(logger.client, experiment_id, parent_run_id, "KILLED", {"trial_outcome": "interrupted"})
    c.set_terminated(parent_run_id, status="KILLED")
    logger.close()
    if guard.low is not None:
        raise OneLineFailure(guard.message()) from None


def close_failed(exc: BaseException, c: Any, experiment_id: str, parent_run_id: str, sweep_dir: Path) -> None:
    """After any other failure: every run still RUNNING closed with the reason; a full disk
    raises one line saying so (a full disk breaks Tune's own files first, and Tune reports
    whatever broke, not why)."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    reason = error_line(exc)[:500]
    try:  # best effort: the store may be what failed
        _close_running(c, experiment_id, parent_run_id, status, {"trial_outcome": "failed", "error": reason})
        tracking.set_tags(c, parent_run_id, {"error": reason})
    except Exception as also:  # noqa: BLE001 - the first failure is the one to report
        log.debug("runs not closed after %s: %s", reason, also)
    c.set_terminated(parent_run_id, status=status)
    free = free_bytes(sweep_dir)
    if status == "FAILED" and free is not None and free < LOW_DISK_BYTES:
        raise OneLineFailure(f"disk full under {sweep_dir} ({free // 1024} KiB free) when the run failed "
                             f"({reason}); free space, then --resume") from exc


def _quiet_libraries() -> None:
    """MLflow's note that it creates a store's tables and Optuna's that it created a study are
    bookkeeping the sweep's header already gives."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # A failed trial is one line of the sweep's own (its error's last line; the whole error is
    # the run's `error` tag in MLflow), not Tune's traceback.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    # Tune's newer console prints an experiment box and paths even at verbose=0; the older one
    # prints nothing there, and the sweep prints its own lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A failed upload of Tune's state (to a bucket, or to a full disk) stays visible, as one line.
    syncer = logging.getLogger("ray.train._internal.syncer")
    if not any(isinstance(f, _OneLine) for f in syncer.filters):
        syncer.addFilter(_OneLine())


class _OneLine(logging.Filter):
    """A library's log record in one line: its first line, and the error ending its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        lines = [line.strip() for line in record.getMessage().strip().splitlines() if line.strip()]
        if record.exc_info and record.exc_info[1] is not None:
            lines.append(error_line(record.exc_info[1]))
        if len(lines) > 1:
            record.msg, record.args = f"{lines[0]} ({lines[-1]})", ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _header(s: SweepSettings) -> str:
    what = (f"ablation of {', '.join(s.ablation.knobs)}: {s.ablation.cells} cells x {len(s.ablation.seeds)} seeds"
            if s.ablation else f"TPE + ASHA search of {s.samples} trials")
    confirm = (f", then a confirmation of the {s.confirm_top} best and the defaults x {s.confirm_seeds} seeds"
               if s.confirms else "")
    return (f"{'Resuming' if s.resume else 'Sweep'} {s.name}: {s.method}, {what}{confirm}, {s.epochs} epochs each\n"
            f"  MLflow {s.tracking_uri} (experiment {s.experiment}); results in {s.sweep_dir}")


LOCK_FILE = ".driver.lock"


def _hold(sweep_dir: Path) -> Any:
    """An exclusive lock on the sweep directory for this driver's lifetime: two drivers on one
    sweep would each delete checkpoints the other needs and ask the searcher twice."""
    handle = open(sweep_dir / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UsageError(f"sweep '{sweep_dir}' is being run by another driver; wait for it to end or stop it, "
                         f"then --resume") from None
    return handle  # the lock lasts as long as the file stays open, released when the process ends


def _close_running(client: Any, experiment_id: str, parent_run_id: str, status: str, tags: dict[str, str]) -> None:
    """Close every child run still RUNNING: a sweep that stops for any reason leaves none open."""
    running = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}' "
                                                                f"and attributes.status = 'RUNNING'")
    for run in running:
        tracking.set_tags(client, run.info.run_id, tags)
        client.set_terminated(run.info.run_id, status=status)


def _save_state(s: SweepSettings) -> None:
    (s.sweep_dir / STATE_FILE).write_text(json.dumps(s.to_json(), indent=2, default=str))


def restored(path: str, trainable: Any, callbacks: list[Any]) -> Any:
    """The Tune experiment at ``path`` restored with this driver's callbacks, or None where
    there is none to restore."""
    from ray import tune
    if not tune.Tuner.can_restore(path):
        return None
    tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, param_space=None)
    _replace_callbacks(tuner, callbacks)
    return tuner


def _search_tuner(s: SweepSettings, trainable: Any, callbacks: list[Any]) -> Any:
    from ray import tune
    tuner = restored(s.experiment_path, trainable, callbacks) if s.resume else None
    if tuner is not None:
        return tuner
    if s.ablation:
        return _ablation_tuner(s, trainable, callbacks)
    searcher = optuna_search(s.space, tpe_sampler(s.seed, s.samples), s.name, _optuna_storage(s))
    scheduler = asha_scheduler(s.space, s.epochs)
    return tune.Tuner(
        trainable,
        # Reusing trial actors spares every in-process trial a fresh process that
        # imports torch, ray and mlflow again (seconds each on a small machine).
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.samples,
                                    max_concurrent_trials=s.max_concurrent, reuse_actors=s.launch.in_process()),
        run_config=_run_config(s, callbacks))


def _confirm_tuner(s: SweepSettings, trainable: Any, callbacks: list[Any], plan: ConfirmPlan) -> Any:
    """Every confirmed configuration once per fresh seed, to the last epoch (no scheduler), as
    an experiment of its own beside the search's, so that either resumes on its own."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator
    tuner = restored(f"{s.experiment_path}-confirm", trainable, callbacks)
    if tuner is not None:
        return tuner
    points = plan.points()
    # Tune fills a point's keys from the param space, so the space names them all; the values
    # are never used, and Tune's note that each point overrides them is no news.
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
    search = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=s.max_concurrent or 0)
    return tune.Tuner(trainable, param_space=dict(points[0]),
                      tune_config=tune.TuneConfig(search_alg=search, num_samples=len(points),
                                                  reuse_actors=s.launch.in_process()),
                      run_config=_run_config(s, callbacks, f"{s.name}-confirm"))


def startup_trials(samples: int) -> int:
    """TPE's random trials before it models the results: half the sweep, between 2 and 10."""
    return max(2, min(10, samples // 2))


def tpe_sampler(seed: int, samples: int) -> Any:
    import optuna
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(samples))


def optuna_search(space: SearchSpace, sampler: Any, study_name: str, storage: Any = None) -> Any:
    """Tune's Optuna searcher over the space's distributions (``storage`` None: in memory)."""
    from ray.tune.search.optuna import OptunaSearch
    return OptunaSearch(space=space.optuna_distributions(), metric=space.metric, mode=space.mode,
                        sampler=sampler, study_name=study_name, storage=storage)


def asha_scheduler(space: SearchSpace, epochs: int) -> Any:
    """ASHA on the epoch counter with the space's grace period and reduction factor."""
    from ray.tune.schedulers import ASHAScheduler
    return ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=epochs + 1,
                         grace_period=min(space.grace_period, epochs), reduction_factor=space.reduction_factor)


def _optuna_storage(s: SweepSettings) -> Any:
    import optuna
    return optuna.storages.RDBStorage(f"sqlite:///{(s.sweep_dir / 'optuna.db').resolve()}")


def _fail_stale_optuna_trials(s: SweepSettings) -> None:
    """Once Tune is done, a study trial still RUNNING belonged to a driver that was killed: the
    restored searcher asked again for the interrupted Tune trial, so this one will never be told."""
    import optuna
    storage = _optuna_storage(s)
    study_id = storage.get_study_id_from_name(s.name)
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        log.info("optuna trial %d was interrupted with its driver; marked FAIL", trial.number)


def _run_config(s: SweepSettings, callbacks: list[Any], name: str | None = None) -> Any:
    return run_config(name or s.name, s.launch.storage_path, callbacks, s.verbose)


def run_config(name: str, storage_path: str, callbacks: list[Any], verbose: int) -> Any:
    """Tune's run config of every experiment here: each trial's last checkpoint kept, one retry."""
    from ray import tune
    return tune.RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                          verbose=1 if verbose >= 2 else 0, checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                          failure_config=tune.FailureConfig(max_failures=1))


def _ablation_tuner(s: SweepSettings, trainable: Any, callbacks: list[Any]) -> Any:
    """Every cell of the grid, each once per seed, trained to the last epoch (no early stopping:
    an ablation compares final numbers)."""
    from ray import tune
    a = s.ablation
    space = {k: tune.grid_search(v) for k, v in a.grid.items()}
    space["seed"] = tune.grid_search(a.seeds)
    return tune.Tuner(trainable, param_space=space, run_config=_run_config(s, callbacks),
                      tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=s.max_concurrent,
                                                  reuse_actors=s.launch.in_process()))


def _replace_callbacks(tuner: Any, callbacks: list[Any]) -> None:
    """A restored Tuner unpickles the old callback; point it at this process's logger state.

    Private Ray API, on purpose: ``Tuner.restore`` takes no ``run_config`` or callbacks (Ray
    2.58), and the unpickled callback holds the killed driver's state (its MLflow client,
    its buffers). Without a public hook this swaps it for the live one, and does nothing if
    Ray's internals move (the old callback then keeps logging, with reopened runs)."""
    internal = getattr(tuner, "_local_tuner", None)
    run_config = getattr(internal, "_run_config", None)
    if run_config is not None:
        live = {type(cb).__name__ for cb in callbacks}
        run_config.callbacks = [cb for cb in (run_config.callbacks or []) if type(cb).__name__ not in live
                                and type(cb).__name__ != "Progress"] + list(callbacks)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and "/" in k}


def _search_summary(s: SweepSettings, results: Any, logger: Any) -> dict[str, Any]:
    """What the search (or the ablation) found, as plain data: kept in the state file so that a
    sweep resumed during its confirmation still reports its search."""
    metric = s.space.metric
    ok = [r for r in results if r.error is None and r.metrics and metric in r.metrics]
    summary: dict[str, Any] = {
        "trials": [{"config": dict(r.config), "value": float(r.metrics[metric]),
                    "epochs": int(r.metrics.get("epoch", 0)), "run_id": logger.run_of(r.metrics.get("trial_id", ""))}
                   for r in ok],
        "count": len(results), "failed": sum(1 for r in results if r.error is not None),
        "stopped": sum(1 for r in ok if int(r.metrics.get("epoch", 0)) < s.epochs),
        "best_config": {}, "best_value": None, "best_run": None, "best_metrics": {}, "best_collapsed": False}
    if ok:  # for an ablation this is the best single run; analysis.ablation gives the seed means
        best = results.get_best_result(metric=metric, mode=s.space.mode, scope="last", filter_nan_and_inf=True)
        summary.update(best_config=dict(best.config), best_value=float(best.metrics[metric]),
                       best_run=logger.run_of(best.metrics.get("trial_id", "")),
                       best_metrics=_numeric(best.metrics),
                       best_collapsed=collapsed(best.metrics))
    return summary


def _verdict(s: SweepSettings, results: Any, logger: Any) -> Verdict:
    plan, metric = s.confirm_plan, s.space.metric
    assert plan is not None
    rows = {c.label: Confirmed(c, []) for c in plan.candidates}
    figures: dict[str, list[dict[str, float]]] = {c.label: [] for c in plan.candidates}
    for r in results:
        cand = plan.candidate_of(dict(r.config))
        if cand is None or r.error is not None or not r.metrics or metric not in r.metrics:
            continue
        row = rows[cand.label]
        row.values.append(float(r.metrics[metric]))
        row.run_ids.append(logger.run_of(r.metrics.get("trial_id", "")) or "")
        row.collapsed = row.collapsed or collapsed(r.metrics)
        figures[cand.label].append(_numeric(r.metrics))
    for label, row in rows.items():
        keys = set().union(*figures[label]) if figures[label] else set()
        row.means = {k: sum(f[k] for f in figures[label] if k in f) / sum(1 for f in figures[label] if k in f)
                     for k in keys}
    return judge(list(rows.values()), s.space.mode)


def _finish(s: SweepSettings, c: Any, experiment_id: str, verdict: Verdict | None, wall: float) -> SweepOutcome:
    """The parent run's summary: the confirmed best where a confirmation ran (``best.*`` tags,
    ``best/*`` means with the interval), the search's own best under ``search_best``."""
    parent, search, metric = s.parent_run_id, s.search or {}, s.space.metric
    assert parent is not None  # run_sweep opened (or reopened) it before Tune started
    metrics = {"sweep/trials": search.get("count", 0), "sweep/failed": search.get("failed", 0),
               "sweep/asha_stopped": search.get("stopped", 0), "sweep/wall_s": wall}
    tags: dict[str, Any] = {}
    best_config, best_value, best_run = search.get("best_config", {}), search.get("best_value"), search.get("best_run")
    best_metrics = dict(search.get("best_metrics", {}))
    if verdict is None:
        metrics.update({f"best/{k}": v for k, v in best_metrics.items()})
        tags.update({f"best.{k}": v for k, v in best_config.items()})
        if best_run:
            tags["best_run_id"] = best_run
    else:
        metrics.update({f"search_best/{k}": v for k, v in best_metrics.items()})
        tags.update({f"search_best.{k}": v for k, v in best_config.items()})
        if best_run:
            tags["search_best_run_id"] = best_run
        tags.update({"confirm.summary": verdict.headline(metric), "confirm.verdict":
                     "winner" if verdict.winner else ("none" if not verdict.rows else "indistinguishable"),
                     "confirm.seeds": ",".join(map(str, s.confirm_plan.seeds if s.confirm_plan else []))})
        metrics["confirm/seed_std"] = verdict.seed_std
        if verdict.rows:
            top = verdict.rows[0]
            low, high = top.interval
            best_config, best_value, best_metrics = dict(top.candidate.knobs), top.mean, top.means
            metrics.update({f"best/{k}": v for k, v in top.means.items()})
            metrics.update({f"best/{metric}/std": top.std, f"best/{metric}/ci_low": low,
                            f"best/{metric}/ci_high": high, "best/seeds": len(top.values)})
            tags.update({f"best.{k}": v for k, v in top.candidate.knobs.items()})
            tags.update({"confirm.best": top.candidate.name, "best_run_ids": ",".join(top.run_ids)})
            best_run = top.run_ids[0] if top.run_ids else None
            report = s.sweep_dir / "confirmation.md"
            report.write_text(markdown(verdict, metric, s.space.swept, s.confirm_plan.seeds if s.confirm_plan else []))
            c.log_artifact(parent, str(report))
    tracking.log_metrics(c, parent, {k: v for k, v in metrics.items() if v == v}, step=0)
    if tags:
        tracking.set_tags(c, parent, tags)
    ok = best_value is not None
    c.set_terminated(parent, status="FINISHED" if ok else "FAILED")
    return SweepOutcome(best_config, best_value, best_run, parent, experiment_id, s.sweep_dir,
                        search.get("count", 0), search.get("failed", 0), search.get("stopped", 0), wall, best_metrics,
                        verdict)


def register_best(s: SweepSettings, logger: Any, verdict: Verdict) -> str:
    """Register the confirmed best configuration's best network (highest validation accuracy
    over its seeds' runs; the test split stays out of every choice) as ``kd-<method>-<dataset>-<arch>``,
    its version tagged with the sweep, the metric with its interval and the seeds; the line to print.
    With ``--log-models best`` only that network is logged, here."""
    from kd_platform.run.checkpoint import CHECKPOINT_TAG
    from kd_platform.tracking import models
    if logger.client.flush():
        return "Model registry: the MLflow store is away; nothing registered"
    c, top, metric = logger.client.client, verdict.rows[0], s.space.metric
    best = models.best_network(c, top.run_ids, None if s.log_models == "completed" else
                               lambda run: models.network_names(logger.spec_of(dict(top.candidate.knobs))))
    if best is None:
        return "Model registry: no logged model of the confirmed best configuration; nothing registered"
    acc, run, network = best
    spec = logger.spec_of({**top.candidate.knobs, "seed": int(run.data.tags.get("seed", s.seed))})
    model_id = models.logged_models(run).get(network)
    if model_id is None:  # --log-models best: this network is logged now, and only it
        location = run.data.tags.get(CHECKPOINT_TAG, "")
        logged = models.log_run_models(c, s.tracking_uri, run.info.run_id, spec, location, only=[network])
        model_id = logged.get(network)
        if model_id is None:
            return f"Model registry: network '{network}' of run {run.info.run_id} not logged; nothing registered"
    low, high = top.interval
    tags = {"sweep": s.name, "sweep_run_id": s.parent_run_id, "run_id": run.info.run_id, "network": network,
            "configuration": top.candidate.name, "metric": metric, f"{metric}.mean": f"{top.mean:.4f}",
            f"{metric}.std": f"{top.std:.4f}", f"{metric}.ci95": f"[{low:.4f}, {high:.4f}]",
            "confirm.seeds": ",".join(map(str, s.confirm_plan.seeds if s.confirm_plan else [])),
            "confirm.verdict": "winner" if verdict.winner else "indistinguishable",
            f"val/acc/{network}": f"{acc:.4f}", "knobs_hash": models.knobs_hash(spec),
            **{f"knob.{k}": v for k, v in top.candidate.knobs.items()}}
    return models.register(c, models.registered_name(spec, network), model_id, run.info.run_id, tags)
