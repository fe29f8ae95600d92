"""The artifact store: one folder per stage under a run directory, local or any fsspec URL.

A stage folder holds ``part-00000.parquet …`` (or the files of a model folder) and a ``manifest.json``
written last. A folder is published atomically: everything is written under a temporary name, then
renamed. A folder whose manifest is missing, unreadable, or whose files do not match the recorded
sizes and sha256 does not exist as far as every reader is concerned.

Checked cheaply, verified fully where it matters. The manifest records each file's size, sha256 and
modification time. A plain read (``load``: reuse decisions, status) checks presence and sizes, and hashes
only a file whose mtime is not the recorded one. A stage about to read its inputs (``consume``) hashes them,
and ``gplflow status --verify`` hashes everything. A per-process memo of the (url, size, mtime) this process
published or hashed means no file is hashed twice in a process.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from gplflow.adapters.disk import NoSpaceError, is_no_space, no_space, run_dir_error
from gplflow.adapters.errors import InputError, MissingInputError
from gplflow.adapters.version import __version__

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ROW_GROUP_SIZE = 10_000
_HASH_CHUNK = 1 << 20
# A file whose mtime is at least this much older than the moment it was read cannot be rewritten without
# its mtime changing, even where mtimes are whole seconds (or 2 s) or clock ticks; a younger one might be.
SETTLE_SECONDS = 2.0
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "modified", "updated")  # local, s3, azure, …, gcs

Check = Literal["cheap", "consume", "full"]
"""How deep a read checks an artifact's files: ``cheap`` (sizes, and a hash only where the mtime is not the
recorded one), ``consume`` (a hash unless this process published or hashed those very bytes), ``full`` (a
hash now, memo or not)."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal content hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)


def fingerprint(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], code_version: str) -> str:
    """Stage fingerprint = hash(stage config, input fingerprints, stage code version)."""
    payload = canonical_json({"stage": stage, "config": config, "inputs": inputs, "code": code_version})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- what a listing says of a file, and the per-process memo of hashed files ------------------------------

@dataclass(frozen=True)
class FileState:
    """A file's size and modification time (None where the filesystem gives none), read without its bytes."""

    size: int
    mtime: float | None


def file_state(fs: fsspec.AbstractFileSystem, path: str, info: Mapping[str, Any] | None = None) -> FileState | None:
    """The file's size and mtime (from ``info`` when a listing already gave it); None when there is no file."""
    if info is None:
        try:
            info = fs.info(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
    if info.get("type") == "directory":
        return None
    return FileState(int(info["size"]), _mtime(fs, info))


def _mtime(fs: fsspec.AbstractFileSystem, info: Mapping[str, Any]) -> float | None:
    # The memory filesystem has no mtime; its 'created' is renewed by every write, so it serves as one.
    for key in ("created",) if "memory" in _protocols(fs) else _MTIME_KEYS:
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value).timestamp()
    return None


_DIGESTS: dict[tuple[str, int, float], str] = {}  # (url, size, mtime) -> sha256 this process saw for those bytes


def _memo_key(fs: fsspec.AbstractFileSystem, path: str, state: FileState) -> tuple[str, int, float] | None:
    return None if state.mtime is None else (fs.unstrip_protocol(path), state.size, state.mtime)


def known_digest(fs: fsspec.AbstractFileSystem, path: str, state: FileState) -> str | None:
    """The sha256 this process published or hashed for the file in exactly this state, if any."""
    key = _memo_key(fs, path, state)
    return None if key is None else _DIGESTS.get(key)


def remember_digest(fs: fsspec.AbstractFileSystem, path: str, state: FileState, digest: str) -> None:
    """Note that the file in ``state`` holds bytes with sha256 ``digest`` (this process wrote or hashed them)."""
    if (key := _memo_key(fs, path, state)) is not None:
        _DIGESTS[key] = digest


def forget_digests() -> None:
    """Empty the memo, as a new process starts (tests use it to read as another process would)."""
    _DIGESTS.clear()


