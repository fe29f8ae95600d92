"""Training on several devices: a ``torchrun`` job (DDP: NCCL on GPUs, gloo on CPU) started and watched from the
calling process, and the worker every rank runs (``python -m gplflow.adapters.distributed JOB.json``).

The caller writes a job file (the function each rank calls, as ``module:function``, and its JSON payload: a
stage's inputs) and ``launch`` runs ``torchrun --nproc-per-node=N`` on it in a session of its own. Each rank marks
what it prints with its rank; rank 0 alone also prints events (step, loss) that ``launch`` hands to its caller.
Every line goes to this process's log (the run's log file), none to the terminal.

Several hosts: with ``GPLFLOW_NNODES`` > 1 and ``GPLFLOW_RDZV_ENDPOINT`` (``host:port``), torchrun meets the other
hosts through its c10d rendezvous instead of ``--standalone``; each other host joins the job with
``python -m gplflow.adapters.distributed join RUN_DIR`` (or the job file), which runs the same torchrun command
there. The run directory must then be a folder every host mounts at the same path (the job file, checkpoints).
torchrun may then give rank 0 to another host, so rank 0 also writes its events to a file in the job folder, and
``launch`` follows that file instead of its own torchrun's output.

Ending the job: a rank that fails records its error in the job folder and torchrun stops the others; ``launch``
then raises one line naming the rank and its error (or the signal that killed it, as torchrun reports it). An
interrupt of the caller (Ctrl-C, SIGTERM turned into an exception, a cancelled task) stops torchrun, which stops
its ranks; any process of the job still alive after a grace period is killed. Linux's parent-death signal covers
a caller or a torchrun that dies without a word (SIGKILL): no rank outlives the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import io
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
WORKER = "gplflow.adapters.distributed"  # this module, as ``python -m`` runs it (``__name__`` is then __main__)
EVENT = "@gplflow-event "  # rank 0's lines for the launcher: the prefix, then one JSON object
EVENTS_FILE = "events.jsonl"  # rank 0's events, a JSON object a line, in the job folder of a job over several hosts
_EVENTS_POLL_S = 0.5  # how often the launcher of a job over several hosts reads the events file
_STOP_GRACE_S = 10.0  # torchrun's time to stop its ranks after SIGTERM before the job's processes are killed
_TAIL = 200  # torchrun output lines kept for the failure message


NNODES_ENV, ENDPOINT_ENV, RDZV_ID_ENV = "GPLFLOW_NNODES", "GPLFLOW_RDZV_ENDPOINT", "GPLFLOW_RDZV_ID"
_JOIN_WAIT_S = 600.0  # how long ``join RUN_DIR`` waits for the job file a training stage writes


class RankFailedError(RuntimeError):
    """A rank of a distributed job failed or was killed (not a user error: a retry resumes from a checkpoint)."""


# --- where a process stands --------------------------------------------------------------------------------


def rank() -> int:
    """This process's global rank under torchrun (0 outside a distributed job)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes the job has (1 outside a distributed job)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes what the job produces (rank 0, or the only process)."""
    return rank() == 0


def visible_gpus() -> int:
    """How many CUDA devices this process may use (0 without CUDA, or with ``GPLFLOW_DEVICE=cpu``)."""
    from gplflow.adapters import models

    if models.device() != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def this_device() -> str:
    """The device this rank computes on, as the manifest records it: ``host:cuda:1 (NVIDIA H200)`` or ``host:cpu``."""
    from gplflow.adapters import models

    host = socket.gethostname()
    if models.device() != "cuda":
        return f"{host}:cpu"
    import torch

    index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    return f"{host}:cuda:{index} ({torch.cuda.get_device_name(index)})"


def devices_used() -> list[str]:
    """Every rank's device, in rank order (every rank must call it: it is a collective in a distributed job)."""
    if world_size() == 1:
        return [this_device()]
    import torch.distributed as dist

    found: list[Any] = [None] * world_size()
    dist.all_gather_object(found, this_device())
    return [str(d) for d in found]


