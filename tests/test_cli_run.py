"""``gplflow run`` as a user runs it: its own process, on Prefect's temporary server, in a fresh PREFECT_HOME.

A config error raised inside a stage is one line on the terminal (the tracebacks Prefect logs go to the run's
log file).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the temporary server, not a test's
    return {**env, "PREFECT_HOME": str(tmp / "prefect"), "COLUMNS": "200",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def _start(tmp: Path, args: list[str], log: str) -> subprocess.Popen:
    """``gplflow ARGS`` in a process group of its own (as a shell runs a command), output to tmp/LOG."""
    with (tmp / log).open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "gplflow.flows.cli", *args], stdout=out, stderr=out,
                                env=_env(tmp), start_new_session=True, cwd=tmp)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(child: subprocess.Popen, others: list[psutil.Process]) -> None:
    """Whatever the test started and is still there (a failed assertion must not leave a run or server)."""
    for process in [*_descendants(child.pid), *others]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)


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
