"""The worker pool: shards of a shardable stage run as subflow runs of the ``gplflow-shard`` deployment.

With ``execution.mode: pool`` the pipeline, before each shardable stage (generate, mine's corpus encoding,
label), stages the stage's plan in the run directory, starts one ``gplflow-shard`` flow run per pending shard
with ``run_deployment`` and waits for them. Workers (``prefect worker start --pool gpu-pool``, one per GPU)
pick the runs up; each run loads the same config, checks that it computes the plan the pipeline staged, and
stages its shard. The pipeline's own stage task then finds every shard done and publishes the artifact. A
failed shard is submitted again (``execution.shard_retries``); a shard that keeps failing fails the stage
with the shard numbers and the runs' state messages.

The run directory must be storage that every worker sees (a shared path or an fsspec URL). GPU use is
bounded per device by a Prefect global concurrency limit named ``gpu:<host>:<CUDA_VISIBLE_DEVICES>``
(created with one slot when missing; raise it with ``prefect gcl update NAME --limit N``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from prefect import flow, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound

from gplflow.adapters.errors import GplflowError, InputError, MissingInputError
from gplflow.flows.config import ConfigError, ExecutionConfig, PipelineConfig
from gplflow.flows.stages import Run, Stage, shard_stage
from gplflow.tasks.base import ShardJob, StageInputs

logger = logging.getLogger(__name__)

FLOW_NAME = "gplflow-shard"
DEPLOYMENT = "gplflow-shard"  # the per-shard deployment: run_deployment("gplflow-shard/gplflow-shard")
POOL = "gpu-pool"
GPU_SLOTS = 1  # shards per GPU at a time, when the limit does not exist yet

class PoolSetupError(InputError):
    """Pool mode cannot start: no server the workers reach, or no shard deployment on it."""


class PoolRunError(GplflowError, RuntimeError):
    """Pool mode could not finish a stage: shards kept failing on the workers, or the Prefect API stayed away.
    One line naming the shards and their runs (the workers' logs hold the tracebacks); a rerun resumes."""


# --- the worker side --------------------------------------------------------------------------------------

@flow(name=FLOW_NAME, flow_run_name="{stage} shard {shard}", log_prints=True)
def shard_flow(stage: str, run_dir: str, shard: int, config_path: str | None = None,
               overrides: list[str] | None = None) -> dict:
    """Compute one shard of a shardable stage into the run's staging folder; returns its done record."""
    found = shard_stage(stage)
    name = found.name
    cfg = PipelineConfig.load(config_path, overrides or [])
    # the registry derives the inputs from the config and the artifacts the pipeline already published
    try:
        inputs = found.inputs(Run.from_store(cfg, run_dir))
    except KeyError as err:
        raise MissingInputError(f"{run_dir}: no valid {err.args[0]} artifact; the shard's inputs must be published "
                                "(by the pipeline) in the run directory the workers share") from None
    job = found.job(inputs)
    job.check_shard(shard)
    log = get_run_logger()
    _label_flow_run()
    if (record := job.staging.record(shard)) is not None:
        log.info("%s shard %d of %d was already done by %s", name, shard, job.n_shards, _who(record))
        return record
    with concurrency(gpu_limit(), occupy=1, strict=True):
        started = time.perf_counter()
        record = job.run_shard(shard)
    log.info("%s shard %d of %d: %d rows in %.1f s", name, shard, job.n_shards, record["rows"],
             time.perf_counter() - started)
    return record


def gpu_limit() -> str:
    """This device's concurrency limit (created with GPU_SLOTS slots if missing): ``gpu:<host>:<devices>``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    devices = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() or "all"
    name = f"gpu:{socket.gethostname()}:{devices}".replace("/", "_")
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another worker on this host made it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=GPU_SLOTS))
    return name


def _label_flow_run() -> None:
    """Put the worker's name, host and process on the flow-run record (shown in the UI, queryable)."""
    from prefect.client.orchestration import get_client

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    labels = {"gplflow.host": socket.gethostname(), "gplflow.pid": str(os.getpid())}
    if worker := os.environ.get("PREFECT__WORKER_NAME"):
        labels["gplflow.worker"] = worker
    with get_client(sync_client=True) as client:
        client.update_flow_run_labels(ctx.flow_run.id, labels)


def _who(record: dict[str, Any]) -> str:
    return f"{record.get('worker') or 'pid ' + str(record.get('pid'))} on {record.get('host')}"


# --- the pipeline side ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolSource:
    """How a worker loads the pipeline's config: a config file (absolute path) and overrides."""

    config_path: str | None
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: PipelineConfig, config_path: str | Path | None, overrides: list[str] | None) -> PoolSource:
        """The config file and overrides the run was loaded from, checked to give exactly ``cfg``.

        Without them (``run_pipeline`` called with a config object) the whole config goes as overrides.
        """
        if config_path is None and not overrides:
            return cls(None, [f"{key}={json.dumps(value)}" for key, value in cfg.to_dict().items()])
        path = str(Path(config_path).resolve()) if config_path is not None else None
        source = cls(path, list(overrides or []))
        if PipelineConfig.load(source.config_path, source.overrides) != cfg:
            raise ConfigError(f"execution.mode=pool: {config_path or '--set'} with overrides {overrides} does not "
                              "give the config this run uses, so the workers would compute other shards")
        return source


