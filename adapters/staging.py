"""Shard staging: the finished shards of a stage that is not published yet, kept across crashes.

A shardable stage writes shard k into ``<run_dir>/.<stage>.shards-<fingerprint>/`` as ``part-0000k.<ext>``
plus ``part-0000k.done.json`` (rows, size, sha256, mtime, the shard's counters, who computed it). The file is
renamed into place before its done record, and the record is renamed into place last, so a shard with a
valid record is complete, and a process killed mid-stage loses at most the shard it was computing.

``plan.json`` says how the stage is cut into shards (their count and size, and whatever decides their
content). A staging folder whose plan differs from the one a run asks for is stale and is discarded.

Once every shard has a record the stage publishes the shards as one artifact (``ArtifactStore.writer``) and
removes its staging folder. Whether a shard is done is checked cheaply (size and mtime); the shards are
hashed before they are published, unless this process wrote or hashed them (see ``adapters/store.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gplflow.adapters.store import (
    ArtifactStore,
    Check,
    _sha256,
    canonical_json,
    file_state,
    intact,
    is_mtime,
    remember_digest,
    settle_mtime,
    write_parquet,
)

logger = logging.getLogger(__name__)

PLAN = "plan.json"
_DONE = ".done.json"
_STAGING = re.compile(r"^\.(?P<stage>.+)\.shards-(?P<fingerprint>[0-9a-f]+)$")


def shard_file(k: int, ext: str) -> str:
    return f"part-{k:05d}.{ext}"


def staging_dirs(store: ArtifactStore, stage: str) -> list[str]:
    """Fingerprints of every staging folder of ``stage`` under the run directory (oldest layout first)."""
    if not store.fs.exists(store.root):
        return []
    found = []
    for path in store.fs.ls(store.root, detail=False):
        staged = staged_in(path.rstrip("/").rsplit("/", 1)[-1])
        if staged is not None and staged[0] == stage:
            found.append(staged[1])
    return sorted(found)


def staged_in(folder: str) -> tuple[str, str] | None:
    """(stage, fingerprint) of a staging folder's name (``.triples.shards-<fingerprint>``); None for another name."""
    match = _STAGING.match(folder)
    return (match["stage"], match["fingerprint"]) if match else None