def nnodes() -> int:
    """How many hosts a training job spans (``GPLFLOW_NNODES``, default 1); an InputError when the value is not a
    positive count, or when several hosts have no rendezvous endpoint to meet at."""
    from gplflow.adapters.errors import InputError

    raw = os.environ.get(NNODES_ENV, "1").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"{NNODES_ENV}={raw!r}: expected a positive count of hosts")
    if int(raw) > 1 and not os.environ.get(ENDPOINT_ENV, "").strip():
        raise InputError(f"{NNODES_ENV}={raw} needs {ENDPOINT_ENV}=HOST:PORT, the rendezvous every host reaches "
                         "(torchrun's c10d store runs there)")
    return int(raw)


def check_batch(batch_size: int, processes: int, key: str, why: str = "") -> None:
    """The global batch splits evenly over the processes, or a ValueError naming both numbers (``key``: the
    config section, ``train`` or ``pretrain``)."""
    if batch_size % processes:
        raise ValueError(f"{key}.batch_size {batch_size} does not divide over {processes} devices{why}: each device "
                         f"takes batch_size / devices examples; set a multiple of {processes}, or {key}.devices to "
                         f"a divisor of {batch_size}")


def device_count(devices: int | str, batch_size: int, key: str) -> int:
    """How many processes a training stage runs on this host: ``devices``, 'auto' being every visible GPU (1 on a
    CPU); an InputError when more GPUs are asked for than are visible, or when the global batch does not divide
    over every process of the job (this host's times ``GPLFLOW_NNODES``)."""
    from gplflow.adapters.errors import InputError

    gpus = visible_gpus()
    count = max(gpus, 1) if devices == "auto" else int(devices)
    if gpus and count > gpus:
        raise InputError(f"{key}.devices {count}: only {gpus} GPUs are visible to this process")
    hosts = nnodes()
    why = f" ({key}.devices auto: the visible GPUs)" if devices == "auto" else ""
    why += f" ({hosts} hosts x {count})" if hosts > 1 else ""
    try:
        check_batch(batch_size, count * hosts, key, why)
    except ValueError as err:
        raise InputError(str(err)) from err
    return count


def in_process(count: int) -> bool:
    """Whether a training of ``count`` processes on this host runs in the calling process: one device, one host."""
    return count == 1 and nnodes() == 1


# --- the launcher ------------------------------------------------------------------------------------------


