"""``gplflow run`` as a user runs it: its own process, on Prefect's temporary server, in a fresh PREFECT_HOME.

A config error raised inside a stage is one line on the terminal (the tracebacks Prefect logs go to the run's
log file). Ctrl-C and SIGTERM stop a run within seconds and mark its flow run Crashed; after those and SIGKILL
no process is left behind, and a rerun resumes the run (and marks a SIGKILLed run's flow run Crashed); a
temporary server that a killed run left is stopped by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from gplflow.flows.interrupt import SERVER_APP, stop_orphans

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SMALL = ["train.steps=4", "train.checkpoint_every=2", "train.warmup_steps=0", "mine.negatives_per_query=4"]
STOP_WITHIN_S = 15.0
START_WITHIN_S = 240.0  # a loaded machine starts Prefect's server and reaches mining in well under this

pytestmark = [pytest.mark.slow, pytest.mark.serial]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the temporary server, not a test's
    return {**env, "PREFECT_HOME": str(tmp / "prefect"), "COLUMNS": "200",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def _foreground() -> None:
    """In the child: SIGINT handled as in a command an interactive shell runs in the foreground. A test session
    started in the background by a non-interactive shell (``make test &``) ignores SIGINT, children inherit
    that, and Python then keeps ignoring it: Ctrl-C could never reach the run under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp: Path, args: list[str], log: str) -> subprocess.Popen:
    """``gplflow ARGS`` in a process group of its own (as a shell runs a command), output to tmp/LOG."""
    with (tmp / log).open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "gplflow.flows.cli", *args], stdout=out, stderr=out,
                                env=_env(tmp), start_new_session=True, cwd=tmp, preexec_fn=_foreground)


