"""One run at a time per run directory: a lock file ``<run_dir>/.lock`` holding who runs there.

Two runs on one run directory would publish over each other's stages and remove each other's staging
folders, so a run takes the lock before its first stage and gives it back at the end, failed or not. The
lock file is created with ``O_CREAT | O_EXCL`` (atomic on a local disk) and holds the holder's host, pid,
start time and a token. A second run fails at once with a one-line ``RunLockedError`` naming the holder.

A lock whose holder is gone (same host, and its pid no longer runs, or now belongs to a process started
after the lock was taken) is stale: the next run takes it over and logs that it did. A holder on another
host cannot be checked from here; the message says which file to remove once that run is known to be gone.

On an fsspec URL (``s3://``, ``gs://``, ``memory://``) creating a file is not atomic and another host's pid
cannot be checked, so the lock is a lease: the file also holds an expiry ``LEASE_S`` seconds ahead, which a
thread of the live run renews every third of that. A lease not renewed in time is stale (its run died or lost
the storage) and is taken over. Two runs racing for a free lease both write, wait, and read back: the one whose
token is in the file holds it.

The lock may also name what holds it (``about``: the pipeline records its Prefect flow run), and ``run_lock``
hands the run that takes over a stale lock what that lock said, so the dead run's flow run can be marked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec

from gplflow.adapters.errors import GplflowError

logger = logging.getLogger(__name__)

LOCK = ".lock"
_ATTEMPTS = 5
_UNREADABLE_GRACE_S = 30.0  # a lock file still empty after this long was left by a process killed mid-write
LEASE_S = 120.0  # fsspec URLs: a lease not renewed for this long is stale
SETTLE_S = 1.0  # fsspec URLs: how long racing writers wait before reading back who won


class RunLockedError(GplflowError, ValueError):
    """Another run holds the run directory; the message is one line naming the holder (host, pid, start)."""


@contextlib.contextmanager
def run_lock(run_dir: str, about: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any] | None]:
    """Hold the run directory's lock for the duration of the block (released on error too).

    ``about`` is written into the lock beside host, pid and start time. The block is given the holder of the
    stale lock this run took over (what its lock file said), or None when the directory was free.
    """
    fs, root = fsspec.core.url_to_fs(str(run_dir))
    if not _is_local(fs):
        with Lease(fs, f"{root.rstrip('/')}/{LOCK}", str(run_dir), about=about) as lease:
            yield lease.stale
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    path = Path(root) / LOCK
    token, stale = acquire(path, str(run_dir), about)
    try:
        yield stale
    finally:
        release(path, token)


def _holder(about: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**(about or {}), "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "token": uuid.uuid4().hex}


def acquire(path: Path, run_dir: str, about: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any] | None]:
    """Create the lock file at ``path`` (taking over a stale one): this holder's token, and the stale holder."""
    me, stale = _holder(about), None
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = _read_text(path)
            if text is None:  # released meanwhile: try again
                continue
            why = _stale_reason(_parse(text), path)
            if why is None:
                raise _locked(run_dir, path, text) from None
            if _take_over(path, text, why):
                stale = _parse(text)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
            fh.flush()
            os.fsync(fh.fileno())
        return me["token"], stale
    raise RunLockedError(f"{run_dir}: could not take the lock {path}; other runs keep taking it")


def check_free(run_dir: str) -> None:
    """Fail now, as ``run_lock`` would, if a live run holds the run directory (a check before a slow start)."""
    fs, root = fsspec.core.url_to_fs(str(run_dir))
    if not _is_local(fs):
        lease = Lease(fs, f"{root.rstrip('/')}/{LOCK}", str(run_dir))
        if (holder := lease.holder()) is not None and not lease.expired(holder):
            raise lease.locked(holder)
        return
    path = Path(root) / LOCK
    text = _read_text(path)
    if text is not None and _stale_reason(_parse(text), path) is None:
        raise _locked(str(run_dir), path, text)


def _locked(run_dir: str, path: Path, text: str) -> RunLockedError:
    return RunLockedError(f"{run_dir}: another run holds this run directory ({describe(_parse(text))}); "
                          f"wait for it to end, or remove {path} if that run is gone")