def worker_identity() -> dict[str, Any]:
    """Who computed a shard: host, process and, under a Prefect worker, the worker's name."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": os.environ.get("PREFECT__WORKER_NAME")}


class ShardStaging:
    """The staging folder of one stage fingerprint: a plan, shard files and their done records."""

    def __init__(self, store: ArtifactStore, stage: str, fingerprint: str):
        self.store = store
        self.stage = stage
        self.fingerprint = fingerprint
        self.path = f"{store.root}/.{stage}.shards-{fingerprint}"
        self.url = f"{store.root_url}/.{stage}.shards-{fingerprint}"

    # --- plan -------------------------------------------------------------------------------------------

    def read_plan(self) -> dict[str, Any] | None:
        """The staging plan; None when there is none or it is unreadable (see ``plan_problem``)."""
        return self._plan()[0]

    def plan_problem(self) -> str | None:
        """Why the plan.json, which exists, cannot be used (the staging folder is then stale); else None."""
        return self._plan()[1]

    def _plan(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            plan = _read_json(self.store, f"{self.path}/{PLAN}")
        except FileNotFoundError:
            return None, None
        except ValueError as err:
            problem = f"unreadable {PLAN} ({err})"
        else:
            if isinstance(plan, dict) and _is_count(plan.get("n_shards")):
                return plan, None
            problem = f"{PLAN} is not an object with an integer n_shards >= 0"
        logger.warning("%s: %s; treating the staging folder as stale", self.url, problem)
        return None, problem

    def prepare(self, plan: Mapping[str, Any]) -> list[int]:
        """Start or continue staging under ``plan`` (which must hold ``n_shards``); returns the shards to do."""
        plan = {**plan, "stage": self.stage, "fingerprint": self.fingerprint}
        n = int(plan["n_shards"])
        found, problem = self._plan()
        if found is not None and canonical_json(found) != canonical_json(plan):
            logger.warning("%s: staged under another plan (%s); starting over", self.url, _diff(found, plan))
            self.remove()
            found = None
        elif problem is not None:  # which shards the records describe is unknown: start over
            self.remove()
        if found is None:
            self._write_json(PLAN, plan)
        pending = self.pending(n)
        if len(pending) < n:
            logger.info("%s: resuming, %d of %d shards already done", self.url, n - len(pending), n)
        return pending

    def n_shards(self) -> int | None:
        plan = self.read_plan()
        return None if plan is None else int(plan["n_shards"])

    # --- records ----------------------------------------------------------------------------------------

    def record(self, k: int, check: Check = "cheap") -> dict[str, Any] | None:
        """Shard k's done record if its file is there with the recorded size and sha256, else None.

        ``check`` as in ``ArtifactStore.problems``: cheap to tell done shards from pending ones, ``consume``
        before the shards are published.
        """
        fs = self.store.fs
        try:
            record = _read_json(self.store, f"{self.path}/part-{k:05d}{_DONE}")
        except FileNotFoundError:
            return None
        except ValueError:
            record = None
        if not _valid_record(record, k):
            logger.warning("%s: shard %d has an unreadable done record; recomputing it", self.url, k)
            return None
        path = f"{self.path}/{record['file']}"
        if (state := file_state(fs, path)) is None or not intact(fs, path, state, record, check):
            logger.warning("%s: shard %d file %s is missing or changed; recomputing it", self.url, k,
                           record.get("file"))
            return None
        return record

    def records(self, n: int, check: Check = "cheap") -> dict[int, dict[str, Any]]:
        return {k: rec for k in range(n) if (rec := self.record(k, check)) is not None}

    def pending(self, n: int) -> list[int]:
        done = self.records(n)
        return [k for k in range(n) if k not in done]

    def file(self, k: int, ext: str) -> str:
        return f"{self.path}/{shard_file(k, ext)}"

    # --- writing ----------------------------------------------------------------------------------------

    def write_parquet(self, k: int, batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema,
                      counters: Mapping[str, Any] | None = None, started: float | None = None) -> dict[str, Any]:
        """Write shard k as a Parquet file, then its done record; returns the record.

        ``started`` (a ``time.time()``) is when the shard's computation began: the record keeps its seconds.
        """
        tmp = self._tmp(k)
        with self.store.fs.open(tmp, "wb") as fh:
            rows = write_parquet(fh, batches, schema)
        return self._commit(k, tmp, shard_file(k, "parquet"), rows, counters, started)

    def write_array(self, k: int, array: np.ndarray, counters: Mapping[str, Any] | None = None,
                    started: float | None = None) -> dict[str, Any]:
        """Write shard k as a ``.npy`` array (rows = its first dimension), then its done record."""
        tmp = self._tmp(k)
        with self.store.fs.open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        return self._commit(k, tmp, shard_file(k, "npy"), int(array.shape[0]), counters, started)

    def read_array(self, k: int) -> np.ndarray:
        with self.store.fs.open(self.file(k, "npy"), "rb") as fh:
            return np.load(fh, allow_pickle=False)

    def read_table(self, k: int, columns: list[str] | None = None) -> pa.Table:
        with self.store.fs.open(self.file(k, "parquet"), "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def remove(self) -> None:
        if self.store.fs.exists(self.path):
            self.store.fs.rm(self.path, recursive=True)

    def _tmp(self, k: int) -> str:
        self.store.fs.makedirs(self.path, exist_ok=True)
        return f"{self.path}/.part-{k:05d}.tmp-{uuid.uuid4().hex[:8]}"

    def _commit(self, k: int, tmp: str, name: str, rows: int, counters: Mapping[str, Any] | None,
                started: float | None) -> dict[str, Any]:
        fs = self.store.fs
        final = f"{self.path}/{name}"
        fs.mv(tmp, final)
        if self.store.is_local:
            settle_mtime(final)
        finished = time.time()
        state = file_state(fs, final)
        if state is None:
            raise FileNotFoundError(f"{final}: vanished as shard {k} was being staged")
        sha = _sha256(fs, final)
        remember_digest(fs, final, state, sha)
        record = {"shard": k, "file": name, "rows": rows, "size": state.size, "sha256": sha, "mtime": state.mtime,
                  "counters": dict(counters or {}), "finished": finished,
                  "seconds": None if started is None else round(finished - started, 3), **worker_identity()}
        self._write_json(f"part-{k:05d}{_DONE}", record)
        logger.debug("%s: shard %d done (%d rows)", self.url, k, rows)
        return record

    def _write_json(self, name: str, payload: Mapping[str, Any]) -> None:
        fs = self.store.fs
        fs.makedirs(self.path, exist_ok=True)
        tmp = f"{self.path}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "w") as fh:
            fh.write(json.dumps(payload, indent=1, sort_keys=True, default=str))
        fs.mv(tmp, f"{self.path}/{name}")


def _read_json(store: ArtifactStore, path: str) -> Any:
    """Parsed JSON; FileNotFoundError when absent, ValueError when it is not JSON text."""
    with store.fs.open(path, "rb") as fh:
        raw = fh.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(str(err)) from err


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_record(record: Any, k: int) -> bool:
    """A done record with the types ``record`` and the status rely on, naming shard k's own file."""
    return (isinstance(record, dict) and record.get("file") in (shard_file(k, "parquet"), shard_file(k, "npy"))
            and _is_count(record.get("size")) and isinstance(record.get("sha256"), str)
            and is_mtime(record.get("mtime")) and _is_count(record.get("rows"))
            and isinstance(record.get("counters", {}), dict)
            and all(isinstance(v, int | float) and not isinstance(v, bool)
                    for v in record.get("counters", {}).values()))


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])


def sum_counters(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The shards' counters added up (what an uninterrupted run would have counted)."""
    total: dict[str, int] = {}
    for record in records:
        for name, value in record.get("counters", {}).items():
            total[name] = total.get(name, 0) + value
    return total
