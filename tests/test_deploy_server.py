"""The docker-compose topology without Docker: a real Prefect server on loopback (on SQLite, and on PostgreSQL
where it is installed), prefect.yaml deployed to it with the compose file's own deploy script, and a process
worker that starts a run in the project checkout.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect_server import PrefectServer, ProcessGroup, prefect_server_fixture

# Not marked serial: nothing here is timed closer than minutes (the server's health, the deploy script, a worker's
# run), so the module runs beside the other test worker.
pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
POOL = "gpu-pool"
DEPLOY_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 240.0

server = prefect_server_fixture(databases=("sqlite", "postgresql"))


def _yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


def _env(server: PrefectServer, **extra: str) -> dict[str, str]:
    """Client environment with this interpreter's ``prefect`` first on PATH, as in the image."""
    env = server.client_env(**extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="module")
def client(server: PrefectServer) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as prefect_client:
        yield prefect_client


@pytest.fixture(scope="module")
def deployed(server: PrefectServer) -> str:
    """Run docker-compose.yml's `deploy` script from the repository root; returns its output."""
    script = _yaml("docker-compose.yml")["services"]["deploy"]["command"][-1]
    env = _env(server)
    env.pop("GPLFLOW_PROJECT_DIR", None)
    group = ProcessGroup.start(["sh", "-c", script], env, server.home / "logs" / "deploy.log", cwd=ROOT)
    try:
        code = group.wait(DEPLOY_TIMEOUT_S)
    finally:
        group.stop(grace=2.0)
    output = group.tail(20_000)
    assert code == 0, output
    return output


def test_prefect_yaml_deploys_both_deployments(deployed: str, client: Any) -> None:
    assert "Deployment 'gpl-pipeline/gpl-pipeline' successfully created" in deployed
    assert "Deployment 'gplflow-shard/gplflow-shard' successfully created" in deployed
    pool = client.read_work_pool(POOL)
    assert pool.type == "process"

    spec = _yaml("prefect.yaml")
    for entry in spec["deployments"]:
        name = entry["name"]
        deployment = client.read_deployment_by_name(f"{name}/{name}")
        assert client.read_flow(deployment.flow_id).name == name
        assert deployment.work_pool_name == POOL
        assert deployment.entrypoint == entry["entrypoint"]
        assert deployment.parameters == entry["parameters"]
        assert deployment.pull_steps == spec["pull"]  # the placeholder is kept for the workers to resolve
        assert set(entry["tags"]) <= set(deployment.tags)


def test_pipeline_deployment_schedule_and_parameter_schema(deployed: str, client: Any) -> None:
    pipeline = client.read_deployment_by_name("gpl-pipeline/gpl-pipeline")
    [schedule] = pipeline.schedules
    assert schedule.active is False
    assert schedule.schedule.cron == "0 2 * * *"
    assert schedule.slug == "nightly"
    assert set(pipeline.parameter_openapi_schema["properties"]) == {"config_path", "overrides", "run_dir"}

    shard = client.read_deployment_by_name("gplflow-shard/gplflow-shard")
    assert not shard.schedules
    schema = shard.parameter_openapi_schema
    assert {"stage", "run_dir", "shard"} <= set(schema["required"])
    assert {"config_path", "overrides"} <= set(schema["properties"])


def test_worker_starts_a_run_in_the_project_checkout(
    deployed: str, client: Any, server: PrefectServer, tmp_path: Path
) -> None:
    """A run triggered as the README shows is taken by a process worker started elsewhere and runs in
    GPLFLOW_PROJECT_DIR: the relative config path is found there and the overrides reach the flow, whose
    config check then rejects the bad value (so the test needs no models)."""
    from prefect.client.schemas.filters import WorkerFilter

    code, output = server.run(
        "deployment",
        "run",
        "gpl-pipeline/gpl-pipeline",
        "--param",
        "config_path=configs/demo.yaml",
        "--param",
        'overrides=["train.steps=not-a-number"]',
        env=_env(server),
    )
    assert code == 0, output
    flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))
    assert client.read_flow_run(flow_run_id).parameters == {
        "config_path": "configs/demo.yaml",
        "overrides": ["train.steps=not-a-number"],
    }
    worker = ProcessGroup.start(
        ["prefect", "worker", "start", "--pool", POOL, "--type", "process", "--name", "test-gpu-0"],
        _env(server, GPLFLOW_PROJECT_DIR=str(ROOT), CUDA_VISIBLE_DEVICES=""),
        tmp_path / "worker.log",
        cwd=tmp_path,
    )
    try:
        state = _wait_final(client, flow_run_id, worker)
        workers = client.read_workers_for_work_pool(POOL, worker_filter=WorkerFilter(name={"any_": ["test-gpu-0"]}))
    finally:
        worker.stop()
    assert state.is_failed(), f"{state.type}: {state.message}\n{worker.tail()}"
    assert "--set train.steps=not-a-number: 'train.steps': got 'not-a-number'" in state.message, worker.tail()
    assert [w.name for w in workers] == ["test-gpu-0"]


def test_readme_commands_activate_the_nightly_schedule(deployed: str, client: Any, server: PrefectServer) -> None:
    code, output = server.run("deployment", "schedule", "ls", "gpl-pipeline/gpl-pipeline", "-o", "json")
    assert code == 0, output
    [listed] = json.loads(output[output.index("[") :])
    assert listed["active"] is False
    code, output = server.run("deployment", "schedule", "resume", "gpl-pipeline/gpl-pipeline", listed["id"])
    assert code == 0, output
    [schedule] = client.read_deployment_by_name("gpl-pipeline/gpl-pipeline").schedules
    assert schedule.active is True and schedule.schedule.cron == "0 2 * * *"


def _wait_final(client: Any, flow_run_id: Any, worker: ProcessGroup) -> Any:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        if not worker.running():
            raise AssertionError(f"worker exited with {worker.proc.returncode}\n{worker.tail()}")
        time.sleep(1.0)
    raise AssertionError(f"flow run not finished after {RUN_TIMEOUT_S:.0f} s\n{worker.tail()}")
