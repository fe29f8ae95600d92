"""The run directory lock: one holder at a time, stale locks taken over, released on success and on error."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gplflow.adapters import runlock
from gplflow.adapters.runlock import LOCK, RunLockedError, run_lock
from gplflow.flows import pipeline
from gplflow.flows.config import PipelineConfig

# Only the tests that race processes or wait out a lease of under a second are timing-sensitive: those are marked
# serial (`make test` runs them alone, not beside a busy worker); the rest run on the two workers.


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                "token": "other", **holder}))
    return path


def test_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with run_lock(str(tmp_path / "run")):
        held = json.loads((tmp_path / "run" / LOCK).read_text())
        assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunLockedError) as err, run_lock(str(tmp_path / "run")):
            pass
    message = str(err.value)
    assert "\n" not in message
    assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message
    assert "started 20" in message and str(tmp_path / "run" / LOCK) in message
    assert not (tmp_path / "run" / LOCK).exists()  # the first holder released it


def test_released_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(KeyError), run_lock(str(tmp_path / "run")):
        raise KeyError("boom")
    assert list((tmp_path / "run").iterdir()) == []
    with run_lock(str(tmp_path / "run")):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid = _dead_pid()
    _write_lock(tmp_path / "run", pid=pid)
    with caplog.at_level(logging.WARNING, logger="gplflow.adapters.runlock"), run_lock(str(tmp_path / "run")):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over a stale lock" in caplog.text and f"pid {pid} is not running" in caplog.text
    assert list((tmp_path / "run").iterdir()) == []


def test_the_lock_says_what_holds_it_and_a_take_over_hands_on_the_dead_holder(tmp_path: Path) -> None:
    with run_lock(str(tmp_path / "run"), {"flow_run_id": "f-1"}) as stale:
        assert stale is None  # the directory was free
        assert json.loads((tmp_path / "run" / LOCK).read_text())["flow_run_id"] == "f-1"
    pid = _dead_pid()
    _write_lock(tmp_path / "run", pid=pid, flow_run_id="f-dead")
    with run_lock(str(tmp_path / "run"), {"flow_run_id": "f-2"}) as stale:
        assert stale is not None and (stale["pid"], stale["flow_run_id"]) == (pid, "f-dead")
        assert json.loads((tmp_path / "run" / LOCK).read_text())["flow_run_id"] == "f-2"


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    _write_lock(tmp_path / "run", pid=os.getpid(), started=time.time() - 30 * 86400)  # before we started
    with run_lock(str(tmp_path / "run")):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["token"] != "other"


@pytest.mark.parametrize("holder", [{"host": "elsewhere.example", "pid": 1}, {}], ids=["other-host", "live-pid"])
def test_a_holder_that_may_be_alive_keeps_the_lock(tmp_path: Path, holder: dict) -> None:
    path = _write_lock(tmp_path / "run", **holder)
    before = path.read_text()
    with pytest.raises(RunLockedError, match="another run holds this run directory"), \
            run_lock(str(tmp_path / "run")):
        pass
    assert path.read_text() == before  # not removed by the refused run


def test_an_unreadable_lock_is_kept_while_fresh_and_taken_over_when_old(tmp_path: Path) -> None:
    path = tmp_path / "run" / LOCK
    path.parent.mkdir()
    path.write_text("")
    with pytest.raises(RunLockedError, match="unreadable lock file"), run_lock(str(tmp_path / "run")):
        pass
    old = time.time() - 3600
    os.utime(path, (old, old))
    with run_lock(str(tmp_path / "run")):
        assert json.loads(path.read_text())["pid"] == os.getpid()


_RACER = """
import sys, time
from pathlib import Path
from gplflow.adapters.runlock import RunLockedError, run_lock

ready, racers = Path(sys.argv[2]), int(sys.argv[3])
(ready / sys.argv[4]).touch()
while len(list(ready.iterdir())) < racers:  # every racer started: a slow start cannot come after the winner's end
    time.sleep(0.001)
try:
    with run_lock(sys.argv[1]):
        print("won", flush=True)
        time.sleep(1.5)
except RunLockedError:
    print("refused", flush=True)
