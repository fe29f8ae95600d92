"""The worker pool: shards of a shardable stage run as subflow runs of the ``gplflow-shard`` deployment.

With ``execution.mode: pool`` the pipeline, before each shardable stage (generate, mine's corpus encoding,
label), stages the stage's plan in the run directory and starts ``gplflow-shard`` flow runs (``run_deployment``)
for the pending shards, at most as many at once as the pool computes at once (``execution.max_in_flight``: the
pool's online workers, or a number), submitting the next as one finishes. Workers (``prefect worker start --pool
gpu-pool``, one per GPU) pick the runs up; each run waits for its device, then loads the same config, checks that
it computes the plan the pipeline staged, and stages its shard. The pipeline's own stage task then finds every
shard done and publishes the artifact. A failed shard is submitted again (``execution.shard_retries``); a shard
that keeps failing fails the stage with the shard numbers and the runs' state messages. A pipeline that stops
(an error, Ctrl-C, SIGTERM, its flow run cancelled) cancels the shard runs it has in flight.

The run directory must be storage that every worker sees (a shared path or an fsspec URL). GPU use is
bounded per device by Prefect global concurrency limits named ``gpu:<host>:<device>`` (one per entry of
``CUDA_VISIBLE_DEVICES``; created with one slot when missing; raise one with ``prefect gcl update NAME --limit
N``): a shard takes its device's, a training in pool mode takes those of every device it trains on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
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
from gplflow.flows.interrupt import end_with_parent
from gplflow.flows.stages import Run, Stage, shard_stage
from gplflow.tasks.base import ShardJob, StageInputs, job_from_payload, job_payload

logger = logging.getLogger(__name__)

FLOW_NAME = "gplflow-shard"
DEPLOYMENT = "gplflow-shard"  # the per-shard deployment: run_deployment("gplflow-shard/gplflow-shard")
POOL = "gpu-pool"
GPU_SLOTS = 1  # shards per GPU at a time, when the limit does not exist yet
# the stages that train, and the setting of how many devices each trains on ('auto': every visible GPU)
TRAINING_DEVICES = {"pretrain": "pretrain.devices", "cross-encoder": "augment.cross_encoder.devices",
                    "train": "train.devices", "train-pairs": "train.devices", "train-gold-silver": "train.devices"}

class PoolSetupError(InputError):
    """Pool mode cannot start: no server the workers reach, or no shard deployment on it."""


class PoolRunError(GplflowError, RuntimeError):
    """Pool mode could not finish a stage: shards kept failing on the workers, or the Prefect API stayed away.
    One line naming the shards and their runs (the workers' logs hold the tracebacks); a rerun resumes."""


# --- the worker side --------------------------------------------------------------------------------------

@flow(name=FLOW_NAME, flow_run_name="{stage} shard {shard}", log_prints=True)
def shard_flow(stage: str, run_dir: str, shard: int, config_path: str | None = None,
               overrides: list[str] | None = None, job: dict[str, Any] | None = None) -> dict:
    """Compute one shard of a shardable stage into the run's staging folder; returns its done record.

    ``job`` (``tasks.base.job_payload``): the shard job itself, for work a stage cuts into shards while it runs (a
    re-mining round's encoding and labelling, named by their artifact: ``triples-round-2``); the worker then
    rebuilds it from those inputs rather than from the config (``config_path`` and ``overrides`` are not read)."""
    # A killed worker leaves its flow-run processes running, Running on the server: a shard would hold its device
    # slot and memory for good. So a shard run is marked Crashed and ends when its worker dies (the pipeline
    # submits it again). Only shard runs: a worker always starts them, while a pipeline run may be meant to
    # outlive the shell that started it.
    end_with_parent()
    if job is not None:
        name, make = stage, lambda: job_from_payload(job)
    else:
        found = shard_stage(stage)
        name, make = found.name, _from_registry(found, PipelineConfig.load(config_path, overrides or []), run_dir)
    log = get_run_logger()
    _label_flow_run()
    # The device first: a run waiting for its GPU holds no model (resolving the inputs builds or loads them).
    waited = time.perf_counter()
    with device_slot(shard) as device:
        log.info("%s shard %d: device %s after %.1f s", name, shard, device, time.perf_counter() - waited)
        work = make()
        work.check_shard(shard)
        if (record := work.staging.record(shard)) is not None:
            log.info("%s shard %d of %d was already done by %s", name, shard, work.n_shards, _who(record))
            return record
        started = time.perf_counter()
        record = work.run_shard(shard)
    log.info("%s shard %d of %d: %d rows in %.1f s", name, shard, work.n_shards, record["rows"],
             time.perf_counter() - started)
    return record


def _from_registry(found: Stage, cfg: PipelineConfig, run_dir: str) -> Callable[[], ShardJob]:
    """The stage's shard job as the registry derives its inputs, from the config and the artifacts the pipeline
    already published in the run directory."""
    def make() -> ShardJob:
        try:
            inputs = found.inputs(Run.from_store(cfg, run_dir))
        except KeyError as err:
            raise MissingInputError(f"{run_dir}: no valid {err.args[0]} artifact; the shard's inputs must be "
                                    "published (by the pipeline) in the run directory the workers share") from None
        return found.job(inputs)  # type: ignore[misc]

    return make


def visible_devices() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (``["0", "1"]``); unset, every GPU
    of the host by index; ``["all"]`` on a host without one (a CPU stands in for one device)."""
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    if pinned is not None:
        return [d.strip() for d in pinned.split(",") if d.strip()] or ["all"]
    gpus = Path("/proc/driver/nvidia/gpus")  # the driver's list: counted without importing torch
    count = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    return [str(i) for i in range(count)] or ["all"]


def limit_name(device: str) -> str:
    return f"gpu:{socket.gethostname()}:{device}".replace("/", "_")


def device_limits(devices: list[str]) -> list[str]:
    """The concurrency limits of these devices of this host, each created with GPU_SLOTS slots if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    names = [limit_name(d) for d in devices]
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):  # another worker on this host made it first
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=GPU_SLOTS))
    return names


