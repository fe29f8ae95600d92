"""Local runs on every visible device: the shards of generate, of mine's corpus encoding and of label, one process
per device at the same time (``execution.devices``; ``execution.mode: local``).

Before a shardable stage's task, ``fan_out`` stages the stage's plan, deals the pending shards round-robin over
the devices (device i takes pending shards i, i+N, …) and runs them with ``adapters/device_workers.py``: one
process per device, pinned to its GPU with ``CUDA_VISIBLE_DEVICES``, each loading the stage's models once and
computing its shards in turn. The stage's task, called afterwards, finds every shard done and publishes the
artifact in shard order, so the rows are those one device gives; a killed run keeps its finished shards, as on
one device. With one device, or one pending shard, nothing changes: the task computes in its own process.

Why processes per device and not sentence-transformers' multi-process encoding: the shard is already the unit of
work, resume and merge order for all three stages, and only mine's encoding is an ``encode`` call (generate
samples with T5 or an LLM, label scores with a cross-encoder). A process per device covers the three alike, loads
each model once per device rather than once per ``encode`` call, and moves no texts or embeddings between
processes (each stages its shard itself). Not yet measured on several GPUs; see the README.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from gplflow.adapters import device_workers
from gplflow.adapters.errors import InputError
from gplflow.flows.stages import Stage
from gplflow.tasks.base import ShardJob, StageInputs, job_from_payload, job_payload

logger = logging.getLogger(__name__)

TARGET = f"{__name__}:run_shards"


def devices(wanted: int | str) -> list[str]:
    """The devices ``execution.devices`` names here: 'auto' = every visible one (1 on a CPU), N = the first N; an
    InputError when fewer are visible."""
    found = device_workers.visible_devices()
    if wanted == "auto":
        return found
    if int(wanted) > len(found):
        gpus = "no GPU" if found == ["cpu"] else f"{len(found)} device(s): {', '.join(found)}"
        raise InputError(f"execution.devices {wanted}: this process sees {gpus}; set execution.devices to auto or "
                         f"at most {len(found)} (CUDA_VISIBLE_DEVICES decides which GPUs are visible)")
    return found[: int(wanted)]


def problem(wanted: int | str) -> str | None:
    """What is wrong with ``execution.devices`` on this host, for the checks before a run (None when fine)."""
    if wanted == "auto":  # every visible device: never too many (and no torch import for the default)
        return None
    try:
        devices(wanted)
    except InputError as err:
        return str(err).split(": ", 1)[1]
    return None


def fan_out(cfg: Any, stage: Stage, inputs: StageInputs) -> None:
    """In local mode on several devices, compute the stage's pending shards one process per device (else a no-op).

    ``inputs`` are the stage task's; the task, called afterwards, publishes the staged shards.
    """
    if cfg.execution.mode != "local" or stage.job is None:
        return
    found = devices(cfg.execution.devices)
    if len(found) > 1:
        spread(stage, inputs, found)


def spread(stage: Stage, inputs: StageInputs, found: list[str]) -> None:
    """Compute ``stage``'s pending shards over the devices ``found``, one process each, round-robin.

    Not a stage whose config sends its work to a server (``generate.endpoint``): its ``max_concurrency`` bounds
    the requests in flight, and N processes would multiply it."""
    if remote(getattr(inputs, "cfg", None)):
        return
    spread_job(stage.job(inputs), found, stage.name)  # type: ignore[misc]


def fan_out_job(cfg: Any, job: ShardJob) -> None:
    """In local mode on several devices, compute the pending shards of a job a stage made while it runs (a
    re-mining round's encoding or labelling) one process per device (else a no-op: the stage computes them)."""
    if cfg.execution.mode != "local":
        return
    found = devices(cfg.execution.devices)
    if len(found) > 1:
        spread_job(job, found, job.stage)


def spread_job(job: ShardJob, found: list[str], name: str) -> None:
    """Compute ``job``'s pending shards over the devices ``found``, one process each, round-robin."""
    if job.store.load(job.stage, expect_fingerprint=job.fingerprint) is not None:
        return
    pending = job.prepare()
    if len(pending) < 2:  # one shard: the task computes it in its own process
        return
    used = found[: len(pending)]
    _free_cached_gpu_memory()
    log = _logger()
    log.info("%s: %d of %d shards on %d devices (%s)", name, len(pending), job.n_shards, len(used), ", ".join(used))
    payload = job_payload(job)
    payloads = {device: {**payload, "shards": pending[i :: len(used)]} for i, device in enumerate(used)}
    done: list[int] = []

    def shard_done(device: str, event: dict[str, Any]) -> None:
        done.append(event["shard"])
        log.info("%s: shard %d done on %s (%d of %d)", name, event["shard"], device, len(done), len(pending))

    with tempfile.TemporaryDirectory(prefix=f"gplflow-{name}-devices-") as job_dir:
        device_workers.run_on_devices(Path(job_dir), TARGET, payloads, what=f"{name} shards", on_event=shard_done)


def remote(section: Any) -> bool:
    """Whether a stage's config section sends its work to a server (``generate.endpoint``): not spread."""
    return getattr(section, "endpoint", None) is not None


def run_shards(payload: dict[str, Any]) -> None:
    """A device's process: rebuild the job from its inputs and compute its shards in order."""
    job = job_from_payload(payload)
    for k in payload["shards"]:
        job.check_shard(k)  # the plan the parent staged, made from exactly these inputs
        if job.staging.record(k) is None:
            job.run_shard(k)
        device_workers.emit({"shard": k})


def _free_cached_gpu_memory() -> None:
    """Hand back what this process's allocator keeps cached on its GPU (an earlier stage's), for the device
    processes."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _logger() -> Any:
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow run (tests of the stages without Prefect)
        return logger
