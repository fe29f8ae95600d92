"""A stop signal ends the process within ``STOP_GRACE_S`` even when its way out hangs (issue 18, part 5: a
Prefect API too slow to answer kept ``gplflow run`` alive for more than 50 s after SIGTERM); a shard's process
ends when the worker that started it is killed (there, they outlived their workers)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.serial

CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a shell's foreground command
from gplflow.flows import interrupt
interrupt.STOP_GRACE_S = 1.0
with interrupt.stop_on_signals():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        time.sleep(60)  # a way out that hangs, as on an API that does not answer
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_hanging_way_out_ends_within_the_grace(signum: int, code: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        sent = time.monotonic()
        child.send_signal(signum)
        child.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
    out, err = child.communicate()
    assert out.strip() == "stopping"  # the signal was turned into the interrupt first
    assert child.returncode == code, err
    assert 1.0 <= took < 6.0, took
    assert f"still stopping 1 s after {signal.Signals(signum).name}; exiting now" in err


IN_A_FLOW = """
import signal, time
from prefect.exceptions import TerminationSignal
from gplflow.flows import interrupt
interrupt.STOP_GRACE_S = 1.0
try:
    with interrupt.watchdog_on_stop():
        raise TerminationSignal(signal.SIGTERM)  # what Prefect's handler raises in a flow run
except TerminationSignal:
    print("stopping", flush=True)
    time.sleep(60)  # Prefect reporting the run Crashed to an API that does not answer
"""


def test_prefects_termination_signal_in_a_flow_run_arms_the_watchdog() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", IN_A_FLOW], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "stopping" and done.returncode == 143, done.stderr
    assert time.monotonic() - started < 30  # the import of prefect, then about 1 s, not the 60 s sleep
    assert "still stopping 1 s after SIGTERM; exiting now" in done.stderr


WORKER = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1]])  # a flow run, as a process worker starts it
time.sleep(60)
"""
SHARD = """
import os, time
from gplflow.flows import interrupt
interrupt.end_with_parent(poll_s=0.1)  # what shard_flow does first
print(os.getpid(), flush=True)
time.sleep(60)
"""


def test_a_shard_process_ends_when_its_worker_is_killed() -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER, SHARD], stdout=subprocess.PIPE, text=True)
    shard = None
    try:
        shard = psutil.Process(int(worker.stdout.readline()))  # the shard watches its parent from here on
        assert shard.ppid() == worker.pid
        worker.kill()  # SIGKILL: the worker cannot pass anything on
        worker.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(shard):
            time.sleep(0.1)
        assert not _alive(shard)
    finally:
        worker.kill()
        if shard is not None and _alive(shard):
            shard.kill()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # a zombie has ended; its new parent reaps it
    except psutil.NoSuchProcess:
        return False


DROPPED = """
import signal, sys, time
from gplflow.flows import interrupt
if sys.argv[1] == "prefect":  # inside a flow run Prefect's handler raises its TerminationSignal
    from prefect.exceptions import TerminationSignal

    def prefects(signum, _frame):
        raise TerminationSignal(signal=signum)

    signal.signal(signal.SIGTERM, prefects)
    stopping = interrupt.watchdog_on_stop()
else:
    stopping = interrupt.stop_on_signals()


class Finalized:
    def __del__(self):
        print("finalizing", flush=True)
        time.sleep(10)  # the signal lands here, where Python drops what its handler raises


try:
    with stopping:
        Finalized()
        print("went on", flush=True)
        time.sleep(10)
        print("finished", flush=True)
except BaseException as err:  # Interrupted, or Prefect's TerminationSignal
    print("stopped", getattr(err, "signal", None) or interrupt.signal_of(err), flush=True)
"""


@pytest.mark.parametrize("handler", ["gplflow", "prefect"])
def test_a_stop_dropped_in_a_finalizer_is_sent_again(handler: str) -> None:
    """The clean-clone CI of 15dc16a lost a SIGTERM so: Prefect's handler raised inside a ``regex`` finalizer, and
    the run went on to finish with exit code 0."""
    child = subprocess.Popen([sys.executable, "-c", DROPPED, handler], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "finalizing"
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if child.poll() is None:
            child.kill()
    # the handler's exception ended the finalizer and was dropped; the signal sent again stopped the run
    assert out.split("\n")[:2] == ["went on", f"stopped {int(signal.SIGTERM)}"], (out, err)
    assert "finished" not in out and took < 5.0, (out, err, took)