def gpu_limit(device: str | None = None) -> str:
    """A device's concurrency limit (default: this process's one device), created if missing: ``gpu:<host>:<d>``."""
    return device_limits([device or visible_devices()[0]])[0]


@contextlib.contextmanager
def device_slot(shard: int) -> Iterator[str]:
    """Hold the concurrency slot of the device shard ``shard`` computes on, for the block; yields the device.

    A worker that sees one GPU (the layout for shards) uses it. One that sees several puts shard k on the
    k-th modulo their number and pins this process to it (``CUDA_VISIBLE_DEVICES``, set before CUDA starts).
    """
    devices = visible_devices()
    device = devices[shard % len(devices)]
    name = gpu_limit() if len(devices) == 1 else gpu_limit(device)
    with concurrency(name, occupy=1, strict=True):
        if len(devices) == 1:
            yield device
            return
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        try:
            yield device
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before


@contextlib.contextmanager
def devices_held(cfg: PipelineConfig, stage: Stage) -> Iterator[list[str]]:
    """In pool mode, a training stage holds the limits of every device it trains on, so that no shard of this
    or another run lands on them meanwhile; yields the limits' names (none in local mode and for other stages)."""
    if cfg.execution.mode != "pool" or stage.name not in TRAINING_DEVICES:
        yield []
        return
    visible = visible_devices()
    try:
        setting = cfg.value(TRAINING_DEVICES[stage.name])
    except AttributeError:  # a stage that trains on one device
        setting = 1
    names = device_limits(visible if setting == "auto" else visible[:int(setting)])
    _logger().info("%s: waiting for the device slots %s", stage.name, ", ".join(names))
    hold = contextlib.ExitStack()
    hold.enter_context(concurrency(names, occupy=1, strict=True))
    token = _held.set((names, hold))
    try:
        yield names
    finally:
        _held.reset(token)
        hold.close()


_held: ContextVar[tuple[list[str], contextlib.ExitStack] | None] = ContextVar("gplflow_devices_held", default=None)


