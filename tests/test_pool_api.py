"""Pool mode and a Prefect API that stops answering for a while.

A real ``prefect server start`` on loopback is paused (SIGSTOP to its process group) for longer than the client's
request timeout while the dispatcher waits for two shard runs; the wait must ride it out and return the runs'
final states once the server is continued, not die of the first ``httpx.ReadTimeout``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time

import pytest
from prefect import flow
from prefect_server import PrefectServer, prefect_server_fixture

from gplflow.flows import shards

server = prefect_server_fixture()
REQUEST_TIMEOUT_S = 2
PAUSE_S = 6  # three times the request timeout

pytestmark = [pytest.mark.slow, pytest.mark.serial]


@flow(name="gplflow-api-pause-probe")
def probe() -> None:
    """Never run: its flow runs stand in for shard runs whose states the test sets."""


@pytest.mark.timeout(180)
def test_waiting_for_shards_rides_out_a_paused_server(server: PrefectServer, caplog):
    from prefect.client.orchestration import get_client
    from prefect.settings import (
        PREFECT_API_REQUEST_TIMEOUT,
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )
    from prefect.states import Completed

    # Setting up and finishing the runs use the client's usual timeout and retries: a loaded machine may answer
    # those slowly or with a 503, and they are not what is tested. Only the dispatcher's wait runs with a short
    # request timeout and no retries inside Prefect's client, so that its own retries are what rides out the pause.
    patient = {PREFECT_API_URL: server.api_url}
    strict = {**patient, PREFECT_API_REQUEST_TIMEOUT: REQUEST_TIMEOUT_S, PREFECT_CLIENT_MAX_RETRIES: 0}
    with temporary_settings(patient):
        with get_client(sync_client=True) as client:
            runs = [client.create_flow_run(probe, name=f"generate shard {k}") for k in range(2)]
        attempts = [shards.Attempt(k, run.id, run.name) for k, run in enumerate(runs)]
        group = server.process.proc.pid
        stopped_for: list[float] = []
        finished: list[str] = []

        def pause_then_finish() -> None:
            time.sleep(1.0)  # the dispatcher is polling by now
            os.killpg(group, signal.SIGSTOP)
            started = time.monotonic()
            try:
                time.sleep(PAUSE_S)
            finally:
                os.killpg(group, signal.SIGCONT)
                stopped_for.append(time.monotonic() - started)
            with get_client(sync_client=True) as other:
                for run in runs:
                    other.set_flow_run_state(run.id, Completed(), force=True)
                    finished.append(run.name)

        helper = threading.Thread(target=contextvars.copy_context().run, args=(pause_then_finish,), daemon=True)
    helper.start()
    with temporary_settings(strict), caplog.at_level(logging.WARNING, logger="gplflow.flows.shards"):
        shards.DeploymentDispatcher(poll_s=0.25, api_patience_s=60).wait(attempts)
    helper.join(timeout=60)

    assert finished == [run.name for run in runs], "the helper could not mark the runs completed"
    assert stopped_for and stopped_for[0] >= PAUSE_S
    assert [a.state for a in attempts] == ["COMPLETED", "COMPLETED"]
    retried = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert retried, "the server's pause never reached the dispatcher: the test did not test anything"
    assert all("read the shard runs" in message for message in retried)


def test_an_api_outage_longer_than_the_patience_fails_with_a_message(monkeypatch):
    import httpx

    calls = []

    def always_times_out() -> None:
        calls.append(time.monotonic())
        raise httpx.ReadTimeout("timed out")

    dispatcher = shards.DeploymentDispatcher(poll_s=0.01, api_patience_s=0.2)
    with pytest.raises(RuntimeError, match=r"did not answer read the shard runs .* rerun the pipeline"):
        dispatcher._api("read the shard runs", always_times_out)
    assert len(calls) >= 3  # tried again with backoff before giving up


def test_a_non_transient_api_error_is_not_retried():
    calls = []

    def bad_request() -> None:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        shards.DeploymentDispatcher(poll_s=0.01)._api("x", bad_request)
    assert calls == [1]
