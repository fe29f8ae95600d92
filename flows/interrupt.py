"""How a ``gplflow run`` stops: Ctrl-C, SIGTERM or SIGHUP end it within seconds, resumable, with its flow run
marked Crashed and no Prefect server left behind.

Without ``PREFECT_API_URL`` Prefect starts a temporary server (uvicorn) as a child process on its first API call.
As a child in the run's process group it gets the terminal's Ctrl-C too and dies at once; the run, interrupted
as well, then spends minutes retrying its last state updates against the dead server (a traceback per retry)
before it exits. So ``temporary_server`` starts that server itself, in a session of its own: it outlives the
interrupt long enough for the flow run to be marked Crashed, and Prefect stops it as the process exits. The
server also gets SIGTERM when the run's process dies, even by SIGKILL (Linux's parent-death signal), and its pid
is recorded under ``PREFECT_HOME``, so the next run stops one a killed run left wherever that signal is missing.
A pool shard's process ends, and its flow run is marked Crashed, when the worker that started it dies.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

logger = logging.getLogger(__name__)

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
SERVER_APP = "prefect.server.api.server:create_app"  # in the temporary server's command line
_RECORDS = "gplflow-servers"  # under PREFECT_HOME: one <pid>.json per temporary server a run started
_STOP_WAIT_S = 5.0
STOP_GRACE_S = 20.0  # after a stop signal the process ends by then, however slow its way out
_RESEND_S = 0.05  # a stop dropped in a finalizer is sent again after this
_watchdog: threading.Timer | None = None
_parent_watch: threading.Thread | None = None
_resending = False


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; Prefect treats it as it treats Ctrl-C (the runs end Crashed)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(err: KeyboardInterrupt) -> int:
    return getattr(err, "signum", signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Interrupted`` in the main thread for the block, as Ctrl-C raises
    KeyboardInterrupt, instead of killing the process on the spot (which would leave the run marked Running).

    Each of them, and Ctrl-C, also starts a watchdog: the process ends ``STOP_GRACE_S`` seconds after the signal
    even if its way out hangs (a Prefect API too slow to take the Crashed state or the last logs)."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        arm_watchdog(signum)
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    resend_dropped_stops()
    handled = [*SIGNALS] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else [])
    previous = {signum: signal.signal(signum, interrupt) for signum in handled}  # an ignored Ctrl-C stays ignored
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def watchdog_on_stop() -> Iterator[None]:
    """Arm the watchdog when a stop signal ends the block as Prefect's ``TerminationSignal``.

    Inside a flow run Prefect's own SIGTERM handler stands in for ``stop_on_signals``' and reports the run
    Crashed before the signal is passed on: a slow API there would hold the process up before the watchdog runs.
    """
    from prefect.exceptions import TerminationSignal

    resend_dropped_stops()
    try:
        yield
    except TerminationSignal as err:
        arm_watchdog(err.signal)
        raise


def resend_dropped_stops() -> None:
    """Send a stop signal again when the exception its handler raised was dropped (once per process).

    Python runs a signal's handler between any two bytecodes of the main thread, also inside a finalizer (a
    ``__del__`` the garbage collector calls, a weakref callback), and drops an exception raised there: it goes to
    ``sys.unraisablehook`` ("Exception ignored in ...") and the code around goes on. A SIGTERM that landed so was
    lost, and the run finished as if nothing had been sent. Here the hook arms the watchdog and has the signal sent
    again a moment later, when the main thread is, most likely, out of the finalizer; the handler then raises
    where the exception ends the run. Other dropped exceptions go to the hook that was there before.
    """
    global _resending
    if _resending:
        return
    _resending = True
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        signum = _stop_signal(unraisable.exc_value)
        if signum is None:
            previous(unraisable)
            return
        arm_watchdog(signum)
        resend = threading.Timer(_RESEND_S, os.kill, (os.getpid(), signum))
        resend.daemon = True
        resend.start()

    sys.unraisablehook = hook


def _stop_signal(err: BaseException | None) -> int | None:
    """The signal a stop exception stands for: ours or Ctrl-C's (``KeyboardInterrupt``), or Prefect's
    ``TerminationSignal``; None for any other exception."""
    if isinstance(err, KeyboardInterrupt):
        return signal_of(err)
    prefect_errors = sys.modules.get("prefect.exceptions")  # not imported: it cannot be Prefect's
    found = prefect_errors is not None and isinstance(err, prefect_errors.TerminationSignal)
    return err.signal if found else None


def arm_watchdog(signum: int) -> None:
    """End the process with ``128 + signum`` in ``STOP_GRACE_S`` seconds unless it has ended by then (once)."""
    global _watchdog
    if _watchdog is not None:
        return

    def expire() -> None:
        with contextlib.suppress(OSError):  # stderr may be a pipe nobody reads any more (a killed worker's)
            sys.stderr.write(f"gplflow: still stopping {STOP_GRACE_S:.0f} s after {signal.Signals(signum).name}; "
                             "exiting now (the same command resumes the run)\n")
            sys.stderr.flush()
        os._exit(128 + signum)

    _watchdog = threading.Timer(STOP_GRACE_S, expire)
    _watchdog.daemon = True
    _watchdog.start()


def end_with_parent(poll_s: float = 1.0) -> None:
    """End this process when the process that started it dies (even by SIGKILL). A daemon thread watches
    ``os.getppid()``; when it changes, it arms the watchdog (the process ends ``STOP_GRACE_S`` later at the
    latest), marks this process's Prefect flow run Crashed (its worker, which would have, is gone) and sends
    SIGTERM, which Prefect's engine takes as a crash. Once per process.

    Not Linux's parent-death signal: that fires when the parent's *thread* that started this process ends, and a
    Prefect worker may start flow runs from a thread that does not live as long as the worker.
    """
    global _parent_watch
    if _parent_watch is not None:
        return
    resend_dropped_stops()  # the worker's SIGTERM (a cancel, its own stop) must not be lost either
    parent = os.getppid()  # a parent already gone by now goes unnoticed: the process was orphaned at birth
    from prefect import runtime

    flow_run = runtime.flow_run.id  # read here: the watching thread has no flow-run context

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        arm_watchdog(signal.SIGTERM)
        why = f"the process that started it (pid {parent}) died"
        if flow_run is not None:
            _mark_crashed(flow_run, why)
        os.kill(os.getpid(), signal.SIGTERM)
        # not through logging: in a Prefect flow run a log call from here was seen to block for good
        with contextlib.suppress(OSError):  # stderr may be a pipe to the dead parent
            sys.stderr.write(f"gplflow: {why}; stopping\n")
            sys.stderr.flush()

    _parent_watch = threading.Thread(target=watch, name="gplflow-parent-watch", daemon=True)
    _parent_watch.start()


def _mark_crashed(flow_run: str, why: str) -> None:
    """Set a flow run Crashed, as its worker does when the run's process ends; a few seconds at most, no retries.
    Without it a run whose worker was killed stays Running for good, and whoever waits for it waits on."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
    from prefect.states import Crashed

    quick = {PREFECT_API_REQUEST_TIMEOUT: 3.0, PREFECT_CLIENT_MAX_RETRIES: 0}
    # best effort, unlogged (see end_with_parent): the process ends either way; the run then stays Running
    with contextlib.suppress(Exception), temporary_settings(quick), get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run, Crashed(message=why), force=True)