def _demo(tmp: Path) -> Path:
    """configs/demo.yaml with nothing to evaluate (the test waits for mining, not for evaluators)."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["corpus"]["path"] = str((DEMO.parent / cfg["corpus"]["path"]).resolve())
    cfg["evaluate"] = {"heldout_fraction": 0}
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_args(tmp: Path, run_dir: Path) -> list[str]:
    return ["run", str(_demo(tmp)), "--run-dir", str(run_dir), *(a for s in SMALL for a in ("--set", s))]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[str]:
    found = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return found


def _kill(child: subprocess.Popen, others: list[psutil.Process]) -> None:
    """Whatever the test started and is still there (a failed assertion must not leave a run or server)."""
    for process in [*_descendants(child.pid), *others]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)


def _interrupt_while_mining(tmp: Path, run_dir: Path, signum: int, log: str) -> tuple[float, int, list[str]]:
    """Start the run, wait until its mining task runs, send ``signum`` (SIGINT to the process group, as Ctrl-C
    does; any other to the process, as ``kill`` does); returns seconds to exit, exit code, processes left."""
    child = _start(tmp, _run_args(tmp, run_dir), log)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_WITHIN_S
        while "mine hard negatives" not in _running_tasks(tmp):
            assert child.poll() is None, (tmp / log).read_text()[-3000:]
            assert time.monotonic() < deadline, "mining did not start"
            time.sleep(0.2)
        family = _descendants(child.pid)
        assert any(SERVER_APP in " ".join(p.cmdline()) for p in family), _alive(family)
        sent = time.monotonic()
        os.killpg(child.pid, signum) if signum == signal.SIGINT else os.kill(child.pid, signum)
        code = child.wait(timeout=60)
        seconds = time.monotonic() - sent
        while _alive(family) and time.monotonic() < sent + STOP_WITHIN_S:  # a server told to stop as its parent
            time.sleep(0.2)                                                # died takes a moment to go
        return seconds, code, _alive(family)
    finally:
        _kill(child, family)


def _running_tasks(tmp: Path) -> list[str]:
    """The task runs the Prefect database of tmp/prefect holds as Running (none while it is not created yet)."""
    try:
        with contextlib.closing(sqlite3.connect(tmp / "prefect" / "prefect.db", timeout=1)) as db:
            return [row[0] for row in db.execute("SELECT name FROM task_run WHERE state_type = 'RUNNING'")]
    except sqlite3.Error:
        return []


def _flow_run_states(tmp: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(tmp / "prefect" / "prefect.db")) as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run ORDER BY created")]


INTERRUPTS = [(signal.SIGINT, 130, "interrupted (SIGINT): the run stopped; the same command resumes it"),
              (signal.SIGTERM, 143, "interrupted (SIGTERM): the run stopped; the same command resumes it"),
              (signal.SIGKILL, -signal.SIGKILL, "")]  # nothing to print: the server goes with its parent


@pytest.mark.timeout(1200)
def test_ctrl_c_sigterm_and_sigkill_stop_the_run_within_seconds_and_a_rerun_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    kept: dict[str, str] = {}
    for signum, expected, said in INTERRUPTS:
        name = signal.Signals(signum).name
        seconds, code, left = _interrupt_while_mining(tmp_path, run_dir, signum, f"{name}.log")
        output = (tmp_path / f"{name}.log").read_text()
        print(f"{name}: exit {code} after {seconds:.1f} s; processes left: {left}")
        assert code == expected and seconds < STOP_WITHIN_S and left == [], output[-3000:]
        assert said in output and "Traceback" not in output and "httpx" not in output, output[-3000:]
        assert not (run_dir / "negatives").exists()
        kept = kept or {stage: (run_dir / stage / "manifest.json").read_text() for stage in ("corpus", "queries")}
        assert {stage: (run_dir / stage / "manifest.json").read_text() for stage in kept} == kept  # reused
    assert (run_dir / ".lock").exists() and len(list((tmp_path / "prefect" / "gplflow-servers").iterdir())) == 1

    rerun = _start(tmp_path, _run_args(tmp_path, run_dir), "rerun.log")
    try:
        code = rerun.wait(timeout=600)
    finally:
        _kill(rerun, [])
    output = (tmp_path / "rerun.log").read_text()
    assert code == 0, output[-3000:]
    assert {stage: (run_dir / stage / "manifest.json").read_text() for stage in kept} == kept
    assert (run_dir / "model" / "manifest.json").exists()
    # the killed run could not say it ended; the rerun took over its lock, which named its flow run, and marked it
    assert _flow_run_states(tmp_path) == ["CRASHED", "CRASHED", "CRASHED", "COMPLETED"]
    assert list((tmp_path / "prefect" / "gplflow-servers").iterdir()) == []  # the killed run's record too
    log = (run_dir / "logs" / "gplflow.log").read_text()
    assert "Execution was aborted by an interrupt signal" in log and "aborted by a termination signal" in log


@pytest.mark.timeout(900)
def test_a_second_run_on_a_busy_run_directory_stops_at_once_and_the_first_is_unharmed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _start(tmp_path, _run_args(tmp_path, run_dir), "first.log")
    try:
        deadline = time.monotonic() + START_WITHIN_S
        while not _running_tasks(tmp_path):  # the first run holds the lock and computes a stage
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run's stages did not start"
            time.sleep(0.2)
        holder = json.loads((run_dir / ".lock").read_text())
        started = time.monotonic()
        second = _start(tmp_path, _run_args(tmp_path, run_dir), "second.log")
        try:
            code = second.wait(timeout=120)
        finally:
            _kill(second, [])
        seconds = time.monotonic() - started
        output = (tmp_path / "second.log").read_text()
        assert code == 2 and "Traceback" not in output, output[-3000:]
        assert "another run holds this run directory" in output and f"pid {first.pid}" in output, output
        assert holder["pid"] == first.pid and seconds < 60, seconds  # refused before any Prefect server starts
        assert "Starting temporary server" not in output
        assert first.poll() is None or first.returncode == 0
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        _kill(first, [])
    assert not (run_dir / ".lock").exists()
    # no staging folder, temporary folder or checkpoint of the finished training left behind
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".checkpoints") == []
    assert list((run_dir / ".checkpoints").iterdir()) == []
    kept = {p.name: (p / "manifest.json").read_text() for p in run_dir.iterdir() if (p / "manifest.json").exists()}
    assert {"corpus", "queries", "negatives", "triples", "model"} <= set(kept)
    rerun = _start(tmp_path, _run_args(tmp_path, run_dir), "rerun.log")
    try:
        assert rerun.wait(timeout=600) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    finally:
        _kill(rerun, [])
    assert {name: (run_dir / name / "manifest.json").read_text() for name in kept} == kept  # all reused


@pytest.mark.timeout(300)
def test_an_error_inside_a_stage_is_one_line_and_the_log_file_has_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"_id": "a", "text": "bees"}\n{"_id": "b", "text": "wasps"}\n'
                                         '{"_id": "c", "title": "no text"}\n')
    (tmp_path / "c.yaml").write_text("name: t\nprofile: tiny\ncorpus:\n  path: docs.jsonl\n")
    child = _start(tmp_path, ["run", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")], "out.log")
    try:
        code = child.wait(timeout=240)
    finally:
        _kill(child, [])
    output = (tmp_path / "out.log").read_text()
    log = tmp_path / "run" / "logs" / "gplflow.log"
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in output, output
    assert errors == [f"error: {tmp_path}/docs.jsonl line 3: missing field 'text' (full log: {log})"], output
    assert "Task run failed" not in output and "Finished in state Failed" not in output, output
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "CorpusError" in text
    assert "prefect.task_runs" in text and "prefect.flow_runs" in text
    assert not (tmp_path / "run" / "corpus").exists()


def test_a_temporary_server_left_by_a_killed_run_is_stopped_by_the_next(tmp_path: Path) -> None:
    """A recorded server whose run is gone is stopped; one whose run still goes on, or a pid that is no
    longer a Prefect server, is left alone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_started = psutil.Process(gone.pid).create_time()
    gone.wait(timeout=30)
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    orphan = subprocess.Popen([*sleeper, SERVER_APP])  # looks like a temporary server
    kept = subprocess.Popen([*sleeper, SERVER_APP])  # a server whose run (this process) still runs
    stranger = subprocess.Popen(sleeper)  # some other process that got a recorded pid
    folder = tmp_path / "gplflow-servers"
    folder.mkdir()
    me = psutil.Process()
    try:
        for process, parent, started in ((orphan, gone.pid, gone_started), (stranger, gone.pid, gone_started),
                                         (kept, me.pid, me.create_time())):
            record = {"pid": process.pid, "started": psutil.Process(process.pid).create_time(), "parent": parent,
                      "parent_started": started}
            (folder / f"{process.pid}.json").write_text(json.dumps(record))
        (folder / "1.json").write_text("{oops")
        assert stop_orphans(folder) == [orphan.pid]
        assert orphan.wait(timeout=10) is not None
        assert kept.poll() is None and stranger.poll() is None
        assert sorted(p.name for p in folder.iterdir()) == [f"{kept.pid}.json"]
    finally:
        for process in (orphan, kept, stranger):
            process.kill()
            process.wait(timeout=30)
