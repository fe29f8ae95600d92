"""One process per device: the local runner of inference shards (generate, mine's corpus encoding, label).

``run_on_devices`` starts ``python -m gplflow.adapters.device_workers JOB.json`` once per device, each with
``CUDA_VISIBLE_DEVICES`` set to its one GPU (so every process sees one device, ``cuda:0``, and loads its models
there), and waits for them. Each calls ``target(payload)`` (a ``module:function`` and its JSON payload). What a
process prints goes to this process's log (the run's log file), each line marked with its device; lines it
starts with ``EVENT`` are handed to the caller (a shard done).

Ending: a process that fails records its error in the job folder; the others are then stopped and the call
raises one line naming the device and the error (or the signal that killed it). An interrupt of the caller
(Ctrl-C, SIGTERM turned into an exception, a cancelled flow) stops every process. Each is started with Linux's
parent-death signal (SIGKILL), so none outlives a caller that dies without a word. The ideas are those of the
torchrun launcher in ``adapters/distributed.py``; no process group is needed here, the shards are independent.

Test seam: ``GPLFLOW_FAKE_DEVICES=N`` makes ``visible_devices`` report N stand-in devices (``cpu:0`` …), CPU
processes with GPUs hidden, so the multi-device path runs and is tested on a machine without GPUs. It is for
tests and for trying the path out; it affects ``execution.devices`` only, not training (``train.devices``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gplflow.adapters.distributed import _die_with_parent
from gplflow.adapters.errors import GplflowError, InputError

logger = logging.getLogger(__name__)

FAKE_DEVICES_VAR = "GPLFLOW_FAKE_DEVICES"  # test seam: N CPU processes stand in for N devices
EVENT = "@gplflow-device-event "  # a worker's line for the launcher: the prefix, then one JSON object
_POLL_S = 0.2
_STOP_GRACE_S = 10.0  # time a process has to end after SIGTERM before it is killed


class DeviceFailedError(GplflowError, RuntimeError):
    """A device's process failed or was killed: one line naming the device and its error (the run's log file holds
    the traceback, each line marked with the device); a rerun resumes from the finished shards."""


# --- which devices ----------------------------------------------------------------------------------------


def fake_devices() -> int | None:
    """The stand-in device count of the test seam ``GPLFLOW_FAKE_DEVICES`` (None when unset)."""
    raw = os.environ.get(FAKE_DEVICES_VAR, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"{FAKE_DEVICES_VAR}={raw!r}: expected a positive integer (a test seam: that many CPU "
                         "processes stand in for devices)")
    return int(raw)


def visible_devices() -> list[str]:
    """The devices this process may spread shards over, by name: ``cuda:<id>`` per visible GPU (``<id>`` as
    ``CUDA_VISIBLE_DEVICES`` gives it, else its index), ``["cpu"]`` without CUDA (or with ``GPLFLOW_DEVICE=cpu``),
    ``cpu:0`` … ``cpu:N-1`` under the test seam."""
    if (fake := fake_devices()) is not None:
        return [f"cpu:{i}" for i in range(fake)]
    from gplflow.adapters import models

    if models.device() != "cuda":
        return ["cpu"]
    import torch

    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = listed[:count] if listed else [str(i) for i in range(count)]
    return [f"cuda:{i}" for i in ids]


def pinned_env(device: str, n_devices: int) -> dict[str, str]:
    """The environment that pins a process to ``device``: its one GPU, or the CPU with its share of the cores."""
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.removeprefix("cuda:")}
    env = {"CUDA_VISIBLE_DEVICES": "", "GPLFLOW_DEVICE": "cpu"}
    if "OMP_NUM_THREADS" not in os.environ:  # an explicit setting wins (the tests use one thread everywhere)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_devices))
    return env


# --- the launcher ------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    device: str
    job: Path
    process: subprocess.Popen[str]
    reader: threading.Thread = field(init=False)


def run_on_devices(job_dir: Path, target: str, payloads: dict[str, Any], *, what: str,
                   on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """Run ``target(payload)`` in one process per device (``payloads``: device -> payload) and wait for all.

    ``on_event(device, event)`` is told each event a worker emits, in this thread. The first process that fails
    stops the others and raises ``DeviceFailedError`` naming ``what``, its device and its error (a
    ``GplflowError`` it raised comes back as an ``InputError``: the same user error on any device).
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
    workers: list[_Worker] = []
    try:
        for i, (device, payload) in enumerate(payloads.items()):
            workers.append(_start(job_dir / f"device-{i}.json", device, target, payload, len(payloads), what,
                                  events))
        _wait(workers, what, events, on_event)
    except BaseException:
        _stop_all(workers, what)
        raise