def release(path: Path, token: str) -> None:
    """Remove the lock file if it is still ours (a lock taken over after ours was judged stale is not)."""
    holder = _parse(_read_text(path) or "")
    if holder is not None and holder.get("token") == token:
        path.unlink(missing_ok=True)
    else:
        logger.warning("%s: the lock is no longer this run's (%s); leaving it", path, describe(holder))


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "unreadable lock file"
    started = holder.get("started")
    when = datetime.fromtimestamp(started).isoformat(" ", "seconds") if isinstance(started, int | float) else "?"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {when}"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _parse(text: str) -> dict[str, Any] | None:
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or isinstance(holder["pid"], bool):
        return None
    return holder


def _stale_reason(holder: dict[str, Any] | None, path: Path) -> str | None:
    """Why the lock's holder is known to be gone, or None while it may still be running."""
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "it was released"
        return f"unreadable and {age:.0f} s old" if age > _UNREADABLE_GRACE_S else None
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not running"
    except PermissionError:
        pass  # a live process of another user
    started = _process_started(pid)
    lock_started = holder.get("started")
    if started is not None and isinstance(lock_started, int | float) and started > lock_started + 1:
        return f"pid {pid} is now another process, started after the lock was taken"
    return None


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _take_over(path: Path, stale_text: str, why: str) -> bool:
    """Remove the stale lock, unless another run replaced it meanwhile (then that one is put back).

    True when this call removed it (another run that took it over first got its holder instead)."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another run took it over first; the caller tries again
    if _read_text(aside) != stale_text:  # a fresh lock: give it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    logger.warning("%s: taking over a stale lock (%s): %s", path, describe(_parse(stale_text)), why)
    return True


class Lease:
    """The lock of a run directory on an fsspec URL: a lock file with an expiry that a live run keeps renewing."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, run_dir: str, lease_s: float | None = None,
                 settle_s: float | None = None, about: Mapping[str, Any] | None = None):
        self.fs, self.path, self.run_dir = fs, path, run_dir
        self.lease_s = LEASE_S if lease_s is None else lease_s
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        self.me = _holder(about)
        self.stale: dict[str, Any] | None = None  # the expired lease this one took over
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.acquire()
        self._renewer = threading.Thread(target=self._renew, name="gplflow-lease", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        if (holder := self.holder()) is not None and holder.get("token") == self.me["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)

    def acquire(self) -> None:
        for _ in range(_ATTEMPTS):
            holder = self.holder()
            if holder is not None and not self.expired(holder):
                raise self.locked(holder)
            if holder is not None:
                logger.warning("%s: taking over an expired lease (%s, not renewed for %.0f s)", self.path,
                               describe(holder), time.time() - holder.get("renewed", holder.get("started", 0)))
                self.stale = holder
            self._write()
            time.sleep(self.settle_s)  # a racing writer's file lands meanwhile; the last write wins
            holder = self.holder()
            if holder is not None and holder.get("token") == self.me["token"]:
                return
        raise RunLockedError(f"{self.run_dir}: could not take the lease {self.path}; other runs keep taking it")

    def holder(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.path, "rb") as fh:
                return _parse(fh.read().decode("utf-8", errors="replace"))
        except FileNotFoundError:
            return None

    def expired(self, holder: dict[str, Any]) -> bool:
        expires = holder.get("expires")
        return not isinstance(expires, int | float) or expires < time.time()

    def locked(self, holder: dict[str, Any]) -> RunLockedError:
        return RunLockedError(f"{self.run_dir}: another run holds this run directory ({describe(holder)}, lease "
                              f"renewed until {datetime.fromtimestamp(holder['expires']).isoformat(' ', 'seconds')}"
                              f"); wait for it to end, or remove {self.path} if that run is gone")

    def _write(self) -> None:
        now = time.time()
        with self.fs.open(self.path, "wb") as fh:
            fh.write(json.dumps({**self.me, "renewed": now, "expires": now + self.lease_s}).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            holder = self.holder()
            if holder is None or holder.get("token") != self.me["token"]:
                logger.error("%s: the lease is no longer this run's (%s); another run may write here now",
                             self.path, describe(holder))
                return
            try:
                self._write()
            except OSError as err:  # storage unreachable for a moment: the next renewal tries again
                logger.warning("%s: could not renew the lease: %s", self.path, err)
