"""Writes to the MLflow store that survive a store that is away for a while.

Two layers:

- ``RetryingClient`` (what ``tracking.client`` returns): an ``MlflowClient`` whose calls retry
  transient failures (server down or restarting, HTTP 5xx, sqlite's "database is locked")
  with backoff, for up to ``patience_s()`` seconds. For code that may block: starting and
  finishing a sweep's parent run, a plain ``platform.train`` run.
- ``BufferedClient``: for the sweep driver's Tune callback, which must neither raise into Tune
  nor hold up the whole sweep. Its writes join one queue, sent in order; while the store is
  away, the queue is retried now and then, in the callback's own calls, and grows meanwhile.
  ``flush`` waits (bounded) for the queue to drain; ``spill`` keeps what could not be sent in
  a file, which ``load`` (a resumed sweep) sends later.

Exactly once: a retried write may already have been applied (a reply lost on the way back).
Every write queued here is idempotent when sent again: metrics are built once, with their
timestamp, and MLflow's SQL store keeps a single row per (key, step, timestamp, value); params
and tags of equal value overwrite themselves; ending a run twice is ending it. Creating a run
is the exception: ``RetryingClient`` retries ``create_*`` only after failures that surely never
reached the store, and the callback's run-opening write looks its run up before creating it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from kd_platform.errors import OneLineFailure, UsageError

log = logging.getLogger(__name__)

PATIENCE_ENV = "KD_PLATFORM_MLFLOW_PATIENCE_S"
DEFAULT_PATIENCE_S = 300.0
UNSENT_FILE = "mlflow_unsent.jsonl"
PENDING = "pending:"  # prefix of the stand-in id of a run not created yet (store away)
MAX_BACKOFF_S = 15.0

# Lower-cased fragments of the messages of failures worth retrying. MLflow wraps every HTTP
# failure in an MlflowException whose text is all that is left of the cause; sqlite's lock
# comes as an OperationalError inside an MlflowException (direct) or in a server's reply.
TRANSIENT = ("database is locked", "database table is locked", "connection refused", "max retries exceeded",
             "connection aborted", "connection reset", "remotedisconnected", "timeout", "timed out",
             "temporarily unavailable", "bad gateway", "service unavailable", "gateway timeout",
             "too many 5", "internal server error", "broken pipe", "disk i/o error")
TRANSIENT_CODES = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
# Failures after which the store surely did nothing: the request never left, or sqlite refused
# the transaction as a whole.
NEVER_APPLIED = ("database is locked", "database table is locked", "connection refused", "newconnectionerror",
                 "name or service not known", "failed to establish a new connection")


class StoreUnavailable(OneLineFailure):
    """The store stayed away past the patience: one line, with where the unsent writes are."""


def patience_s() -> float:
    """How long a write waits for the store: ``$KD_PLATFORM_MLFLOW_PATIENCE_S``, else 300 s."""
    raw = os.environ.get(PATIENCE_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_PATIENCE_S
    except ValueError:
        raise UsageError(f"{PATIENCE_ENV}='{raw}' is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"{PATIENCE_ENV}='{raw}' must be a finite number of seconds >= 0")
    return value


def _text(exc: BaseException) -> str:
    parts: list[str] = []
    link: BaseException | None = exc
    while link is not None and len(parts) < 5:
        parts.append(f"{type(link).__name__}: {link}")
        link = link.__cause__ or link.__context__
    return " | ".join(parts).lower()


def is_transient(exc: BaseException) -> bool:
    """A failure that a later try may not meet: the store away, overloaded or locked."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if getattr(exc, "error_code", None) in TRANSIENT_CODES:
        return True
    text = _text(exc)
    return any(fragment in text for fragment in TRANSIENT)


def never_applied(exc: BaseException) -> bool:
    """A failure after which the store surely holds nothing of the request."""
    return isinstance(exc, ConnectionRefusedError) or any(f in _text(exc) for f in NEVER_APPLIED)


def short_reason(exc: BaseException) -> str:
    """A few words for the console (not the raw message, whose sqlite text would read as an error)."""
    text = _text(exc)
    if "locked" in text:
        return "busy: another writer holds the sqlite database"
    if "refused" in text or "failed to establish" in text:
        return "unreachable: connection refused"
    if "timeout" in text or "timed out" in text:
        return "unreachable: timed out"
    return "unavailable"