def _start(job: Path, device: str, target: str, payload: Any, n_devices: int, what: str,
           events: queue.Queue[tuple[str, dict[str, Any]]]) -> _Worker:
    job.write_text(json.dumps({"target": target, "payload": payload, "device": device}), encoding="utf-8")
    _error_file(job).unlink(missing_ok=True)
    env = {**os.environ, **pinned_env(device, n_devices), "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", __name__, str(job)]
    logger.info("%s: starting a process on %s", what, device, extra={"terminal": False})
    # a session of its own: the terminal's Ctrl-C reaches this process, which stops the workers
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               text=True, errors="replace", env=env, start_new_session=True,
                               preexec_fn=_die_with_parent(signal.SIGKILL))
    worker = _Worker(device, job, process)
    worker.reader = threading.Thread(target=_follow, args=(worker, what, events), daemon=True)
    worker.reader.start()
    return worker


def _follow(worker: _Worker, what: str, events: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
    """Read a worker's output to its end: events to the queue, every other line to the log file."""
    for raw in worker.process.stdout or ():
        line = raw.rstrip("\n").rstrip("\r").rsplit("\r", 1)[-1]  # a progress bar's redrawn line: its last state
        if line.startswith(EVENT):
            with contextlib.suppress(ValueError):
                events.put((worker.device, json.loads(line[len(EVENT):])))
                continue
        if line.strip():
            logger.info("%s [%s]: %s", what, worker.device, line, extra={"terminal": False})


def _wait(workers: list[_Worker], what: str, events: queue.Queue[tuple[str, dict[str, Any]]],
          on_event: Callable[[str, dict[str, Any]], None] | None) -> None:
    running = list(workers)
    while running:
        time.sleep(_POLL_S)
        _drain(events, on_event)
        for worker in list(running):
            code = worker.process.poll()
            if code is None:
                continue
            running.remove(worker)
            worker.reader.join(timeout=5)  # its last lines and events
            _drain(events, on_event)
            if code != 0:
                _stop_all(running, what)
                raise _failure(worker, code, what, len(workers))


def _drain(events: queue.Queue[tuple[str, dict[str, Any]]],
           on_event: Callable[[str, dict[str, Any]], None] | None) -> None:
    while True:
        try:
            device, event = events.get_nowait()
        except queue.Empty:
            return
        if on_event is not None:
            on_event(device, event)


def _failure(worker: _Worker, code: int, what: str, n: int) -> Exception:
    """One line naming the device and its error (recorded by the worker), or the signal that ended it."""
    where = f"{what}: the process on {worker.device} (one of {n} devices, pid {worker.process.pid})"
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(_error_file(worker.job).read_text(encoding="utf-8"))
        if record.get("user_error"):
            return InputError(f"{what}: on {worker.device}: {record['error']}")
        return DeviceFailedError(f"{where} failed: {record['error']}")
    if code < 0:
        return DeviceFailedError(f"{where} died ({signal.Signals(-code).name})")
    return DeviceFailedError(f"{where} exited with code {code} and recorded no error; see the run's log file")


def _stop_all(workers: list[_Worker], what: str, grace_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM to every worker still running (and what it started), then SIGKILL to whatever is left."""
    import psutil

    family: list[psutil.Process] = []
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(worker.process.pid)
            family += [parent, *parent.children(recursive=True)]
    alive = [w for w in workers if w.process.poll() is None]
    if alive:
        logger.warning("%s: stopping the processes on %s", what, ", ".join(w.device for w in alive))
    for worker in alive:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGTERM)
    _, left = psutil.wait_procs(family, timeout=grace_s)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(left, timeout=grace_s)
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.process.wait(timeout=grace_s)


def _error_file(job: Path) -> Path:
    return job.with_suffix(".error.json")


# --- the worker (one per device) ---------------------------------------------------------------------------


def emit(event: dict[str, Any]) -> None:
    """Tell the launcher something (a shard done)."""
    sys.__stdout__.write(EVENT + json.dumps(event) + "\n")
    sys.__stdout__.flush()


def main(argv: list[str]) -> int:
    """A device's process: read the job file, call its target with its payload, record the error if it fails."""
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        module, _, function = job["target"].partition(":")
        getattr(importlib.import_module(module), function)(job["payload"])
    except BaseException as err:
        first = str(err).splitlines()[0] if str(err).strip() else ""
        message = str(err) if isinstance(err, GplflowError) else f"{type(err).__name__}: {first}".rstrip(": ")
        record = {"device": job["device"], "pid": os.getpid(), "user_error": isinstance(err, GplflowError),
                  "error": message}
        _error_file(job_path).write_text(json.dumps(record), encoding="utf-8")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