@dataclass
class Attempt:
    shard: int
    run_id: UUID
    run_name: str
    state: str = "SCHEDULED"
    message: str = ""
    worker: str = ""  # the worker that took the run (its prefect.worker.name label) and its host
    setup_error: str = ""  # the run crashed before it started: the worker could not even load the shard flow


PROJECT_DIR_VAR = "GPLFLOW_PROJECT_DIR"
_LOAD_FAILED = "trying to load flow"  # what Prefect's engine logs when a flow run cannot load its entrypoint


def load_failure(messages: list[str]) -> str:
    """The exception line of a flow run's "could not load the flow" log record, or "" when it has none."""
    for message in messages:
        if _LOAD_FAILED in message:
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            return lines[-1] if len(lines) > 1 else message.strip()
    return ""


def setup_error_message(stage: str, attempt: Attempt) -> str:
    """One line for a worker that cannot load the shard flow: a setup error, the same on every retry."""
    return (f"{stage}: worker {attempt.worker or '(unknown)'} could not load the shard flow "
            f"({attempt.setup_error}); set {PROJECT_DIR_VAR} in that worker's environment to its gplflow "
            f"checkout (prefect.yaml's pull step starts every flow run there) and restart it; not retried")


def transient(err: BaseException) -> bool:
    """An API error a later try can get past: a timeout, a dropped or refused connection, a 5xx or a 429."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(err, httpx.TransportError):  # timeouts, connect/read errors, a server that went away
        return True
    status = getattr(getattr(err, "response", None), "status_code", 0)
    return isinstance(err, PrefectHTTPStatusError | httpx.HTTPStatusError) and (status >= 500 or status == 429)


class DeploymentDispatcher:
    """Submits shard runs of the ``gplflow-shard`` deployment and waits for them (polling the API).

    Every API call survives a server that is slow, paused or restarting for up to ``api_patience_s`` seconds:
    it is tried again with a growing pause (``poll_s`` doubling up to ``MAX_BACKOFF_S``); the shards keep
    running on the workers meanwhile. A submission retried after a timeout reuses its idempotency key, so the
    server never holds two runs of one shard attempt.
    """

    MAX_BACKOFF_S = 30.0

    def __init__(self, deployment: str = f"{FLOW_NAME}/{DEPLOYMENT}", timeout_s: float | None = None,
                 poll_s: float = 1.0, api_patience_s: float = 600.0):
        self.deployment, self.timeout_s, self.poll_s = deployment, timeout_s, poll_s
        self.api_patience_s = api_patience_s

    def _api(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``, tried again on transient API errors until ``api_patience_s`` have passed."""
        first_failure, pause = None, self.poll_s
        while True:
            try:
                result = call()
            except Exception as err:
                if not transient(err):
                    raise
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.api_patience_s:
                    raise PoolRunError(f"the Prefect API did not answer {what} for {now - first_failure:.0f} s "
                                       f"({type(err).__name__}: {err}); the shards on the workers may still finish: "
                                       "rerun the pipeline to publish them") from err
                _logger().warning("Prefect API: %s failed (%s: %s); trying again in %.0f s", what,
                                  type(err).__name__, err, pause)
                time.sleep(pause)
                pause = min(2 * pause, self.MAX_BACKOFF_S)
                continue
            if first_failure is not None:
                _logger().info("Prefect API: %s answered again after %.0f s", what, time.monotonic() - first_failure)
            return result

    def check(self) -> None:
        """A clear error when there is no API server or no deployment to submit to."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise PoolSetupError("execution.mode=pool needs a Prefect server that the workers reach: set "
                               "PREFECT_API_URL (for example http://127.0.0.1:4200/api); the temporary local API "
                               "of a run without one is invisible to workers")
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name(self.deployment)
            except ObjectNotFound:
                raise PoolSetupError(f"execution.mode=pool: deployment {self.deployment!r} not found on "
                                   f"{PREFECT_API_URL.value()}; deploy it (prefect deploy --name {DEPLOYMENT}) "
                                   f"and start workers (prefect worker start --pool {POOL})") from None

    def submit(self, shard: int, parameters: dict[str, Any]) -> Attempt:
        from prefect.deployments import run_deployment

        name = f"{parameters['stage']} shard {shard}"
        key = f"gplflow-{uuid4()}"  # one per submission: a retry after a timeout cannot make a second run
        run = self._api(f"submit {name}", lambda: run_deployment(self.deployment, parameters=parameters, timeout=0,
                                                                 flow_run_name=name, idempotency_key=key))
        return Attempt(shard, run.id, name)

    def wait(self, attempts: list[Attempt]) -> None:
        """Poll until every run is final (or past ``timeout_s``, then cancelled); fills state and message."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.states import Cancelling

        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        by_id = {a.run_id: a for a in attempts}
        open_ids = set(by_id)
        with get_client(sync_client=True) as client:
            while open_ids:
                runs = self._api("read the shard runs", lambda: client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(open_ids)))))
                for run in runs:
                    attempt = by_id[run.id]
                    attempt.state = run.state.type.value if run.state else "UNKNOWN"
                    attempt.message = (run.state.message or "") if run.state else ""
                    attempt.worker = _worker(run)
                    if run.state is not None and run.state.is_final():
                        open_ids.discard(run.id)
                        if attempt.state == "CRASHED" and run.start_time is None:  # it never ran a line
                            attempt.setup_error = self._load_failure(client, run.id)
                if any(a.setup_error for a in attempts):  # every other run on that worker would crash alike
                    for run_id in open_ids:
                        self._api("cancel a shard run", lambda r=run_id: client.set_flow_run_state(
                            r, Cancelling(), force=True))
                    return
                if open_ids and deadline is not None and time.monotonic() > deadline:
                    for run_id in open_ids:
                        self._api("cancel a shard run", lambda r=run_id: client.set_flow_run_state(
                            r, Cancelling(), force=True))
                        by_id[run_id].state = "TIMED_OUT"
                        by_id[run_id].message = f"no result within execution.shard_timeout_s={self.timeout_s}"
                    return
                if open_ids:
                    time.sleep(self.poll_s)


    def _load_failure(self, client: Any, run_id: UUID, tries: int = 3) -> str:
        """The load error the crashed run logged (logs may trail the state by a moment: a few tries)."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        for attempt in range(tries):
            logs = self._api("read a crashed run's logs", lambda: client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))
            if found := load_failure([log.message for log in logs]):
                return found
            if attempt + 1 < tries:
                time.sleep(self.poll_s)
        return ""


def _worker(run: Any) -> str:
    """``NAME on HOST`` of the worker that took a flow run, from its labels and infrastructure pid."""
    name = (getattr(run, "labels", None) or {}).get("prefect.worker.name", "")
    host = str(getattr(run, "infrastructure_pid", None) or "").rsplit(":", 1)[0]
    return f"{name} on {host}" if name and host else name or host


def fan_out(cfg: PipelineConfig, stage: Stage, inputs: StageInputs, source: PoolSource | None,
            dispatcher: DeploymentDispatcher | None = None) -> None:
    """In pool mode, compute the stage's pending shards on the worker pool (a no-op in local mode).

    ``inputs`` are the stage task's; the task, called afterwards, publishes the staged shards.
    """
    if cfg.execution.mode != "pool" or source is None or stage.job is None:
        return
    job = stage.job(inputs)
    if job.store.load(job.stage, expect_fingerprint=job.fingerprint) is not None:
        return
    pending = job.prepare()
    if not pending:
        return
    dispatcher = dispatcher or DeploymentDispatcher(timeout_s=cfg.execution.shard_timeout_s)
    dispatcher.check()
    parameters = {"stage": stage.name, "run_dir": _shared(inputs.run_dir), "config_path": source.config_path,
                  "overrides": source.overrides}
    run_shards(job, pending, dispatcher, parameters, cfg.execution)


def run_shards(job: ShardJob, pending: list[int], dispatcher: Any, parameters: dict[str, Any],
               execution: ExecutionConfig) -> None:
    """Submit every pending shard, wait, resubmit the failed ones; raise if some still fail at the end."""
    log = _logger()
    failed: dict[int, Attempt] = {}
    for attempt_no in range(1 + execution.shard_retries):
        log.info("%s: %d of %d shards on pool %s (attempt %d)", job.stage, len(pending), job.n_shards, POOL,
                 attempt_no + 1)
        attempts = [dispatcher.submit(k, {**parameters, "shard": k}) for k in pending]
        dispatcher.wait(attempts)
        if setup := next((a for a in attempts if a.setup_error), None):
            raise PoolSetupError(setup_error_message(job.stage, setup))
        failed = {}
        for attempt in attempts:
            if job.staging.record(attempt.shard) is None:
                if attempt.state == "COMPLETED":
                    attempt.message = (f"the run completed but left no completion record in {job.staging.url}; "
                                       "do the workers see the same run directory?")
                failed[attempt.shard] = attempt
        if not failed:
            return
        log.warning("%s: shards %s failed: %s", job.stage, sorted(failed), _describe(failed))
        pending = sorted(failed)
    raise PoolRunError(f"{job.stage}: shards {sorted(failed)} failed {1 + execution.shard_retries} times on "
                       f"pool {POOL}: {_describe(failed)}")


def _describe(failed: dict[int, Attempt]) -> str:
    return "; ".join(f"shard {k} ({a.run_name}, run {a.run_id}): {a.state} {a.message}".strip()
                     for k, a in sorted(failed.items()))


def _shared(run_dir: str) -> str:
    """A run directory the workers can open: a URL as it is, a local path made absolute."""
    return run_dir if "://" in str(run_dir) else str(Path(run_dir).resolve())


def _logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow run (unit tests of the dispatch logic)
        return logger
