"""``gplflow run`` as a user runs it: its own process, on Prefect's temporary server, in a fresh PREFECT_HOME.

A config error raised inside a stage is one line on the terminal (the tracebacks Prefect logs go to the run's
log file). Ctrl-C and SIGTERM stop a run within seconds and mark its flow run Crashed; after those and SIGKILL
no process is left behind, and a rerun resumes the run (and marks a SIGKILLed run's flow run Crashed); a
temporary server that a killed run left is stopped by the next run; a second run on a run directory that a run
holds is refused at once. Each `gplflow run` here starts a Prefect server, so the interrupted runs, the rerun that
completes the run (with the refused second run beside it) and a last rerun are one sequence on one run directory
(the module fixture ``sequence``), on the demo's first 200 passages, whose parts the tests assert on.
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
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from gplflow.flows.interrupt import SERVER_APP, stop_orphans

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
SMALL = ["train.steps=4", "train.checkpoint_every=2", "train.warmup_steps=0", "train.batch_size=8",
         "train.max_seq_length=64", "mine.negatives_per_query=4"]
PASSAGES = 200  # of the demo's 337: mining them with MiniLM still takes seconds, long enough to be interrupted
STOP_WITHIN_S = 15.0
START_WITHIN_S = 240.0  # a loaded machine starts Prefect's server and reaches mining in well under this
SEQUENCE_TIMEOUT_S = 1500  # the module's runs: three interrupted, the one that completes, a last one

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
    """configs/demo.yaml on the demo corpus's first passages, with nothing to evaluate (the test waits for mining,
    not for evaluators)."""
    cfg = yaml.safe_load(DEMO.read_text())
    source = (DEMO.parent / cfg["corpus"]["path"]).resolve() / "corpus.jsonl"
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:PASSAGES]),
                      encoding="utf-8")
    cfg["corpus"]["path"] = str(corpus)
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


@dataclass
class Outcome:
    """What one ``gplflow run`` process did: exit code, seconds to exit, processes left, its output."""

    code: int
    seconds: float
    left: list[str]
    output: str
    mined: bool = False  # the run directory held negatives after it


@dataclass
class Sequence:
    """One run directory taken through the interrupted runs, the rerun that completes it (while a second run is
    refused its directory), and a last rerun of the finished run."""

    tmp: Path
    run_dir: Path
    interrupted: dict[str, Outcome] = field(default_factory=dict)
    early: dict[str, str] = field(default_factory=dict)  # corpus and queries manifests after the first interrupt
    early_after: list[dict[str, str]] = field(default_factory=list)  # the same, after each interrupt
    locked_after_interrupts: bool = False
    servers_after_interrupts: int = -1
    holder: dict = field(default_factory=dict)  # the lock while the completing rerun computed
    rerun_pid: int = 0
    second: Outcome | None = None
    rerun: Outcome | None = None
    dot_names_after_rerun: list[str] = field(default_factory=list)
    checkpoints_after_rerun: list[str] = field(default_factory=list)
    locked_after_rerun: bool = True
    servers_after_rerun: list[str] = field(default_factory=list)
    done: dict[str, str] = field(default_factory=dict)  # every stage's manifest after the completing rerun
    last: Outcome | None = None
    done_after_last: dict[str, str] = field(default_factory=dict)


def _manifests(run_dir: Path) -> dict[str, str]:
    return {p.name: (p / "manifest.json").read_text() for p in run_dir.iterdir() if (p / "manifest.json").exists()}


def _finish(tmp: Path, child: subprocess.Popen, log: str, timeout: float, started: float) -> Outcome:
    try:
        code = child.wait(timeout=timeout)
    finally:
        _kill(child, [])
    return Outcome(code, time.monotonic() - started, [], (tmp / log).read_text())


def _busy_second_run(tmp: Path, run_dir: Path, first: subprocess.Popen, log: str, seq: Sequence) -> None:
    """Once ``first`` holds the run directory's lock, a second run on it: its outcome goes to ``seq``."""
    deadline = time.monotonic() + START_WITHIN_S
    while True:  # the SIGKILLed run's lock is there until the rerun takes it over
        assert first.poll() is None, (tmp / log).read_text()[-3000:]
        assert time.monotonic() < deadline, "the rerun did not take the lock"
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            seq.holder = json.loads((run_dir / ".lock").read_text())
            if seq.holder["pid"] == first.pid:
                break
        time.sleep(0.2)
    started = time.monotonic()
    seq.second = _finish(tmp, _start(tmp, _run_args(tmp, run_dir), "second.log"), "second.log", 120, started)


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> Sequence:
    """Ctrl-C, SIGTERM and SIGKILL while mining, each on the run directory the one before left; then the rerun
    that completes the run, with a second run started on the directory while the rerun holds it; then a last
    rerun. The tests below assert on parts of it (one sequence: each ``gplflow run`` costs a Prefect server)."""
    tmp = tmp_path_factory.mktemp("cli-run")
    seq = Sequence(tmp, tmp / "run")
    for signum, _, _ in INTERRUPTS:
        name = signal.Signals(signum).name
        seconds, code, left = _interrupt_while_mining(tmp, seq.run_dir, signum, f"{name}.log")
        mined = (seq.run_dir / "negatives").exists()
        seq.interrupted[name] = Outcome(code, seconds, left, (tmp / f"{name}.log").read_text(), mined)
        print(f"{name}: exit {code} after {seconds:.1f} s; processes left: {left}")
        seq.early = seq.early or {stage: (seq.run_dir / stage / "manifest.json").read_text()
                                  for stage in ("corpus", "queries")}
        seq.early_after.append({stage: (seq.run_dir / stage / "manifest.json").read_text() for stage in seq.early})
    seq.locked_after_interrupts = (seq.run_dir / ".lock").exists()
    seq.servers_after_interrupts = len(list((tmp / "prefect" / "gplflow-servers").iterdir()))

    started = time.monotonic()
    rerun = _start(tmp, _run_args(tmp, seq.run_dir), "rerun.log")
    seq.rerun_pid = rerun.pid
    try:
        _busy_second_run(tmp, seq.run_dir, rerun, "rerun.log", seq)
        seq.rerun = _finish(tmp, rerun, "rerun.log", 600, started)
    finally:
        _kill(rerun, [])
    seq.locked_after_rerun = (seq.run_dir / ".lock").exists()
    seq.dot_names_after_rerun = sorted(p.name for p in seq.run_dir.iterdir()
                                       if p.name.startswith(".") and p.name != ".checkpoints")
    seq.checkpoints_after_rerun = sorted(p.name for p in (seq.run_dir / ".checkpoints").iterdir())
    seq.servers_after_rerun = sorted(p.name for p in (tmp / "prefect" / "gplflow-servers").iterdir())
    seq.done = _manifests(seq.run_dir)
    if seq.rerun.code == 0:
        seq.last = _finish(tmp, _start(tmp, _run_args(tmp, seq.run_dir), "last.log"), "last.log", 600,
                           time.monotonic())
        seq.done_after_last = _manifests(seq.run_dir)
    return seq