@contextlib.contextmanager
def devices_released() -> Iterator[None]:
    """Inside ``devices_held``: give the training's device slots back for the block, then wait for them again, so
    that shards the training fans out (a re-mining round's) can run on its devices; elsewhere a no-op."""
    found = _held.get()
    if found is None:
        yield
        return
    names, hold = found
    hold.close()
    try:
        yield
    finally:
        _logger().info("waiting for the device slots %s again", ", ".join(names))
        hold.enter_context(concurrency(names, occupy=1, strict=True))


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
    submitted: float = 0.0  # time.monotonic() at submission (for execution.shard_timeout_s)


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
    """Submits shard runs of the ``gplflow-shard`` deployment and follows them through the API.

    The server is read sparingly: one filtered query reads the states of every run in flight (and of the
    pipeline's own flow run, to see it cancelled), at most once per ``poll_s`` seconds, the pause doubling up to
    ``MAX_POLL_S`` while nothing changes; the pool's online workers are read at most every ``WORKERS_TTL_S``.
    Every such call survives a server that is slow, paused or restarting for up to ``api_patience_s`` seconds:
    it is tried again with a growing pause (up to ``MAX_BACKOFF_S``); the shards keep running on the workers
    meanwhile. A submission retried after a timeout reuses its idempotency key, so the server never holds two
    runs of one shard attempt. Cancelling on the way out is bounded (``CANCEL_TIMEOUT_S`` a request,
    ``CANCEL_BUDGET_S`` in all), so a slow API cannot hold up a run that was told to stop.
    """

    MAX_BACKOFF_S = 30.0
    MAX_POLL_S = 5.0
    WORKERS_TTL_S = 30.0
    CANCEL_TIMEOUT_S = 3.0
    CANCEL_BUDGET_S = 10.0
    READ_PAGE = 200  # the most runs the server returns for one query (its default limit)

    def __init__(self, deployment: str = f"{FLOW_NAME}/{DEPLOYMENT}", timeout_s: float | None = None,
                 poll_s: float = 0.5, api_patience_s: float = 600.0, max_in_flight: int | str = "auto",
                 pool: str = POOL, parent: UUID | None = None):
        self.deployment, self.timeout_s, self.poll_s = deployment, timeout_s, poll_s
        self.api_patience_s, self.max_in_flight, self.pool = api_patience_s, max_in_flight, pool
        self.parent = parent  # the pipeline's flow run: read with the shards, its cancellation stops them
        self._pause = poll_s
        self._workers: tuple[float, int] | None = None  # (when read, how many online)

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

    def capacity(self) -> int:
        """How many shard runs may be in flight: ``max_in_flight``, or (auto) the pool's online workers."""
        if self.max_in_flight != "auto":
            return int(self.max_in_flight)
        now = time.monotonic()
        if self._workers is not None and now - self._workers[0] < self.WORKERS_TTL_S:
            return self._workers[1]
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

        with get_client(sync_client=True) as client:
            online = len(self._api(f"read pool {self.pool}'s workers", lambda: client.read_workers_for_work_pool(
                self.pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))))
        before = None if self._workers is None else self._workers[1]
        self._workers = (now, max(online, 1))
        if online != before:
            _logger().info("pool %s: %d workers online; up to %d shard runs in flight", self.pool, online,
                           max(online, 1))
        return max(online, 1)

    def submit(self, shard: int, parameters: dict[str, Any]) -> Attempt:
        from prefect.deployments import run_deployment

        name = f"{parameters['stage']} shard {shard}"
        key = f"gplflow-{uuid4()}"  # one per submission: a retry after a timeout cannot make a second run
        run = self._api(f"submit {name}", lambda: run_deployment(self.deployment, parameters=parameters, timeout=0,
                                                                 flow_run_name=name, idempotency_key=key))
        self._pause = self.poll_s
        return Attempt(shard, run.id, name, submitted=time.monotonic())

    def poll(self, attempts: list[Attempt]) -> list[Attempt]:
        """The attempts whose runs are final (filled with state, message, worker), from one read of them all,
        followed by a pause when none was. Runs past ``timeout_s`` are cancelled and returned as TIMED_OUT; a
        cancelled pipeline flow run raises ``PoolRunError``."""
        finished = self._read(attempts)
        if finished:
            self._pause = self.poll_s
        else:  # the next read comes after a pause, longer while nothing changes
            time.sleep(self._pause)
            self._pause = min(2 * self._pause, self.MAX_POLL_S)
        if self.timeout_s is not None:
            now, late = time.monotonic(), []
            for attempt in attempts:
                if attempt not in finished and now - attempt.submitted > self.timeout_s:
                    attempt.state = "TIMED_OUT"
                    attempt.message = f"no result within execution.shard_timeout_s={self.timeout_s}"
                    late.append(attempt)
            self.cancel(late, "past execution.shard_timeout_s")
            finished.extend(late)
        return finished

    def _read(self, attempts: list[Attempt]) -> list[Attempt]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        by_id = {a.run_id: a for a in attempts}
        ids = [*by_id, *([self.parent] if self.parent is not None else [])]
        finished = []
        with get_client(sync_client=True) as client:
            for i in range(0, len(ids), self.READ_PAGE):
                page = ids[i:i + self.READ_PAGE]
                runs = self._api("read the shard runs", lambda p=page: client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=p)), limit=len(p)))
                for run in runs:
                    if run.id == self.parent:
                        if run.state is not None and run.state.type.value in ("CANCELLING", "CANCELLED"):
                            raise PoolRunError(f"the pipeline's flow run {run.id} was cancelled; its shard runs "
                                               "in flight are cancelled too")
                        continue
                    attempt = by_id[run.id]
                    attempt.state = run.state.type.value if run.state else "UNKNOWN"
                    attempt.message = (run.state.message or "") if run.state else ""
                    attempt.worker = _worker(run)
                    if run.state is not None and run.state.is_final():
                        finished.append(attempt)
                        if attempt.state == "CRASHED" and run.start_time is None:  # it never ran a line
                            attempt.setup_error = self._load_failure(client, run.id)
        return finished

    def wait(self, attempts: list[Attempt]) -> None:
        """Poll until every run is final (those past ``timeout_s`` cancelled); on the first run that could not
        even load the shard flow, cancel the others and return."""
        open_ = list(attempts)
        while open_:
            finished = self.poll(open_)
            open_ = [a for a in open_ if a not in finished]
            if any(a.setup_error for a in finished):  # every other run on that worker would crash alike
                self.cancel(open_, "another shard run could not load the shard flow")
                return

    def cancel(self, attempts: list[Attempt], why: str) -> list[Attempt]:
        """Cancel these runs (a queued one at once, a started one through its worker); returns those the API
        did not take within the bounded time (a short request timeout, no retries, ``CANCEL_BUDGET_S`` in all)."""
        if not attempts:
            return []
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings
        from prefect.states import Cancelled, Cancelling

        deadline, left = time.monotonic() + self.CANCEL_BUDGET_S, []
        quick = {PREFECT_API_REQUEST_TIMEOUT: self.CANCEL_TIMEOUT_S, PREFECT_CLIENT_MAX_RETRIES: 0}
        with temporary_settings(quick), get_client(sync_client=True) as client:
            for attempt in attempts:
                if time.monotonic() > deadline:
                    left.append(attempt)
                    continue
                state = Cancelled if attempt.state in ("SCHEDULED", "UNKNOWN") else Cancelling
                try:
                    client.set_flow_run_state(attempt.run_id, state(message=why), force=True)
                except Exception as err:  # the way out must not hang on, or fail for, a slow API
                    logger.debug("cancelling %s failed: %s", attempt.run_name, err)
                    left.append(attempt)
        if left:
            _logger().warning("could not cancel %d shard runs in time (%s); cancel them in the UI or with "
                              "prefect flow-run cancel ID", len(left), ", ".join(str(a.run_id) for a in left))
        else:
            _logger().info("cancelled %d shard runs (%s)", len(attempts), why)
        return left

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
    parameters = {"stage": stage.name, "run_dir": _shared(inputs.run_dir), "config_path": source.config_path,
                  "overrides": source.overrides}
    _fan_out(cfg, job, parameters, dispatcher)


