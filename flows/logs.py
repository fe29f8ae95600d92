"""Where the CLI's log records go: the terminal gets progress and one line per problem, the run's log file
(``<run_dir>/logs/gplflow.log``) everything, with each traceback Prefect logs for a failed task or flow run.

Prefect reports a failed task with its traceback, then the flow run that failed with it, again with the
traceback, then the states both ended in: up to six tracebacks before gplflow's own one-line ``error:``. On a
terminal those only repeat that line, so they go to the log file alone (``--verbose`` shows them too).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from gplflow.adapters.store import ArtifactStore

LOG_FILE = "logs/gplflow.log"  # under a local run directory
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_QUIET = ("httpx", "faiss.loader")  # a line per Prefect API request; ten lines on which CPU build FAISS loads
_FAILED_STATE = re.compile(r"Finished in state (Failed|Crashed|Cancelled)\b")
_COMPLETED = re.compile(r"Finished in state Completed\(\)$")  # a line per task run: the log file keeps it
_CACHED = re.compile(r"Finished in state Cached\b")

logger = logging.getLogger(__name__)
_last: Path | None = None  # the log file of this process's latest run, named in its error line


class TerminalFilter(logging.Filter):
    """Keeps Prefect's failure reports (tracebacks, crash notices, failed end states) and records marked
    ``extra={"terminal": False}`` off the terminal; the log file has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "terminal", True) is False:
            return False
        if not record.name.startswith("prefect"):
            return True
        message = record.getMessage()
        if record.name == "prefect.task_runs" and _COMPLETED.match(message):
            return False
        if _CACHED.match(message) and getattr(record, "task_run_name", None):  # say which stage was reused
            record.msg, record.args = f"{record.task_run_name}: reused (cached): {message}", None
        return not (record.exc_info or record.levelno >= logging.ERROR or _FAILED_STATE.match(message))


def setup_terminal(verbose: bool) -> None:
    """Log to stderr (DEBUG with ``verbose``, else INFO with the noise left out), as ``logging.basicConfig``
    does: not when the host process (a test runner, an application) already configured logging."""
    global _last
    _last = None
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(TerminalFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hold back INFO records and what the libraries print (progress bars, load reports, the trainer's loss
    dicts) for the block; warnings still reach the terminal. Used while ``--plan`` calibrates; nothing is held
    with --verbose."""
    root = logging.getLogger()
    if root.getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        # the log handler keeps the terminal's own stream
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def log_path(run_dir: str, name: str) -> Path:
    """``<run_dir>/logs/gplflow.log``; for a run directory on an fsspec URL, a local file named after the run
    under the gplflow cache folder (a log is appended to line by line, which object stores cannot do)."""
    store = ArtifactStore(run_dir)
    if store.is_local:
        return Path(store.root) / LOG_FILE
    from gplflow.adapters.tiny_models import default_cache_dir

    return default_cache_dir() / "logs" / f"{name}.log"


@contextlib.contextmanager
def run_log(run_dir: str, name: str) -> Iterator[Path]:
    """Append every log record of the block (DEBUG ones too with ``--verbose``) to the run's log file, and the
    traceback of whatever ends the block with an exception; yields the file's path."""
    global _last
    path = log_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.DEBUG if level == logging.DEBUG else logging.INFO)
    root.addHandler(handler)
    root.setLevel(handler.level)  # a host process that logs at WARNING still gets the whole log in the file
    _last = path
    logger.info("gplflow run in %s (pid %d)", run_dir, os.getpid(), extra={"terminal": False})
    try:
        yield path
    except BaseException as err:
        logger.error("the run ended with %s", type(err).__name__, exc_info=err, extra={"terminal": False})
        raise
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def last_run_log() -> Path | None:
    """The log file of this command's run, if it started one (the error line names it)."""
    return _last
