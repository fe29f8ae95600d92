"""docker-compose.yml, prefect.yaml and the Dockerfile agree with each other and with the code.

``docker compose config`` cannot run without a Docker engine, so these checks read the files as YAML and text:
the services, the work pool, the API URL, the shared artifact volume, and the deployments' entrypoints and
parameters against the real flows.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from prefect import Flow

from gplflow.flows.config import PipelineConfig
from gplflow.flows.pipeline import default_run_dir

ROOT = Path(__file__).resolve().parent.parent
POOL = "gpu-pool"
# deployment name -> the Prefect flow name its entrypoint must point to
FLOWS = {"gpl-pipeline": "gpl-pipeline", "augmented-sbert-pipeline": "augmented-sbert-pipeline",
         "supervised-pipeline": "supervised-pipeline", "gplflow-compare": "gplflow-compare",
         "gplflow-shard": "gplflow-shard"}
PROJECT_DIR_PLACEHOLDER = "{{ $GPLFLOW_PROJECT_DIR }}"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8"))


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _option(command: list[str], name: str) -> str:
    if name not in command:
        raise AssertionError(f"{name} missing from {command}")
    return command[command.index(name) + 1]


def _deployments(prefect_yaml: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in prefect_yaml["deployments"]}


def _load_flow(entrypoint: str) -> Flow:
    """Import ``flows/x.py:attr`` the way the installed package maps it (``gplflow.flows.x``)."""
    path, attr = entrypoint.split(":")
    assert (ROOT / path).is_file(), f"entrypoint file {path} does not exist"
    folder, stem = Path(path).parent.as_posix(), Path(path).stem
    module = importlib.import_module(f"gplflow.{folder.replace('/', '.')}.{stem}")
    flow = getattr(module, attr)
    assert isinstance(flow, Flow), f"{entrypoint} is not a Prefect flow"
    return flow


def test_compose_has_postgres_server_and_gpu_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "server", "worker"} <= set(services)
    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    data_volume = postgres["volumes"][0].split(":")
    assert data_volume[1] == "/var/lib/postgresql/data" and data_volume[0] in compose["volumes"]

    server = services["server"]
    assert _command(server)[:3] == ["prefect", "server", "start"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    db = urlparse(server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    pg_env = postgres["environment"]
    assert db.scheme == "postgresql+asyncpg"
    assert (db.hostname, db.port) == ("postgres", 5432)
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
    )
    for service in ("SCHEDULER", "LATE_RUNS", "FOREMAN"):
        assert server["environment"][f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] == "true"

    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0"  # the one GPU the container sees


def test_worker_pool_and_api_url_match_server_and_prefect_yaml(
    compose: dict[str, Any], prefect_yaml: dict[str, Any]
) -> None:
    services = compose["services"]
    worker_cmd = _command(services["worker"])
    assert worker_cmd[:3] == ["prefect", "worker", "start"]
    assert _option(worker_cmd, "--pool") == POOL
    assert _option(worker_cmd, "--type") == "process"
    pools = {d["work_pool"]["name"] for d in prefect_yaml["deployments"]}
    assert pools == {POOL}

    server_cmd = _command(services["server"])
    port = _option(server_cmd, "--port")
    assert _option(server_cmd, "--host") == "0.0.0.0"  # reachable from the other containers
    assert f"{port}:{port}" in services["server"]["ports"]
    for name in ("worker", "deploy"):
        assert services[name]["environment"]["PREFECT_API_URL"] == f"http://server:{port}/api"
        assert services[name]["depends_on"]["server"]["condition"] == "service_healthy"
    assert f"localhost:{port}/api/health" in " ".join(services["server"]["healthcheck"]["test"])


def test_workers_share_the_artifact_volume_where_run_dirs_go(
    compose: dict[str, Any], prefect_yaml: dict[str, Any]
) -> None:
    """The default run dir (runs/<name>, relative to the checkout a run starts in) lies on the shared volume."""
    worker = compose["services"]["worker"]
    project_dir = worker["environment"]["GPLFLOW_PROJECT_DIR"]
    mounts = dict(reversed(v.split(":")[:2]) for v in worker["volumes"])  # target -> volume
    run_dir = Path(project_dir) / default_run_dir(PipelineConfig.load(ROOT / "configs" / "demo.yaml"))
    shared = [target for target in mounts if run_dir.is_relative_to(target)]
    assert shared, f"{run_dir} is on none of the worker's volumes {worker['volumes']}"
    assert mounts[shared[0]] in compose["volumes"]  # a named volume, declared at the top level

    pull = prefect_yaml["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": PROJECT_DIR_PLACEHOLDER}}]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^WORKDIR {re.escape(project_dir)}$", dockerfile, re.MULTILINE)
    assert re.search(rf"^COPY \. {re.escape(project_dir)}$", dockerfile, re.MULTILINE)


def test_deploy_service_leaves_the_project_dir_to_the_workers(compose: dict[str, Any]) -> None:
    script = _command(compose["services"]["deploy"])[-1]
    assert script.startswith("unset GPLFLOW_PROJECT_DIR;")
    assert f"prefect work-pool create {POOL} --type process" in script
    assert "prefect --no-prompt deploy --all" in script


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_deployment_entrypoint_is_the_flow(prefect_yaml: dict[str, Any], name: str) -> None:
    deployment = _deployments(prefect_yaml)[name]
    flow = _load_flow(deployment["entrypoint"])
    assert flow.name == FLOWS[name]
    assert deployment["work_pool"]["name"] == POOL


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_deployment_parameters_fit_the_flow_signature(prefect_yaml: dict[str, Any], name: str) -> None:
    deployment = _deployments(prefect_yaml)[name]
    signature = inspect.signature(_load_flow(deployment["entrypoint"]).fn)
    parameters = deployment.get("parameters") or {}
    signature.bind_partial(**parameters)  # raises TypeError on a parameter the flow does not take
    for schedule in deployment.get("schedules") or []:
        signature.bind_partial(**{**parameters, **(schedule.get("parameters") or {})})


def test_shard_deployment_is_the_one_the_pipeline_submits_to(prefect_yaml: dict[str, Any]) -> None:
    """Pool mode calls run_deployment("<flow>/<deployment>") on a pool: the names must be the deployed ones."""
    from gplflow.flows import shards

    deployment = _deployments(prefect_yaml)[shards.DEPLOYMENT]
    assert _load_flow(deployment["entrypoint"]).name == shards.FLOW_NAME
    assert deployment["work_pool"]["name"] == shards.POOL == POOL
    assert shards.DeploymentDispatcher().deployment == f"{shards.FLOW_NAME}/{shards.DEPLOYMENT}"


def test_pipeline_deployment_parameters_make_a_valid_config(prefect_yaml: dict[str, Any]) -> None:
    """A run triggered with the defaults starts: the config path (from the checkout) and overrides load."""
    parameters = _deployments(prefect_yaml)["gpl-pipeline"]["parameters"]
    assert set(parameters) == {"config_path", "overrides"}
    cfg = PipelineConfig.load(ROOT / parameters["config_path"], parameters["overrides"])
    assert cfg.name


def test_pipeline_schedule_is_an_inactive_cron(prefect_yaml: dict[str, Any]) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    schedules = _deployments(prefect_yaml)["gpl-pipeline"]["schedules"]
    assert len(schedules) == 1 and schedules[0]["active"] is False
    CronSchedule(cron=schedules[0]["cron"], timezone=schedules[0].get("timezone"))  # validates the expression
    assert not _deployments(prefect_yaml)["gplflow-shard"].get("schedules")


def test_prefect_yaml_is_valid_for_prefect_deploy(prefect_yaml: dict[str, Any]) -> None:
    """The model ``prefect deploy`` reads prefect.yaml with, and the schedule shape it accepts."""
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig

    model = PrefectYamlModel.model_validate(prefect_yaml)
    assert sorted(d.name for d in model.deployments) == sorted(FLOWS)
    for deployment in prefect_yaml["deployments"]:
        for schedule in deployment.get("schedules") or []:
            RawScheduleConfig.model_validate(schedule)
