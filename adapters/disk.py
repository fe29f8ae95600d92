"""Errors of the disk under a run: a full disk (or a file size limit) and a run directory that cannot be used.

Both are deterministic: a retry fails the same way after the same work, so they are reported in one line that
names the path (and the mount point that is full), and never retried. A full disk shows up as an ``OSError``
with ``errno`` ENOSPC (EDQUOT for a quota, EFBIG for ``ulimit -f``), as pyarrow's ``OSError`` whose message
holds "[errno 28] No space left on device", as safetensors' "No space left on device (os error 28)", or as
torch's ``RuntimeError`` "file write failed" or "unexpected pos" (its zip writer's short write, a checkpoint's
optimizer state) while the disk has no space left or a file size limit is set.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from gplflow.adapters.errors import GplflowError, InputError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_SPACE_WORDS = ("no space left on device", "disk quota exceeded", "file too large", "errno 28", "errno 27",
                   "os error 28", "os error 27", "storagefull", "filetoolarge")
_WRITE_FAILED = ("file write failed", "unexpected pos")  # torch's stream writer: no errno, so the disk is asked
_ALMOST_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


class NoSpaceError(GplflowError, OSError):
    """The disk (or the file size limit) ran out while writing under a run; the message is one line."""


class RunDirError(InputError):
    """A run directory that is a file, lies under a file, or cannot be written; the message names it."""


def is_no_space(err: BaseException, path: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a write that failed for lack of space."""
    for current in _chain(err):
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return True
        text = str(current).lower()
        if any(word in text for word in _NO_SPACE_WORDS):
            return True
        if any(words in text for words in _WRITE_FAILED) and path is not None and (
                _free_bytes(path) < _ALMOST_FULL or _file_size_limited()):
            return True
    return False


def _file_size_limited() -> bool:
    """Whether this process may not write files past some size (``ulimit -f``)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return False
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return soft != resource.RLIM_INFINITY


def no_space(err: BaseException, path: str | os.PathLike[str]) -> NoSpaceError:
    """A one-line ``NoSpaceError`` for ``err``, naming the mount point that is full and the path written."""
    code = next((e.errno for e in _chain(err) if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS),
                errno.EFBIG if _file_size_limited() and _free_bytes(path) >= _ALMOST_FULL else errno.ENOSPC)
    why = {errno.EFBIG: "a file reached the size limit (ulimit -f)", errno.EDQUOT: "disk quota exceeded"}
    detail = f" ({why[code]})" if code in why else ""
    return NoSpaceError(code, f"no space left on {mount_point(path)}: writing {path} failed{detail}; free some "
                              "space and run again (finished stages are kept)")


def mount_point(path: str | os.PathLike[str]) -> str:
    """The mount point (device) a local path is on; the path itself where that cannot be told."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return str(current)


def _free_bytes(path: str | os.PathLike[str]) -> int:
    try:
        return shutil.disk_usage(mount_point(path)).free
    except OSError:
        return _ALMOST_FULL


def _chain(err: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def run_dir_error(err: OSError, root: str) -> RunDirError | None:
    """A one-line ``RunDirError`` for an ``OSError`` creating or writing run directory ``root``, or None."""
    if isinstance(err, FileExistsError | NotADirectoryError):
        blocking = next((p for p in (Path(root), *Path(root).parents) if p.exists() and not p.is_dir()), None)
        where = "is a file" if blocking == Path(root) else f"lies under {blocking}, which is a file"
        return RunDirError(f"run directory {root}: {where}, not a folder")
    if isinstance(err, PermissionError) or err.errno == errno.EROFS:
        return RunDirError(f"run directory {root}: not writable ({err.strerror or err}: {err.filename or root})")
    return None