"""


@pytest.mark.serial
def test_racing_runs_have_one_winner(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path / "run"), str(ready), "4", str(k)],
                              stdout=subprocess.PIPE, text=True) for k in range(4)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert not (tmp_path / "run" / LOCK).exists()


def test_the_pipeline_runs_its_stages_under_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def stages(cfg, run_dir, config_path, overrides, reuse_from=()):
        seen.append(json.loads((Path(run_dir) / LOCK).read_text())["pid"])
        raise RuntimeError("a stage failed")

    monkeypatch.setattr(pipeline, "_run_stages", stages)
    (tmp_path / "docs.jsonl").write_text('{"_id": "a", "text": "bees"}\n')
    cfg = PipelineConfig.from_dict({"profile": "tiny", "corpus": {"path": str(tmp_path / "docs.jsonl")}})
    with pytest.raises(RuntimeError, match="a stage failed"):
        pipeline.run_pipeline(cfg, str(tmp_path / "run"))
    assert seen == [os.getpid()]
    assert not (tmp_path / "run" / LOCK).exists()


# --- run directories on fsspec URLs: a lease the live run renews ---------------------------------------------

@pytest.fixture
def short_lease(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(runlock, "LEASE_S", 0.9)
    monkeypatch.setattr(runlock, "SETTLE_S", 0.05)
    return 0.9


def _lease_file(url: str) -> dict:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    with fs.open(f"{root}/{runlock.LOCK}", "rb") as fh:
        return json.loads(fh.read())


@pytest.mark.serial
def test_a_url_run_directory_is_leased_renewed_and_released(short_lease: float) -> None:
    url = f"memory://leases/{uuid.uuid4().hex}"
    with runlock.run_lock(url):
        first = _lease_file(url)
        assert first["pid"] == os.getpid() and first["expires"] > time.time()
        locked = rf"{url}: another run holds this run directory \(host"
        with pytest.raises(runlock.RunLockedError, match=locked), runlock.run_lock(url):
            pass
        with pytest.raises(runlock.RunLockedError):
            runlock.check_free(url)
        time.sleep(short_lease * 1.5)  # longer than the lease: only renewal keeps it
        renewed = _lease_file(url)
        assert renewed["token"] == first["token"] and renewed["expires"] > first["expires"]
        with pytest.raises(runlock.RunLockedError):
            runlock.check_free(url)
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(f"{root}/{runlock.LOCK}")  # released
    runlock.check_free(url)


@pytest.mark.serial
def test_an_expired_lease_of_a_dead_run_is_taken_over(short_lease: float, caplog: pytest.LogCaptureFixture) -> None:
    import fsspec

    url = f"memory://leases/{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(url)
    dead = {"host": "gone-host", "pid": 4242, "started": time.time() - 600, "token": "dead",
            "renewed": time.time() - 300, "expires": time.time() - 1}
    with fs.open(f"{root}/{runlock.LOCK}", "wb") as fh:
        fh.write(json.dumps(dead).encode())
    with caplog.at_level(logging.WARNING, logger="gplflow.adapters.runlock"), \
            runlock.run_lock(url, {"flow_run_id": "f-2"}) as stale:
        assert _lease_file(url)["pid"] == os.getpid() and _lease_file(url)["flow_run_id"] == "f-2"
        assert stale is not None and stale["token"] == "dead"
    assert any("taking over an expired lease (host gone-host, pid 4242" in r.getMessage() for r in caplog.records)


# --- the flow run of a run that died holding the lock ---------------------------------------------------------

@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def test_the_flow_run_of_a_run_that_died_is_marked_crashed(prefect_api, caplog: pytest.LogCaptureFixture) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    @flow(name="gplflow-lock-probe")
    def probe() -> None:
        """Never run: its flow runs stand in for the runs that died."""

    with get_client(sync_client=True) as client:
        died, ended = (client.create_flow_run(probe, name=name) for name in ("died", "ended"))
        client.set_flow_run_state(died.id, Running(), force=True)
        client.set_flow_run_state(ended.id, Completed(), force=True)
        with caplog.at_level(logging.WARNING, logger="gplflow.flows.pipeline"):
            for run in (died, ended):
                pipeline.crash_abandoned({"flow_run_id": str(run.id), "host": "h", "pid": 4242}, "runs/x")
            pipeline.crash_abandoned({"flow_run_id": str(uuid.uuid4()), "host": "h", "pid": 1}, "runs/x")  # unknown
            pipeline.crash_abandoned({"host": "h", "pid": 1}, "runs/x")  # a lock that named no flow run
        states = {run.name: client.read_flow_run(run.id).state for run in (died, ended)}
    assert states["died"].type.value == "CRASHED" and "pid 4242" in states["died"].message
    assert states["ended"].type.value == "COMPLETED"  # a final state is left alone
    assert [r.getMessage() for r in caplog.records] == [
        f"flow run {died.id} was left Running by a run that died in runs/x; marked Crashed"]
