"""One run at a time per run directory: a lock file ``<run_dir>/.lock`` holding who runs there.

Two runs on one run directory would publish over each other's stages and remove each other's staging
folders, so a run takes the lock before its first stage and gives it back at the end, failed or not. The
lock file is created with ``O_CREAT | O_EXCL`` (atomic on a local disk) and holds the holder's host, pid,
start time and a token. A second run fails at once with a one-line ``RunLockedError`` naming the holder.

A lock whose holder is gone (same host, and its pid no longer runs, or now belongs to a process started
after the lock was taken) is stale: the next run takes it over and logs that it did. A holder on another
host cannot be checked from here; the message says which file to remove once that run is known to be gone.

Only local paths are locked. On an fsspec URL (``s3://``, ``gs://``) creating a file is not atomic, and a
lock there would need a lease the live run renews; such run directories are not locked (a warning says so).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

LOCK = ".lock"
_ATTEMPTS = 5
_UNREADABLE_GRACE_S = 30.0  # a lock file still empty after this long was left by a process killed mid-write


class RunLockedError(ValueError):
    """Another run holds the run directory; the message is one line naming the holder (host, pid, start)."""


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block (released on error too)."""
    fs, root = fsspec.core.url_to_fs(str(run_dir))
    if not _is_local(fs):
        logger.warning("%s: not a local path; the run directory is not locked (two runs on it are not kept "
                       "apart)", run_dir)
        yield
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    path = Path(root) / LOCK
    token = acquire(path, str(run_dir))
    try:
        yield
    finally:
        release(path, token)


def acquire(path: Path, run_dir: str) -> str:
    """Create the lock file at ``path`` (taking over a stale one); returns this holder's token."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": uuid.uuid4().hex}
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
            _take_over(path, text, why)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
            fh.flush()
            os.fsync(fh.fileno())
        return me["token"]
    raise RunLockedError(f"{run_dir}: could not take the lock {path}; other runs keep taking it")


def check_free(run_dir: str) -> None:
    """Fail now, as ``run_lock`` would, if a live run holds the run directory (a check before a slow start)."""
    fs, root = fsspec.core.url_to_fs(str(run_dir))
    if not _is_local(fs):
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


def _take_over(path: Path, stale_text: str, why: str) -> None:
    """Remove the stale lock, unless another run replaced it meanwhile (then that one is put back)."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run took it over first; the caller tries again
    if _read_text(aside) != stale_text:  # a fresh lock: give it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    logger.warning("%s: taking over a stale lock (%s): %s", path, describe(_parse(stale_text)), why)