def launch(job_dir: Path, nproc: int, target: str, payload: dict[str, Any], *, what: str,
           on_event: Callable[[dict[str, Any]], None] | None = None, env: dict[str, str] | None = None) -> None:
    """Run ``target(payload)`` on ``nproc`` ranks with torchrun on this host and wait for the job to end.

    ``job_dir`` holds the job file and each failed rank's error record (rewritten by every launch). ``on_event``
    is told rank 0's events (``{"step": 12}``, ``{"step": 12, "loss": 0.4}``). A failed rank raises
    ``RankFailedError`` naming ``what`` and the rank (a ``GplflowError`` a rank raised comes back as itself: the
    same user error on every rank).
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    for old in [*job_dir.glob("rank-*.json"), *job_dir.glob(EVENTS_FILE)]:
        old.unlink()
    job = job_dir / JOB_FILE
    hosts = nnodes()
    rendezvous = _rendezvous(job_dir, hosts)
    events = EVENTS_FILE if hosts > 1 else None  # rank 0 may run on another host: its events come through the file
    job.write_text(json.dumps({"target": target, "payload": payload, "nproc": nproc, "rendezvous": rendezvous,
                               "events": events}), encoding="utf-8")
    command = _torchrun(job, nproc, rendezvous)
    if hosts > 1:
        logger.info("%s: waiting for %d more hosts at %s: on each, run python -m %s join %s", what, hosts - 1,
                    os.environ[ENDPOINT_ENV], WORKER, job)
    process_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in process_env:  # torchrun sets 1 thread a rank: the host's cores shared out instead
        process_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    logger.info("%s: starting %d ranks: %s", what, nproc, " ".join(command), extra={"terminal": False})
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               text=True, errors="replace", env=process_env, start_new_session=True,
                               preexec_fn=_die_with_parent(signal.SIGTERM))
    tail: deque[str] = deque(maxlen=_TAIL)
    try:
        _follow(process, what, tail, on_event, job_dir / events if events else None)
        code = process.wait()
    except BaseException:
        stop(process, what)
        raise
    if code != 0:
        raise _failure(job_dir, nproc * hosts, what, code, list(tail))


def _rendezvous(job_dir: Path, hosts: int) -> list[str]:
    """torchrun's rendezvous arguments: ``--standalone`` on one host; on several, c10d at ``GPLFLOW_RDZV_ENDPOINT``
    under an id every host derives alike (``GPLFLOW_RDZV_ID``, else the job folder's stage and fingerprint)."""
    if hosts == 1:
        return ["--standalone"]
    run_id = os.environ.get(RDZV_ID_ENV) or re.sub(r"[^A-Za-z0-9_-]", "-", job_dir.parent.name or "gplflow")
    return [f"--nnodes={hosts}", "--rdzv-backend=c10d", f"--rdzv-endpoint={os.environ[ENDPOINT_ENV].strip()}",
            f"--rdzv-id={run_id}"]


def _torchrun(job: Path, nproc: int, rendezvous: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc-per-node={nproc}",
            "--max-restarts=0", "--monitor-interval=0.5", "-m", WORKER, str(job)]


def join(where: Path, wait_s: float = _JOIN_WAIT_S) -> int:
    """Join a job that spans several hosts from another host: run its torchrun command here and wait for it.

    ``where`` is the job file, or a run directory: the newest job file of a training stage there, waited for until
    one appears (the stage writes it when it starts its job)."""
    job = where if where.is_file() else None
    deadline = time.monotonic() + wait_s
    while job is None:
        found = sorted(where.glob(f".checkpoints/*/job/{JOB_FILE}"), key=lambda p: p.stat().st_mtime)
        if found:
            job = found[-1]
        elif time.monotonic() > deadline:
            print(f"no training job in {where} after {wait_s:.0f} s", file=sys.stderr)
            return 2
        else:
            time.sleep(1.0)
    spec = json.loads(job.read_text(encoding="utf-8"))
    return subprocess.call(_torchrun(job, int(spec["nproc"]), list(spec["rendezvous"])), stdin=subprocess.DEVNULL)


def _follow(process: subprocess.Popen[str], what: str, tail: deque[str],
            on_event: Callable[[dict[str, Any]], None] | None, events_file: Path | None = None) -> None:
    """Read the job's output to its end: events to ``on_event``, every other line to the log file.

    ``events_file`` (a job over several hosts): rank 0's events come from that file, read every
    ``_EVENTS_POLL_S`` in this thread, wherever rank 0 runs; the event lines of this host's output are dropped.
    """
    if events_file is None:
        for raw in process.stdout or ():
            _take(raw, what, tail, on_event)
        return
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for raw in process.stdout or ():
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=pump, name="gplflow-job-output", daemon=True).start()
    events = _EventsFile(events_file)
    while True:
        try:
            raw = lines.get(timeout=_EVENTS_POLL_S)
        except queue.Empty:
            raw = ""
        for event in events.new():
            if on_event is not None:
                on_event(event)
        if raw is None:
            return
        if raw:
            _take(raw, what, tail, None)


