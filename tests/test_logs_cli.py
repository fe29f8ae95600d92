"""The terminal's log lines: no "Finished in state Completed()" per task, a cached stage named, and no Prefect
telemetry ERROR for a ``gplflow`` run outside make (the CLI turns the server's analytics off by default)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from gplflow.flows.logs import TerminalFilter


def _record(message: str, name: str = "prefect.task_runs", **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def test_completed_task_lines_stay_off_the_terminal_and_a_cached_stage_is_named() -> None:
    keep = TerminalFilter().filter
    assert not keep(_record("Finished in state Completed()", task_run_name="ingest corpus"))
    assert keep(_record("Finished in state Completed()", name="prefect.flow_runs"))  # the run's own end stays
    cached = _record("Finished in state Cached(type=COMPLETED)", task_run_name="mine hard negatives")
    assert keep(cached)
    assert cached.getMessage().startswith("mine hard negatives: reused (cached)")
    assert keep(_record("corpus: 14 documents (nothing dropped)", task_run_name="ingest corpus"))


def test_the_cli_turns_prefect_server_analytics_off_unless_set() -> None:
    code = ("import gplflow.flows.cli\nfrom prefect.settings import get_current_settings\n"
            "print(get_current_settings().server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert unset.stdout.strip() == "False", unset.stderr
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "true"},
                            capture_output=True, text=True, timeout=60)
    assert chosen.stdout.strip() == "True", chosen.stderr


def test_a_temporary_server_too_slow_to_start_is_one_line_saying_what_to_set(monkeypatch) -> None:
    from gplflow.flows.cli import user_message

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    message = user_message(RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server."))
    assert message is not None and "did not answer within 90 s" in message
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in message and "PREFECT_API_URL" in message
    assert user_message(RuntimeError("something else broke")) is None  # other RuntimeErrors stay bugs


def test_the_cli_waits_longer_than_prefects_20_s_for_its_temporary_server() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    code = ("import gplflow.flows.cli; from prefect.settings import get_current_settings as s; "
            "print(s().server.ephemeral.startup_timeout_seconds)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "90", out.stderr[-2000:]