def call_with_retry(fn: Callable[..., Any], *args: Any, patience: float, retry_applied: bool = True,
                    **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, tried again after transient failures with a doubling wait, for up
    to ``patience`` seconds; with ``retry_applied`` False, only after failures that left the
    store untouched (a create is not idempotent)."""
    deadline, delay = time.monotonic() + patience, 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc) or not (retry_applied or never_applied(exc)) \
                    or time.monotonic() + delay > deadline:
                raise
            log.debug("MLflow call %s failed (%s); again in %.1fs", getattr(fn, "__name__", fn), exc, delay)
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)


class RetryingClient:
    """An ``MlflowClient`` whose every method retries transient failures (see ``call_with_retry``)."""
    CREATES = frozenset({"create_run", "create_experiment"})

    def __init__(self, inner: Any, patience: float | None = None) -> None:
        self.inner = inner
        self.patience = patience_s() if patience is None else patience

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "inner" not in self.__dict__:
            raise AttributeError(name)
        attr = getattr(self.inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("tags") and name == "create_run":  # a tracking server takes strings only
                kwargs["tags"] = string_tags(kwargs["tags"])
            return call_with_retry(attr, *args, patience=self.patience, retry_applied=name not in self.CREATES,
                                   **kwargs)
        call.__name__ = name
        return call


def string_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tag values as MLflow stores them; a sqlite store converts them itself, a server refuses others."""
    return {k: str(v) for k, v in tags.items()}


@dataclass
class Write:
    """One queued write: an ``MlflowClient`` method and its JSON-able arguments, or ``open``
    (a trial's run, made by the opener the callback gives)."""
    method: str
    run: str  # a run id, or PENDING + trial id until the run exists
    args: dict[str, Any] = field(default_factory=dict)
    guard: list | None = None  # [trial id, step] of a metrics write: skipped if the run had that step


class BufferedClient:
    """The write methods of ``MlflowClient`` that the platform uses, queued and sent in order;
    every other attribute (the reads) is the underlying client's, without retries.

    ``opener(write) -> run id`` runs an ``open`` write; ``had_step(trial, step)`` says whether a
    resumed run already holds a step (so a metrics write queued before its run was found is
    not sent twice). ``spill_to``: a file that holds the queue whenever a write is left in it (so
    that a driver killed while the store is away loses nothing), removed once the queue is empty.
    ``handlers``: writes of the owner's own (``method -> handler(run id, args)``), such as
    logging a run's models, queued and held like the others."""

    def __init__(self, client: Any, opener: Callable[[Write], str] | None = None,
                 had_step: Callable[[str, int], bool] | None = None, spill_to: Path | None = None,
                 handlers: dict[str, Callable[[str, dict[str, Any]], None]] | None = None) -> None:
        self.client = client
        self.opener, self.had_step, self.spill_to = opener, had_step, spill_to
        self.handlers = handlers or {}
        self.pending: deque[Write] = deque()
        self.resolved: dict[str, str] = {}  # PENDING ids to real run ids
        self.down_since: float | None = None
        self.next_try = 0.0
        self.delay = 0.5
        self.rejected = 0
        self._sending = False

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the callback that holds this
        return {**self.__dict__, "client": None, "opener": None, "had_step": None, "handlers": {}}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self.__dict__.get("client") is None:
            raise AttributeError(name)
        return getattr(self.client, name)

    # The writes, as MlflowClient spells them.
    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = (),
                  guard: list | None = None) -> None:
        args = {"metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
                "params": [[p.key, p.value] for p in params], "tags": [[t.key, t.value] for t in tags]}
        self.submit(Write("log_batch", run_id, {k: v for k, v in args.items() if v}, guard))

    def log_inputs(self, run_id: str, datasets: Any = None, models: Any = None) -> None:
        items = [{"dataset": _dataset_json(d.dataset), "tags": [[t.key, t.value] for t in d.tags]}
                 for d in datasets or ()]
        self.submit(Write("log_inputs", run_id, {"datasets": items}))

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.submit(Write("log_artifact", run_id, {"local_path": str(local_path), "artifact_path": artifact_path}))

    def set_terminated(self, run_id: str, status: str | None = None, end_time: int | None = None) -> None:
        self.submit(Write("set_terminated", run_id, {"status": status,
                                                     "end_time": end_time or int(time.time() * 1000)}))

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        self.submit(Write("update_run", run_id, {"status": status, "name": name}))

    def delete_run(self, run_id: str) -> None:
        self.submit(Write("delete_run", run_id))

    def open(self, trial_id: str, args: dict[str, Any]) -> str:
        """Queue the opening of a trial's run; its id now, or its stand-in while the store is away."""
        stand_in = PENDING + trial_id
        self.submit(Write("open", stand_in, {"trial": trial_id, **args}))
        return self.resolved.get(stand_in, stand_in)

    def run_id(self, run: str) -> str:
        return self.resolved.get(run, run)

    def submit(self, write: Write) -> None:
        self.pending.append(write)
        if not self.pump() and self.spill_to:
            self.spill(self.spill_to)

    def pump(self, force: bool = False) -> bool:
        """Send queued writes in order until one fails transiently; True when none is left. While
        the store is away, a call only tries again once the backoff has passed (``force``: now)."""
        if self._sending or (not force and time.monotonic() < self.next_try):
            return not self.pending
        self._sending = True
        try:
            while self.pending:
                write = self.pending[0]
                try:
                    self._send(write)
                except Exception as exc:
                    if is_transient(exc):
                        self._away(exc)
                        return False
                    # It can never succeed (the store refuses it); holding it would hold all.
                    self.rejected += 1
                    log.warning("MLflow refused %s on run %s: %s", write.method, self.run_id(write.run), exc)
                self.pending.popleft()
            if self.down_since is not None:
                log.warning("MLflow store back after %.0fs: held writes sent", time.monotonic() - self.down_since)
                if self.spill_to:
                    self.spill(self.spill_to)
            self.down_since, self.delay, self.next_try = None, 0.5, 0.0
            return True
        finally:
            self._sending = False

    def _away(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("MLflow store %s; holding %d write(s) and trying again (the sweep goes on)",
                        short_reason(exc), len(self.pending))
        log.debug("MLflow write failed: %s", exc)
        self.next_try = time.monotonic() + self.delay
        self.delay = min(2 * self.delay, MAX_BACKOFF_S)

    def _send(self, w: Write) -> None:
        from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
        if w.method == "open":
            self.resolved[w.run] = self.opener(w)
            return
        run_id = self.run_id(w.run)
        if w.run.startswith(PENDING) and run_id == w.run:
            raise RuntimeError(f"run {w.run} was never opened")
        a = w.args
        if w.method == "log_batch":
            if w.guard and self.had_step and self.had_step(*w.guard):
                return
            self.client.log_batch(run_id, metrics=[Metric(*m) for m in a.get("metrics", ())],
                                  params=[Param(*p) for p in a.get("params", ())],
                                  tags=[RunTag(*t) for t in a.get("tags", ())])
        elif w.method == "log_inputs":
            from mlflow.entities import Dataset
            self.client.log_inputs(run_id, datasets=[DatasetInput(Dataset(**d["dataset"]),
                                                                  tags=[InputTag(*t) for t in d["tags"]])
                                                     for d in a["datasets"]])
        elif w.method == "log_artifact":
            self.client.log_artifact(run_id, a["local_path"], a["artifact_path"])
        elif w.method in ("set_terminated", "update_run", "delete_run"):
            getattr(self.client, w.method)(run_id, **a)
        elif w.method in self.handlers:
            self.handlers[w.method](run_id, a)
        else:
            raise ValueError(f"unknown MLflow write '{w.method}'")

    def flush(self, patience: float | None = None) -> int:
        """Wait up to ``patience`` seconds for every queued write to be sent; how many are left."""
        deadline = time.monotonic() + (patience_s() if patience is None else patience)
        while not self.pump(force=True):
            wait = self.next_try - time.monotonic()
            if time.monotonic() + max(wait, 0) > deadline:
                break
            time.sleep(max(wait, 0.05))
        return len(self.pending)

    def spill(self, path: Path) -> int:
        """Keep the queued writes in ``path`` (JSON lines; written whole, then renamed); how many.
        With none left, ``path`` is removed: what it held has been sent."""
        if not self.pending:
            path.unlink(missing_ok=True)
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        lines = (json.dumps({**asdict(w), "run": self.run_id(w.run)}, default=str) + "\n" for w in self.pending)
        tmp.write_text("".join(lines))
        tmp.replace(path)
        return len(self.pending)

    def load(self, path: Path) -> int:
        """Queue the writes kept in ``path`` ahead of any new one; how many. The file stays until
        ``spill`` finds the queue empty."""
        if not path.is_file():
            return 0
        loaded = [Write(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        self.pending.extendleft(reversed(loaded))
        return len(loaded)


def _dataset_json(dataset: Any) -> dict[str, Any]:
    return {k: getattr(dataset, k) for k in ("name", "digest", "source_type", "source", "schema", "profile")}