def fan_out_job(cfg: PipelineConfig, job: ShardJob, dispatcher: DeploymentDispatcher | None = None) -> None:
    """In pool mode, compute the pending shards of a job a stage made while it runs (a re-mining round's) on the
    worker pool: each shard run gets the job whole (``shard_flow``'s ``job``), its run directory made absolute."""
    if cfg.execution.mode != "pool":
        return
    payload = job_payload(job)
    payload["inputs"]["run_dir"] = run_dir = _shared(job.inputs.run_dir)
    _fan_out(cfg, job, {"stage": job.stage, "run_dir": run_dir, "job": payload}, dispatcher)


def _fan_out(cfg: PipelineConfig, job: ShardJob, parameters: dict[str, Any],
             dispatcher: DeploymentDispatcher | None) -> None:
    if job.store.load(job.stage, expect_fingerprint=job.fingerprint) is not None:
        return
    pending = job.prepare()
    if not pending:
        return
    if dispatcher is None:
        from prefect import runtime

        dispatcher = DeploymentDispatcher(timeout_s=cfg.execution.shard_timeout_s,
                                          max_in_flight=cfg.execution.max_in_flight,
                                          parent=UUID(str(runtime.flow_run.id)) if runtime.flow_run.id else None)
    dispatcher.check()
    run_shards(job, pending, dispatcher, parameters, cfg.execution)


