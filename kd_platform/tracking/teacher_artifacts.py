"""A run's teacher in MLflow: the tags that name it and its files as artifacts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from kd_platform.run.spec import RunSpec
from kd_platform.teachers import ARTIFACT_DIR, META_FILE, TEACHER_FILE, teacher_info, teacher_store
from kd_platform.teachers.store import ERRORS as STORE_ERRORS
from kd_platform.tracking import set_tags

log = logging.getLogger(__name__)


def record_teacher(client: Any, run_id: str, spec: RunSpec, artifact_run_id: str | None = None,
                   logged: set[str] | None = None, result: Mapping[str, Any] | None = None) -> None:
    """Tag ``run_id`` with its teacher and log the teacher's files as artifacts of
    ``artifact_run_id`` (default: the run itself) under ``teacher/<hash>/``.

    A sweep passes its parent run and a set ``logged`` of hashes already there, so a
    teacher shared by all trials is stored once rather than once per trial. The run's last
    reported ``result`` says where its entries came from. A teacher trained on another node
    is fetched from the store to be logged."""
    try:
        info = teacher_info(spec)
        if not info:
            return
        tags, digest, path = dict(info), info["teacher.hash"], Path(info["teacher.path"])
        tags.update({k: v for k, v in (result or {}).items() if k.startswith("teacher.") and k.endswith(".source")})
        target = artifact_run_id or run_id
        store = None if spec.assets.teacher_checkpoint or path.is_file() else teacher_store(spec)
        if store is not None:
            store.fetch(digest, (META_FILE, TEACHER_FILE), path.parent)
        if path.is_file():
            where = f"{ARTIFACT_DIR}/{digest}"
            if logged is None or digest not in logged:
                user = bool(spec.assets.teacher_checkpoint)
                for file in [path] if user else [path, path.parent / META_FILE]:
                    client.log_artifact(target, str(file), where)
                if logged is not None:
                    logged.add(digest)
            tags["teacher.artifact"] = f"runs:/{target}/{where}/{path.name}"
        set_tags(client, run_id, tags)
    except STORE_ERRORS as exc:  # bookkeeping must not fail a finished run (e.g. a user's file since moved)
        log.warning("could not record the teacher of run %s: %s", run_id, exc)