def file_digest(fs: fsspec.AbstractFileSystem, path: str, state: FileState, *, fresh: bool = False) -> str:
    """The file's sha256: the memo's when this process already hashed it in this state (unless ``fresh``), else
    read; kept in the memo if its mtime had settled (a younger file could change within the same mtime)."""
    if not fresh and (known := known_digest(fs, path, state)) is not None:
        return known
    started = time.time()
    digest = _sha256(fs, path)
    if state.mtime is not None and ("memory" in _protocols(fs) or started - state.mtime >= SETTLE_SECONDS):
        remember_digest(fs, path, state, digest)
    return digest


def intact(fs: fsspec.AbstractFileSystem, path: str, state: FileState, record: Mapping[str, Any],
           check: Check = "cheap") -> bool:
    """Whether the file in ``state`` is the one ``record`` (its size, sha256 and mtime, if any) describes,
    checked as deep as ``check`` says."""
    if state.size != record["size"]:
        return False
    if check == "cheap" and state.mtime is not None and state.mtime == record.get("mtime"):
        return True
    return file_digest(fs, path, state, fresh=check == "full") == record["sha256"]


def _carry_digest(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Give ``dst``, a link to or copy of ``src`` made just now, the memo entry of ``src`` if it has one."""
    before = file_state(fs, src)
    if before is None or (digest := known_digest(fs, src, before)) is None:
        return
    if (after := file_state(fs, dst)) is not None and after.size == before.size:
        remember_digest(fs, dst, after, digest)


def settle_mtime(path: str) -> None:
    """Date a local file this process just wrote a few seconds back (whole, even seconds), so that any later
    write changes its mtime, even one within the same second or clock tick (which would otherwise look like
    no change to a size-and-mtime check); an older file is left as it is."""
    stat = os.lstat(path)
    now = time.time()
    if now - stat.st_mtime >= SETTLE_SECONDS or os.path.islink(path):  # a link's target is not ours to date
        return
    stamp = int(now - SETTLE_SECONDS) // 2 * 2
    os.utime(path, ns=(stat.st_atime_ns, stamp * 1_000_000_000))


def content_signature(url: str | os.PathLike[str]) -> str:
    """sha256 over the relative names and bytes of a file or of every file under a folder.

    Content, not modification times: a fresh clone of the same corpus has the same signature. A file is read
    at most once per process (while its size and mtime stay the same, see ``file_digest``).
    """
    fs, root = fsspec.core.url_to_fs(str(url))
    try:
        info = fs.info(root)
    except (FileNotFoundError, NotADirectoryError):
        raise MissingInputError(f"{url}: no such file or folder") from None
    listing = fs.find(root, detail=True) if info.get("type") == "directory" else {root: info}
    paths = sorted(listing)
    digest = hashlib.sha256()
    for path in paths:
        if len(paths) > 1 and fs.isdir(path):  # find() lists a link to a folder as a file; it is not followed
            raise InputError(f"{path}: a link to a folder inside {url}; links to folders are not followed: copy "
                             "the folder in, or remove the link")
        state = file_state(fs, path, listing[path])
        sha = _sha256(fs, path) if state is None else file_digest(fs, path, state)
        digest.update(path[len(root) :].encode() + b"\0" + sha.encode())
    return digest.hexdigest()[:20]


class Ref(NamedTuple):
    """An input artifact as a stage reads it: its folder in the run directory and the fingerprint it must have."""

    name: str
    fingerprint: str


@dataclass(frozen=True)
class Artifact:
    """A published, validated stage folder."""

    store: ArtifactStore
    stage: str
    manifest: dict[str, Any]

    @property
    def ref(self) -> Ref:
        """This artifact as another stage's input."""
        return Ref(self.stage, self.fingerprint)

    @property
    def url(self) -> str:
        return self.store.url(self.stage)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def rows(self) -> int:
        return int(self.manifest.get("rows", 0))

    @property
    def counters(self) -> dict[str, Any]:
        return dict(self.manifest.get("counters", {}))

    def part_paths(self) -> list[str]:
        return [f"{self.store.path(self.stage)}/{name}" for name in self.manifest["files"] if _is_part(name)]

    def iter_batches(
        self, columns: list[str] | None = None, batch_size: int = ROW_GROUP_SIZE
    ) -> Iterator[pa.RecordBatch]:
        """Stream the rows part by part, row group by row group."""
        for path in self.part_paths():
            with self.store.fs.open(path, "rb") as fh:
                yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns)

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        tables = []
        for path in self.part_paths():
            with self.store.fs.open(path, "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        if not tables:
            raise ValueError(f"{self.url}: artifact has no Parquet parts")
        return pa.concat_tables(tables)

    def read_pandas(self, columns: list[str] | None = None):
        return self.read_table(columns).to_pandas()

    def local_dir(self) -> Path:
        """A local folder with the artifact's files (the folder itself when the store is local)."""
        if self.store.is_local:
            return Path(self.store.path(self.stage))
        target = Path(tempfile.mkdtemp(prefix=f"gplflow-{self.stage}-"))
        self.store.fs.get(self.store.path(self.stage) + "/", str(target), recursive=True)
        return target


def write_parquet(fh: Any, batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema) -> int:
    """Write record batches (or tables), cast to ``schema``, to the open file ``fh`` as Parquet in row groups of
    ROW_GROUP_SIZE; returns the rows written. The one write loop of stage parts and staged shards."""
    rows = 0
    with pq.ParquetWriter(fh, schema) as out:
        for batch in batches:
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            if table.num_rows:
                out.write_table(table.cast(schema), row_group_size=ROW_GROUP_SIZE)
                rows += table.num_rows
    return rows


def row_batches(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Rows (dicts) as record batches of ROW_GROUP_SIZE rows, streamed, so a source is never held whole."""
    it = iter(rows)
    while chunk := list(itertools.islice(it, ROW_GROUP_SIZE)):
        yield pa.RecordBatch.from_pylist(chunk, schema=schema)


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


class ArtifactStore:
    """Stage folders under one run directory (a local path or an fsspec URL such as ``memory://run``)."""

    def __init__(self, root: str | os.PathLike[str]):
        root = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/") or "/"
        self.root_url = root.rstrip("/")
        self.is_local = "file" in _protocols(self.fs)

    def path(self, stage: str) -> str:
        return f"{self.root}/{stage}"

    def url(self, stage: str) -> str:
        return f"{self.root_url}/{stage}"

    def read_manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest; None when there is none or it is unreadable (see ``manifest_problem``)."""
        return self._manifest(stage)[0]

    def manifest_problem(self, stage: str) -> str | None:
        """Why the stage's manifest.json, which exists, cannot be used; None when it is fine or absent."""
        return self._manifest(stage)[1]

    def _manifest(self, stage: str) -> tuple[dict[str, Any] | None, str | None]:
        path = f"{self.path(stage)}/{MANIFEST}"
        try:
            with self.fs.open(path, "r") as fh:
                manifest = json.load(fh)
        except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: the run directory is a file
            return None, None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problem = f"unreadable {MANIFEST} ({err})"
        else:
            problem = manifest_shape_problem(manifest)
            if problem is None:
                return manifest, None
        logger.warning("%s: %s; treating the artifact as absent", path, problem)
        return None, problem

    def problems(self, stage: str, expect_fingerprint: str | None = None, *, check: Check = "cheap") -> list[str]:
        """Why the stage folder is not a valid artifact ([] when it is), its files checked as deep as ``check``
        says (see ``Check``)."""
        manifest, problem = self._manifest(stage)
        if problem is not None:
            return [f"{self.url(stage)}: {problem}"]
        if manifest is None:
            return [f"{self.url(stage)}: no valid {MANIFEST}"]
        if expect_fingerprint and manifest.get("fingerprint") != expect_fingerprint:
            return [f"{self.url(stage)}: fingerprint {manifest.get('fingerprint')} != {expect_fingerprint}"]
        found = []
        for name, meta in manifest.get("files", {}).items():
            path = f"{self.path(stage)}/{name}"
            if (state := file_state(self.fs, path)) is None:
                found.append(f"{self.url(stage)}/{name}: missing")
            elif not intact(self.fs, path, state, meta, check):
                found.append(f"{self.url(stage)}/{name}: checksum mismatch")
        return found

    def load(self, stage: str, expect_fingerprint: str | None = None, *, check: Check = "cheap") -> Artifact | None:
        """The published artifact of ``stage``, or None if it is absent, stale or corrupted.

        Cheap by default (sizes, and mtimes against the manifest): for deciding what to reuse and for status.
        A stage about to read the artifact's rows calls ``consume`` instead.
        """
        problems = self.problems(stage, expect_fingerprint, check=check)
        if problems:
            if self.fs.exists(self.path(stage)):
                # another fingerprint is routine (settings or inputs changed): the stage says so in words
                stale = len(problems) == 1 and ": fingerprint " in problems[0]
                logger.log(logging.DEBUG if stale else logging.INFO, "artifact %s not usable: %s", stage,
                           "; ".join(problems[:3]))
            return None
        return Artifact(self, stage, self.read_manifest(stage))  # type: ignore[arg-type]

    def consume(self, stage: str, expect_fingerprint: str | None = None) -> Artifact | None:
        """``load`` for a stage about to read the artifact: every file's sha256 is checked, unless this process
        published or already hashed those very bytes (an artifact written elsewhere is verified before use)."""
        return self.load(stage, expect_fingerprint, check="consume")

    def input(self, stage: str, fingerprint: str) -> Artifact:
        """The artifact a stage reads, verified (``consume``); an error naming it and the fix when it is not there.

        Every stage loads its inputs through this one call, so a missing input reads the same everywhere."""
        found = self.consume(stage, expect_fingerprint=fingerprint)
        if found is None:
            raise MissingInputError(f"{self.url(stage)}: no valid {stage} artifact with fingerprint {fingerprint}; "
                                    f"the stage that makes it must run first (rerun the pipeline on "
                                    f"{self.root_url}: gplflow run CONFIG --run-dir {self.root_url})")
        return found

    def require(self, stage: str, *, check: Check = "cheap") -> Artifact:
        artifact = self.load(stage, check=check)
        if artifact is None:
            problems = self.problems(stage, check=check)
            raise MissingInputError(f"{self.url(stage)}: no valid artifact ({'; '.join(problems)})")
        return artifact

    @contextlib.contextmanager
    def writer(
        self,
        stage: str,
        *,
        config: Mapping[str, Any],
        inputs: Mapping[str, str] | None = None,
        code_version: str = __version__,
    ) -> Iterator[StageWriter]:
        """Write a stage folder; published only if the block completes, else nothing is left behind.

        A full disk is a one-line ``NoSpaceError`` naming the stage folder (after the partial folder is removed).
        """
        writer = StageWriter(self, stage, dict(config), dict(inputs or {}), code_version)
        try:
            yield writer
            writer._publish()
        except Exception as err:
            if isinstance(err, NoSpaceError) or not (self.is_local and is_no_space(err, self.root)):
                raise
            raise no_space(err, self.url(stage)) from err
        finally:
            writer._cleanup()

    def adopt(self, artifact: Artifact) -> Artifact:
        """Publish a copy of another run directory's artifact here, as it is (same manifest, same fingerprint).

        The source is verified in full first. Local files are hard-linked where the filesystem allows (same
        bytes, same mtimes: the cheap check passes), else copied with their times; published atomically.
        """
        source = artifact.store
        if source.consume(artifact.stage, artifact.fingerprint) is None:
            raise MissingInputError(f"{artifact.url}: changed or damaged since it was found; not adopted")
        tmp = f"{self.root}/.{artifact.stage}.adopt-{uuid.uuid4().hex[:8]}"
        final = self.path(artifact.stage)
        try:
            if self.is_local and source.is_local:
                self.fs.makedirs(self.root, exist_ok=True)
                shutil.copytree(source.path(artifact.stage), tmp, copy_function=_link_or_copy)
            else:
                self.fs.makedirs(tmp, exist_ok=True)
                for path in source.fs.find(source.path(artifact.stage)):
                    name = path.split(source.path(artifact.stage), 1)[-1].lstrip("/")
                    with source.fs.open(path, "rb") as src, self.fs.open(f"{tmp}/{name}", "wb") as dst:
                        shutil.copyfileobj(src, dst)
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            self.fs.mv(tmp, final, recursive=True)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
        adopted = self.load(artifact.stage, artifact.fingerprint)
        if adopted is None:  # a copy without the source's mtimes (object stores): verify the bytes once
            adopted = self.consume(artifact.stage, artifact.fingerprint)
        if adopted is None:
            raise MissingInputError(f"{self.url(artifact.stage)}: the copy of {artifact.url} does not validate")
        logger.info("adopted %s from %s (fingerprint %s)", artifact.stage, artifact.url, artifact.fingerprint)
        return adopted

    def remove(self, stage: str) -> None:
        if self.fs.exists(self.path(stage)):
            self.fs.rm(self.path(stage), recursive=True)


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link (free, keeps the mtime), or a copy with the source's times where links are refused."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def manifest_shape_problem(manifest: Any) -> str | None:
    """What is wrong with the types of a parsed manifest (valid JSON need not be a manifest), or None."""
    if not isinstance(manifest, dict):
        return f"{MANIFEST} holds {type(manifest).__name__}, expected an object"
    if not isinstance(manifest.get("fingerprint"), str):
        return f"{MANIFEST}: 'fingerprint' is not a string"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{MANIFEST}: 'files' is not an object"
    for name, meta in files.items():
        if not isinstance(meta, dict) or not _is_int(meta.get("size")) or not isinstance(meta.get("sha256"), str):
            return f"{MANIFEST}: files[{name!r}] is not {{size: integer, sha256: string}}"
        if not is_mtime(meta.get("mtime")):  # manifests written before mtimes were recorded have none
            return f"{MANIFEST}: files[{name!r}]['mtime'] is not a number"
        if name.startswith("/") or ".." in name.split("/"):
            return f"{MANIFEST}: file name {name!r} leaves the stage folder"
    if not _is_int(manifest.get("rows", 0)) or not isinstance(manifest.get("counters", {}), dict):
        return f"{MANIFEST}: 'rows' is not an integer or 'counters' not an object"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_mtime(value: Any) -> bool:
    """A recorded mtime: a number, or None (absent: a record written before mtimes were kept)."""
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


@dataclass
class StageWriter:
    """Collects a stage's parts (or model files), counters and timings, then publishes them atomically."""

    store: ArtifactStore
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]
    code_version: str
    counters: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint(self.stage, self.config, self.inputs, self.code_version)
        self.tmp = f"{self.store.root}/.{self.stage}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.store.fs.makedirs(self.tmp, exist_ok=True)
        except OSError as err:
            if not self.store.is_local or (unusable := run_dir_error(err, self.store.root_url)) is None:
                raise
            raise unusable from err
        self._rows: dict[str, int] = {}
        self._local: Path | None = None
        self._started = time.time()

    def write_part(
        self, batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema, index: int | None = None
    ) -> int:
        """Write one Parquet part from record batches (row groups of ROW_GROUP_SIZE); returns its rows."""
        index = len(self._rows) if index is None else index
        name = f"part-{index:05d}.parquet"
        with self.store.fs.open(f"{self.tmp}/{name}", "wb") as fh:
            rows = write_parquet(fh, batches, schema)
        self._rows[name] = rows
        return rows

    def add_part(self, src: str, index: int, rows: int) -> None:
        """Take a finished Parquet file (a staged shard) as part ``index``; ``src`` is left where it is.

        A hard link on a local disk (no bytes copied), else a copy: a crash before publishing loses nothing.
        """
        name = f"part-{index:05d}.parquet"
        dst = f"{self.tmp}/{name}"
        fs = self.store.fs
        if self.store.is_local:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
                settle_mtime(dst)
        else:
            fs.copy(src, dst)
        self._rows[name] = rows
        _carry_digest(fs, src, dst)  # a staged shard this process verified is not hashed again to publish it

    def local_dir(self) -> Path:
        """A local folder for stages that write files, not Parquet (model folders)."""
        if self._local is None:
            if self.store.is_local:
                self._local = Path(self.tmp)
            else:
                self._local = Path(tempfile.mkdtemp(prefix=f"gplflow-{self.stage}-"))
        return self._local

    def count(self, name: str, value: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value

    def write_json(self, name: str, obj: Any) -> None:
        """A small JSON file (sorted keys, indented) beside the parts, such as a stage's summary record."""
        (self.local_dir() / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def _publish(self) -> None:
        fs = self.store.fs
        if self._local is not None and not self.store.is_local:
            fs.put(str(self._local) + "/", self.tmp, recursive=True)
        files = {}
        for path in sorted(fs.find(self.tmp)):
            name = path.split(self.tmp, 1)[-1].lstrip("/")
            if name == MANIFEST:
                continue
            if self.store.is_local:
                settle_mtime(path)
            state = file_state(fs, path)
            if state is None:
                raise FileNotFoundError(f"{path}: vanished while {self.stage} was being published")
            files[name] = {"size": state.size, "sha256": file_digest(fs, path, state), "mtime": state.mtime}
            if name in self._rows:
                files[name]["rows"] = self._rows[name]
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "code_version": self.code_version,
            "rows": sum(self._rows.values()),
            "files": files,
            "counters": self.counters,
            "timings": {"started": self._started, "seconds": round(time.time() - self._started, 3)},
            **self.extra,
        }
        with fs.open(f"{self.tmp}/{MANIFEST}", "w") as fh:
            fh.write(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        final = self.store.path(self.stage)
        if fs.exists(final):
            trash = f"{self.store.root}/.{self.stage}.old-{uuid.uuid4().hex[:8]}"
            fs.mv(final, trash, recursive=True)
            fs.mv(self.tmp, final, recursive=True)
            fs.rm(trash, recursive=True)
        else:
            fs.mv(self.tmp, final, recursive=True)
        self._note_published(final, manifest)
        logger.info("published %s (%d rows, %d files)", self.store.url(self.stage), manifest["rows"], len(files))

    def _note_published(self, final: str, manifest: dict[str, Any]) -> None:
        """Put the published files in the memo; where the move gave them new mtimes (an object store copies),
        record those in the manifest, replaced whole, so that later cheap reads need not hash them."""
        fs = self.store.fs
        moved = False
        for name, meta in manifest["files"].items():
            state = file_state(fs, f"{final}/{name}")
            if state is None or state.size != meta["size"]:
                continue  # changed already: the next read finds it
            remember_digest(fs, f"{final}/{name}", state, meta["sha256"])
            if state.mtime != meta["mtime"]:
                meta["mtime"], moved = state.mtime, True
        if moved:
            tmp = f"{final}/.{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
            with fs.open(tmp, "w") as fh:
                fh.write(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            fs.mv(tmp, f"{final}/{MANIFEST}")

    def _cleanup(self) -> None:
        fs = self.store.fs
        if fs.exists(self.tmp):
            fs.rm(self.tmp, recursive=True)
        if self._local is not None and not self.store.is_local and self._local.exists():
            shutil.rmtree(self._local, ignore_errors=True)