@pytest.mark.timeout(SEQUENCE_TIMEOUT_S)
@pytest.mark.parametrize(("signum", "expected", "said"), INTERRUPTS, ids=[s.name for s, _, _ in INTERRUPTS])
def test_ctrl_c_sigterm_and_sigkill_stop_the_run_within_seconds(sequence: Sequence, signum: int, expected: int,
                                                                 said: str) -> None:
    outcome = sequence.interrupted[signal.Signals(signum).name]
    output = outcome.output
    assert outcome.code == expected and outcome.seconds < STOP_WITHIN_S and outcome.left == [], output[-3000:]
    assert said in output and "Traceback" not in output and "httpx" not in output, output[-3000:]
    assert not outcome.mined
    assert all(after == sequence.early for after in sequence.early_after)  # ingest and generate were reused


@pytest.mark.timeout(SEQUENCE_TIMEOUT_S)
def test_a_rerun_resumes_the_interrupted_run_and_marks_their_flow_runs_crashed(sequence: Sequence) -> None:
    assert not any(outcome.mined for outcome in sequence.interrupted.values())  # the rerun is what mined
    assert sequence.locked_after_interrupts and sequence.servers_after_interrupts == 1  # the SIGKILLed run's
    assert sequence.rerun is not None and sequence.rerun.code == 0, sequence.rerun and sequence.rerun.output[-3000:]
    assert {stage: sequence.done[stage] for stage in sequence.early} == sequence.early
    assert "model" in sequence.done
    # the killed run could not say it ended; the rerun took over its lock, which named its flow run, and marked it
    assert _flow_run_states(sequence.tmp) == ["CRASHED", "CRASHED", "CRASHED", "COMPLETED", "COMPLETED"]
    assert sequence.servers_after_rerun == []  # the killed run's record too
    log = (sequence.run_dir / "logs" / "gplflow.log").read_text()
    assert "Execution was aborted by an interrupt signal" in log and "aborted by a termination signal" in log


@pytest.mark.timeout(SEQUENCE_TIMEOUT_S)
def test_a_second_run_on_a_busy_run_directory_stops_at_once_and_the_first_is_unharmed(sequence: Sequence) -> None:
    second, rerun = sequence.second, sequence.rerun
    assert second is not None and rerun is not None
    assert second.code == 2 and "Traceback" not in second.output, second.output[-3000:]
    assert "another run holds this run directory" in second.output, second.output
    assert sequence.holder["pid"] == sequence.rerun_pid and f"pid {sequence.rerun_pid}" in second.output, second.output
    assert second.seconds < 60, second.seconds  # refused before any Prefect server starts
    assert "Starting temporary server" not in second.output
    assert rerun.code == 0, rerun.output[-3000:]
    assert not sequence.locked_after_rerun
    # no staging folder, temporary folder or checkpoint of the finished training left behind
    assert sequence.dot_names_after_rerun == [] and sequence.checkpoints_after_rerun == []
    assert {"corpus", "queries", "negatives", "triples", "model"} <= set(sequence.done)
    assert sequence.last is not None and sequence.last.code == 0, sequence.last and sequence.last.output[-3000:]
    assert sequence.done_after_last == sequence.done  # all reused


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