def run_shards(job: ShardJob, pending: list[int], dispatcher: Any, parameters: dict[str, Any],
               execution: ExecutionConfig) -> int:
    """Compute the pending shards on the pool, never more runs in flight than ``dispatcher.capacity()``: submit up
    to it, then the next as one finishes; a failed shard goes back in the queue up to ``shard_retries`` times.
    Raises if some still fail at the end; a stop (an error, an interrupt) cancels the runs in flight first.
    Returns the most runs that were in flight at once.

    ``dispatcher`` is a ``DeploymentDispatcher`` or a stand-in with its ``capacity``, ``submit``, ``poll`` and
    ``cancel``.
    """
    log = _logger()
    queue, failures = deque(pending), Counter[int]()
    in_flight: list[Attempt] = []
    failed: dict[int, Attempt] = {}
    peak, started = 0, time.monotonic()
    log.info("%s: %d of %d shards on pool %s", job.stage, len(pending), job.n_shards, POOL)
    try:
        while queue or in_flight:
            room = dispatcher.capacity() - len(in_flight)
            while queue and room > 0:
                shard = queue.popleft()
                in_flight.append(dispatcher.submit(shard, {**parameters, "shard": shard}))
                room -= 1
            peak = max(peak, len(in_flight))
            for attempt in dispatcher.poll(in_flight):
                in_flight.remove(attempt)
                if attempt.setup_error:  # every other run on that worker would crash alike: not retried
                    raise PoolSetupError(setup_error_message(job.stage, attempt))
                if job.staging.record(attempt.shard) is not None:
                    continue
                if attempt.state == "COMPLETED":
                    attempt.message = (f"the run completed but left no completion record in {job.staging.url}; "
                                       "do the workers see the same run directory?")
                failures[attempt.shard] += 1
                if failures[attempt.shard] > execution.shard_retries:
                    failed[attempt.shard] = attempt
                else:
                    log.warning("%s: shard %d failed (try %d of %d), submitted again: %s", job.stage, attempt.shard,
                                failures[attempt.shard], 1 + execution.shard_retries,
                                _describe({attempt.shard: attempt}))
                    queue.append(attempt.shard)
    except BaseException as err:
        if in_flight:
            dispatcher.cancel(in_flight, f"the pipeline stopped ({type(err).__name__})")
        raise
    log.info("%s: %d shards in %.0f s, at most %d in flight", job.stage, len(pending), time.monotonic() - started,
             peak)
    if failed:
        raise PoolRunError(f"{job.stage}: shards {sorted(failed)} failed {1 + execution.shard_retries} times on "
                           f"pool {POOL}: {_describe(failed)}")
    return peak


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