@contextlib.contextmanager
def temporary_server() -> Iterator[str | None]:
    """Prefect's temporary server for the block, in its own session (see the module docstring); yields its API
    URL, or None where a server is configured (``PREFECT_API_URL``) or temporary servers are turned off."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None
        return
    from prefect.server.api import server as prefect_server

    records = Path(get_current_settings().home) / _RECORDS
    stop_orphans(records)
    server = prefect_server.SubprocessASGIServer()  # the instance Prefect's clients use (one per process)
    if not server.running:
        # Prefect stops the server as the process exits, after its log and event workers have sent what they
        # hold (stopped when the block ends, those would fail against a dead server); registered before the
        # server starts, the record is removed after that (atexit runs last-registered first).
        record: list[Path] = []
        atexit.register(lambda: [_forget(path) for path in record])
        started = prefect_server.subprocess
        prefect_server.subprocess = _OwnSession()  # only while it starts the server process
        try:
            server.start()
        finally:
            prefect_server.subprocess = started
        record.extend(path for path in [_record(records, server.server_process)] if path is not None)
    yield server.api_url


class _OwnSession:
    """The ``subprocess`` module as Prefect's server module sees it while it starts the server: ``Popen`` puts the
    process in a session of its own and has it die with this one."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:  # the name it stands in for
        return subprocess.Popen(*args, **kwargs, start_new_session=True, preexec_fn=_die_with_parent())


def _die_with_parent() -> Any:
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when this process dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl, set_pdeathsig, term = libc.prctl, 1, int(signal.SIGTERM)  # PR_SET_PDEATHSIG; resolved before the fork

    def preexec() -> None:
        prctl(set_pdeathsig, term, 0, 0, 0)

    return preexec


def _record(folder: Path, process: subprocess.Popen[Any] | None) -> Path | None:
    """Note the server's pid and start time, and this process's, so a later run can tell an orphan."""
    if process is None:
        return None
    try:
        me, server = psutil.Process(), psutil.Process(process.pid)
        data = {"pid": server.pid, "started": server.create_time(), "parent": me.pid,
                "parent_started": me.create_time()}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{server.pid}.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        return path
    except (OSError, psutil.Error) as err:  # the record is a safety net; a run does not fail without it
        logger.warning("could not record the temporary Prefect server's pid under %s: %s", folder, err)
        return None


def _forget(record: Path) -> None:
    with contextlib.suppress(OSError):
        record.unlink()


def stop_orphans(folder: Path) -> list[int]:
    """Stop the temporary servers that runs killed before they could stop them; returns their pids.

    A recorded server is an orphan when the run that started it is gone; it is stopped only if the pid is still
    that same process (same start time) and still a Prefect server.
    """
    stopped: list[int] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if _running(data["parent"], data["parent_started"]) is not None:
                continue  # its run still goes on (another gplflow run sharing PREFECT_HOME)
            server = _running(data["pid"], data["started"])
        except (OSError, ValueError, KeyError, TypeError):
            server = None  # an unreadable record: nothing to tell from it
        if server is not None and _is_prefect_server(server):
            logger.warning("stopping the temporary Prefect server (pid %d) that a killed run left running",
                           server.pid)
            _stop(server)
            stopped.append(server.pid)
        _forget(path)
    return stopped


def _running(pid: int, started: float) -> psutil.Process | None:
    """The process ``pid`` if it runs and is the one that started at ``started`` (not a reuse of its pid)."""
    try:
        process = psutil.Process(int(pid))
        if abs(process.create_time() - float(started)) < 1.0 and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except psutil.Error:
        pass
    return None


def _is_prefect_server(process: psutil.Process) -> bool:
    try:
        return any(SERVER_APP in part for part in process.cmdline())
    except psutil.Error:
        return False


def _stop(process: psutil.Process) -> None:
    with contextlib.suppress(psutil.Error):
        process.terminate()
        try:
            process.wait(_STOP_WAIT_S)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(_STOP_WAIT_S)