def _take(raw: str, what: str, tail: deque[str], on_event: Callable[[dict[str, Any]], None] | None) -> None:
    """One line of the job's output: an event to ``on_event`` (dropped without one), else to the log file."""
    line = raw.rstrip("\n")
    if line.startswith(EVENT):
        with contextlib.suppress(ValueError):
            event = json.loads(line[len(EVENT):])
            if on_event is not None:
                on_event(event)
            return
    tail.append(line)
    if line.strip():
        logger.info("%s: %s", what, line, extra={"terminal": False})


class _EventsFile:
    """The events rank 0 appended to a file (a folder every host mounts), read as they come: whole lines only."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as file:
                file.seek(self.offset)
                data = file.read()
        except OSError:  # not written yet
            return []
        whole = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        self.offset += len(whole)
        found = []
        for line in whole.decode("utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found


def stop(process: subprocess.Popen[Any], what: str, grace_s: float = _STOP_GRACE_S) -> None:
    """Stop a job: SIGTERM to torchrun (which stops its ranks), then SIGKILL to whatever of it is left."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    if process.poll() is None:
        logger.warning("%s: stopping the job's %d processes", what, len(family))
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    with contextlib.suppress(Exception):
        family += [c for c in psutil.Process(process.pid).children(recursive=True) if c not in family]
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    with contextlib.suppress(Exception):
        process.wait(timeout=grace_s)


_ROOT = re.compile(r"Root Cause \(first observed failure\):")
_FIELD = re.compile(r"^\s*(rank|exitcode)\s*:\s*(\d+|-?\d+.*)$")


def _failure(job_dir: Path, nproc: int, what: str, code: int, tail: list[str]) -> Exception:
    """The one-line error of a failed job, naming the rank that caused it.

    A rank killed by a signal (the OOM killer, a kill) is the cause: the others then fail in their collectives
    with errors that say nothing, or torchrun stops them with SIGTERM. Else the first error a rank recorded
    (a ``GplflowError`` comes back as itself); else what torchrun reported."""
    from gplflow.adapters.errors import InputError

    failures, root = _torchrun_failures(tail)
    signalled = [f for f in failures if f[1].startswith("SIG") and f[1] != "SIGTERM"]
    cause = root if root is not None and root[1].startswith("SIG") else next(iter(signalled), None)
    if cause is not None:
        return RankFailedError(f"{what}: rank {cause[0]} of {nproc} died ({cause[1]})")
    records = []
    for path in job_dir.glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text(encoding="utf-8")))
    if records:
        first = min(records, key=lambda r: r.get("time", 0.0))
        if first.get("user_error"):
            return InputError(first["error"])
        return RankFailedError(f"{what}: rank {first['rank']} of {nproc} failed: {first['error']}")
    if root is not None:
        return RankFailedError(f"{what}: rank {root[0]} of {nproc} failed ({root[1]})")
    last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
    return RankFailedError(f"{what}: torchrun exited with code {code} ({last})")


def _torchrun_failures(tail: list[str]) -> tuple[list[tuple[int, str]], tuple[int, str] | None]:
    """torchrun's failure report: (rank, how it ended: ``SIGKILL`` or ``exit code 1``) of every failure it lists
    (ranks it stopped itself among them), and of its root cause (the first failure it observed)."""
    found, current, root_from = [], None, None
    for line in tail:
        if _ROOT.search(line):
            root_from = len(found)
        match = _FIELD.match(line)
        if match is None:
            continue
        if match.group(1) == "rank":
            current = int(match.group(2).split(" ")[0])
        elif current is not None:
            signal_name = re.search(r"\b(SIG[A-Z]+)\b", match.group(2))
            found.append((current, signal_name.group(1) if signal_name else f"exit code {match.group(2).split()[0]}"))
            current = None
    root = found[root_from] if root_from is not None and root_from < len(found) else None
    return found, root


def _die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child ``sig`` when this process dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl, set_pdeathsig, number = libc.prctl, 1, int(sig)  # PR_SET_PDEATHSIG; resolved before the fork

    def preexec() -> None:
        prctl(set_pdeathsig, number, 0, 0, 0)

    return preexec


