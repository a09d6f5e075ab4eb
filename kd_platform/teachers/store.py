"""The shared tier of the teacher cache: an entry trained on one node, fetched by every other.

Each node keeps its trained teachers (and IE-KD's auto-encoders) in a node-local cache
(``kd_platform.teachers``). Behind it sits a store every node reaches: the sweep's
``--storage-path`` (a shared mount, or a bucket such as ``s3://bucket/prefix``), under
``teachers/``, laid out as the local cache is::

    <store>/<hash>/meta.json      the description and the accuracies
    <store>/<hash>/teacher.pt     the entry's file (or ``iekd_autoencoder.pt``)
    <store>/<hash>/.training      while a node trains the entry: who, and a heartbeat

A node missing an entry fetches it from the store; if the store lacks it too, the node
claims ``.training``, trains, and publishes. Files are published by writing a temporary
name and moving it into place, ``meta.json`` first and the entry's file last, so the
presence of the entry's file means the entry is whole (a move on a local or shared
filesystem is a rename; on an object store it is a copy that appears all at once).

Who trains: on a filesystem (local or a shared mount) ``.training`` is created with
``O_CREAT | O_EXCL``, which lets exactly one node win. On an object store there is no
create-exclusive, so a node writes the marker, waits ``settle_s`` and reads it back: the
node whose token it holds trains, the others wait. Two nodes train the same entry only if
writing a marker takes longer than ``settle_s`` after each saw none. The holder rewrites
the marker every ``heartbeat_s``; a marker unchanged for ``stale_s`` (on the waiter's own
clock, so the nodes' clocks need not agree) belongs to a node that died, and the next
waiter takes it over. None of this is needed for correctness, only to save work: an
entry is named by its content hash, so two nodes that both train it publish equivalent
files, each whole.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

STORE_DIR = "teachers"
CLAIM_FILE = ".training"
FETCHED, TRAINED = "fetched", "trained"
"""Where ``fetch_or_make`` got an entry: copied from the store, or made on this node."""
ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:  # pyarrow's own errors (a bad URI, a missing filesystem driver) are not all OSErrors
    import pyarrow
    ERRORS = (OSError, pyarrow.ArrowException)
except ImportError:  # pragma: no cover - pyarrow comes with Ray
    pass


def store_uri(storage_path: str) -> str:
    """The teacher store of a sweep whose ``--storage-path`` is ``storage_path``."""
    return f"{storage_path.rstrip('/')}/{STORE_DIR}"


def origin() -> dict[str, Any]:
    """Who made an entry: host, process and (inside Ray) node, for its ``meta.json``."""
    who: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = _ray_if_running()
    if ray is not None:
        who["node_id"] = ray.get_runtime_context().get_node_id()
    return who


def _ray_if_running() -> Any:
    import sys
    ray = sys.modules.get("ray")  # never import Ray just to ask
    return ray if ray is not None and ray.is_initialized() else None


@dataclass
class Claim:
    """The right to make one entry, kept alive by a heartbeat until released."""
    store: "TeacherStore"
    digest: str
    token: str
    body: dict[str, Any]
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"teacher-claim-{self.digest[:8]}")
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(self.store.heartbeat_s):
            try:
                if self.store.claim_owner(self.digest) != self.token:
                    log.warning("another node took over training %s (this one was taken for dead); "
                                "both will publish the same entry", self.digest[:12])
                    return
                self.body["beat"] = self.body.get("beat", 0) + 1
                self.store.write_claim(self.digest, self.body)
            except ERRORS as exc:  # a missed beat only risks a second training, never a wrong file
                log.warning("teacher store heartbeat for %s failed: %s", self.digest[:12], exc)

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        try:
            if self.store.claim_owner(self.digest) == self.token:
                self.store.fs.delete_file(self.store.path(self.digest, CLAIM_FILE))
        except ERRORS as exc:
            log.warning("could not remove the training marker of %s: %s", self.digest[:12], exc)


class TeacherStore:
    """Cache entries on a filesystem every node reaches, addressed by a URI or a path.

    ``exclusive`` (default: whether the store is a filesystem path) chooses create-exclusive
    markers over write-and-read-back ones."""

    def __init__(self, uri: str, *, exclusive: bool | None = None, heartbeat_s: float = 10.0,
                 stale_s: float = 60.0, settle_s: float = 2.0, poll_s: float = 1.0) -> None:
        import pyarrow.fs as pafs
        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.exclusive = self.local if exclusive is None else exclusive
        self.heartbeat_s, self.stale_s, self.settle_s, self.poll_s = heartbeat_s, stale_s, settle_s, poll_s

    def path(self, digest: str, name: str = "") -> str:
        return "/".join(p for p in (self.root.rstrip("/"), digest, name) if p)

    def has(self, digest: str, name: str) -> bool:
        import pyarrow.fs as pafs
        return self.fs.get_file_info(self.path(digest, name)).type == pafs.FileType.File

    def fetch(self, digest: str, names: Sequence[str], folder: Path) -> bool:
        """Copy the entry's files into the local ``folder`` (the last name last); False if
        the store does not hold the entry whole (its last file is missing)."""
        if not self.has(digest, names[-1]):
            return False
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name != names[-1] and not self.has(digest, name):
                continue  # an entry published without it (meta.json is informative only)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".fetch")
            try:
                with os.fdopen(fd, "wb") as out, self.fs.open_input_stream(self.path(digest, name)) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(tmp, folder / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return True

    def publish(self, digest: str, folder: Path, names: Sequence[str]) -> None:
        """Copy the local ``folder``'s files into the store, each under a temporary name moved
        into place, the last name last."""
        self.fs.create_dir(self.path(digest), recursive=True)
        for name in names:
            tmp = self.path(digest, f".{name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(folder / name, "rb") as src, self.fs.open_output_stream(tmp) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                self.fs.move(tmp, self.path(digest, name))
            except BaseException:
                _delete_quietly(self.fs, tmp)
                raise

    # The training marker -------------------------------------------------------------

    def read_claim(self, digest: str) -> str | None:
        """The marker's text, or None when there is none. A marker that another node removes
        and writes again while this one reads it (a takeover, then a new claim) is read again:
        that is a race between nodes, not a store that cannot be used."""
        for attempt in range(3):
            try:
                with self.fs.open_input_stream(self.path(digest, CLAIM_FILE)) as fh:
                    return fh.read().decode(errors="replace")
            except OSError:
                if not self.has(digest, CLAIM_FILE):
                    return None  # not every filesystem says FileNotFoundError
                if attempt == 2:
                    raise
                time.sleep(self.poll_s)
        return None

    def claim_owner(self, digest: str) -> str | None:
        text = self.read_claim(digest)
        try:
            return json.loads(text).get("token") if text else None
        except ValueError:  # caught mid-write
            return None

    def write_claim(self, digest: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        if self.local:  # replace, never truncate: a reader always sees a whole marker
            target = Path(self.path(digest, CLAIM_FILE))
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{CLAIM_FILE}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        else:
            with self.fs.open_output_stream(self.path(digest, CLAIM_FILE)) as fh:
                fh.write(data)

    def _try_claim(self, digest: str, body: dict[str, Any]) -> bool:
        if self.exclusive:
            try:
                fd = os.open(self.path(digest, CLAIM_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(json.dumps(body).encode())
            return True
        if self.read_claim(digest) is not None:
            return False
        self.write_claim(digest, body)
        time.sleep(self.settle_s)  # a node that wrote at about the same time has overwritten it by now
        return self.claim_owner(digest) == body["token"]

    def claim(self, digest: str, name: str) -> Claim | None:
        """Wait until this process may make the entry whose last file is ``name``: a held
        :class:`Claim` (release it when published), or None once another node has published it."""
        self.fs.create_dir(self.path(digest), recursive=True)
        body = {"token": uuid.uuid4().hex, **origin(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        seen, seen_at, told = None, time.monotonic(), False
        while True:
            if self.has(digest, name):
                return None
            if self._try_claim(digest, body):
                claim = Claim(self, digest, body["token"], body)
                if self.has(digest, name):  # published between the look and the claim
                    claim.release()
                    return None
                claim.start()
                return claim
            text = self.read_claim(digest)
            if text != seen:
                seen, seen_at = text, time.monotonic()
                if text and not told:
                    log.info("waiting for the node training %s to publish it to %s (%s)",
                             digest[:12], self.uri, text)
                    told = True
            elif text is not None and time.monotonic() - seen_at > self.stale_s:
                log.warning("the training marker of %s has not changed for %.0f s: taking it over (%s)",
                            digest[:12], self.stale_s, text)
                if self.read_claim(digest) == text:
                    _delete_quietly(self.fs, self.path(digest, CLAIM_FILE))
                seen = None
                continue
            time.sleep(self.poll_s)


def fetch_or_make(store: TeacherStore, digest: str, folder: Path, names: Sequence[str],
                  make: Callable[[], None]) -> str:
    """Fill the local ``folder`` with the entry's ``names``: ``FETCHED`` from the store, or
    ``TRAINED`` by ``make()`` (which writes them) and then published.

    A store that cannot be used (unreachable, a bad URI) only costs the sharing: the entry
    is made locally with a warning."""
    try:
        if store.fetch(digest, names, folder):
            return FETCHED
        claim = store.claim(digest, names[-1])
        if claim is None:
            if store.fetch(digest, names, folder):
                return FETCHED
            raise FileNotFoundError(f"{store.path(digest, names[-1])} vanished after it was published")
    except ERRORS as exc:
        log.warning("teacher store %s unusable (%s): making %s on this node", store.uri, exc, digest[:12])
        make()
        return TRAINED
    try:
        make()
        try:
            store.publish(digest, folder, names)
        except ERRORS as exc:
            log.warning("could not publish %s to the teacher store %s: %s", digest[:12], store.uri, exc)
    finally:
        claim.release()
    return TRAINED


def _delete_quietly(fs: Any, path: str) -> None:
    try:
        fs.delete_file(path)
    except ERRORS:
        pass