# --- the worker (every rank) -------------------------------------------------------------------------------


# set by ``main`` in a job over several hosts (rank 0), read by ``emit``: an environment variable, as ``python -m``
# runs this module as ``__main__`` and a stage's code imports it again under its name
_EVENTS_ENV = "GPLFLOW_JOB_EVENTS"
_events_to: dict[str, TextIO] = {}  # the events file, opened on the first event


def emit(event: dict[str, Any]) -> None:
    """Tell the launcher something (rank 0 only; other ranks' events are dropped)."""
    if is_main():
        sys.__stdout__.write(EVENT + json.dumps(event) + "\n")
        sys.__stdout__.flush()
        path = os.environ.get(_EVENTS_ENV)
        if path:  # the launcher may be on another host: it reads this file
            if path not in _events_to:
                _events_to[path] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open while the rank runs)
            _events_to[path].write(json.dumps(event) + "\n")
            _events_to[path].flush()


def step_events() -> Any:
    """A ``transformers.TrainerCallback`` emitting rank 0's step after each step and its loss when logged."""
    from transformers import TrainerCallback

    class StepEvents(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            emit({"step": state.global_step, "max_steps": state.max_steps})

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            emit({"step": state.global_step})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                emit({"step": state.global_step, "loss": float(logs["loss"])})

    return StepEvents()


class _Marked(io.TextIOBase):
    """A text stream that starts each line with ``[rank N]`` (the launcher logs every rank to one file)."""

    def __init__(self, stream: TextIO, mark: str):
        self.stream, self.mark, self.at_start = stream, mark, True

    def write(self, text: str) -> int:
        for piece in re.split(r"(?<=[\n\r])", text):
            if piece:
                self.stream.write((self.mark if self.at_start else "") + piece)
                self.at_start = piece.endswith(("\n", "\r"))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _marked_output(mark: str) -> Iterator[None]:
    sys.stdout, sys.stderr = _Marked(sys.__stdout__, mark), _Marked(sys.__stderr__, mark)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _record_failure(job_dir: Path, err: BaseException) -> None:
    """The rank's error, for the launcher's one-line message (a rank killed by a signal records nothing)."""
    from gplflow.adapters.errors import GplflowError

    message = str(err).splitlines()[0] if str(err).strip() else ""
    record = {"rank": rank(), "pid": os.getpid(), "time": time.time(), "user_error": isinstance(err, GplflowError),
              "error": str(err) if isinstance(err, GplflowError) else f"{type(err).__name__}: {message}".rstrip(": ")}
    path = job_dir / f"rank-{rank()}.json"
    path.write_text(json.dumps(record), encoding="utf-8")


def main(argv: list[str]) -> int:
    """A rank: read the job file, call its target with its payload, record the error if it fails."""
    if argv[:1] == ["join"] and len(argv) == 2:
        return join(Path(argv[1]))
    prctl = _die_with_parent(signal.SIGKILL)  # no rank outlives torchrun (whose ranks run in sessions of their own)
    if prctl is not None:
        prctl()
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text(encoding="utf-8"))
    if is_main() and job.get("events"):
        os.environ[_EVENTS_ENV] = str(job_path.parent / job["events"])
    with _marked_output(f"[rank {rank()}] "):
        try:
            module, _, function = job["target"].partition(":")
            getattr(importlib.import_module(module), function)(job["payload"])
        except BaseException as err:
            _record_failure(job_path.parent, err)
            raise
        finally:
            _end_process_group()
    return 0


def _end_process_group() -> None:
    """Destroy the process group the target made (the Trainer makes one and leaves it) while Python is still whole.

    Left to the interpreter's exit, gloo's threads may still hold work whose tensors reference Python objects;
    freeing them then takes the GIL of an interpreter being torn down, and the rank aborts. A clean-clone CI run
    saw a rank of a finished 2-process job die so (SIGABRT), which failed the stage."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a rank on its way out after an error: its error is the message
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
