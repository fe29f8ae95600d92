"""The GPL, GenQ, supervised and Augmented SBERT flows: the registry's stages (flows/stages.py) in order, each a
Prefect task.

Each stage task is cached on its stage fingerprint, trusted only while the artifact store says its artifact is
valid (``tasks.base.StageCache``): a reused stage shows as Cached, a deleted or corrupted one is recomputed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task

from gplflow.adapters.gpl_format import import_gpl
from gplflow.adapters.runlock import run_lock
from gplflow.adapters.store import ArtifactStore
from gplflow.flows import local_devices, shards
from gplflow.flows.config import ConfigError, PipelineConfig, default_run_dir
from gplflow.flows.interrupt import watchdog_on_stop
from gplflow.flows.report import artifact_key, publish_report
from gplflow.flows.stages import STAGES, Run
from gplflow.flows.validate import validate_run
from gplflow.tasks.base import ShardJob, spreading

logger = logging.getLogger(__name__)


@task(name="import gpl folder", task_run_name="import gpl folder", persist_result=False)
def import_gpl_task(gpl_dir: str, run_dir: str) -> dict[str, str]:
    """Take the stages a UKPLab gpl folder already holds (corpus, queries, negatives, triples)."""
    imported = import_gpl(gpl_dir, ArtifactStore(run_dir))
    get_run_logger().info("imported from %s: %s", gpl_dir, ", ".join(sorted(imported)) or "nothing")
    return imported


def run_pipeline(cfg: PipelineConfig, run_dir: str, config_path: str | Path | None = None,
                 overrides: list[str] | None = None, reuse_from: Sequence[str] = ()) -> dict[str, Any]:
    """The stages in order, holding the run directory's lock; returns the fingerprints and the metrics (if any).

    ``config_path`` and ``overrides`` (what ``cfg`` was loaded from) are what pool workers load
    (``execution.mode: pool``); without them the whole config is passed to the workers as overrides.
    ``reuse_from``: other run directories whose artifacts, where one has exactly the fingerprint a stage would
    publish here, are adopted instead of computed again (``gplflow compare`` runs methods side by side so).
    """
    validate_run(cfg, run_dir, config_path, overrides or ())  # models, qrels, run directory: before any stage
    me = runtime.flow_run.id
    # a second run on this run directory fails here, before any stage
    # a stop signal ends the process within seconds, however slow the API is to take the Crashed state
    with watchdog_on_stop(), run_lock(run_dir, {"flow_run_id": str(me)} if me else None) as stale:
        if stale is not None:
            crash_abandoned(stale, run_dir)
        return _run_stages(cfg, run_dir, config_path, overrides, reuse_from)


def crash_abandoned(stale: dict[str, Any], run_dir: str) -> None:
    """Mark Crashed the flow run of a run that died holding ``run_dir`` (a SIGKILL, a lost machine).

    Such a run could not report its end, so Prefect would show it Running for good. Its lock named the flow run;
    if the API still has it in a state that is not final, it is set to Crashed with a message saying why. An API
    that does not know the run (another server) or does not answer leaves it as it is.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    prior = stale.get("flow_run_id")
    if not isinstance(prior, str) or prior == str(runtime.flow_run.id):
        return
    try:
        with get_client(sync_client=True) as client:
            found = client.read_flow_run(uuid.UUID(prior))
            if found.state is None or found.state.is_final():
                return
            was = found.state.name
            client.set_flow_run_state(found.id, Crashed(message=(
                f"its process (host {stale.get('host')}, pid {stale.get('pid')}) ended without reporting; "
                f"flow run {runtime.flow_run.id} took over {run_dir}")), force=True)
    except (ObjectNotFound, ValueError) as err:
        logger.info("the flow run %s of the run that died in %s is not on this API: %s", prior, run_dir, err)
        return
    except Exception as err:  # an API that does not answer: the run goes on, the old flow run keeps its state
        logger.warning("could not mark the flow run %s of the run that died in %s as Crashed: %s", prior, run_dir,
                       err)
        return
    logger.warning("flow run %s was left %s by a run that died in %s; marked Crashed", prior, was, run_dir)


def _adopt(fingerprints: dict[str, str], run: Run, donors: Sequence[str]) -> None:
    """Copy in the artifacts a stage would publish from the first donor run directory that has them, valid."""
    for name, fp in fingerprints.items():
        if run.store.load(name, expect_fingerprint=fp) is not None:
            continue
        for donor in donors:
            if (found := ArtifactStore(donor).load(name, expect_fingerprint=fp)) is not None:
                run.store.adopt(found)
                break


def _run_stages(cfg: PipelineConfig, run_dir: str, config_path: str | Path | None,
                overrides: list[str] | None, reuse_from: Sequence[str] = ()) -> dict[str, Any]:
    started = time.time()
    pool = shards.PoolSource.of(cfg, config_path, overrides) if cfg.execution.mode == "pool" else None
    run = Run(cfg, run_dir)
    if cfg.import_.gpl_dir:
        run.fps.update(import_gpl_task(cfg.import_.gpl_dir, run_dir))
    if "corpus" not in run.fps and cfg.corpus is None:
        raise ConfigError(f"import.gpl_dir {cfg.import_.gpl_dir}: no corpus.jsonl, and no corpus.path given")
    for stage in STAGES:
        if all(name in run.fps for name in stage.makes) or not stage.when(run):  # imported, or not this run's
            continue
        inputs = stage.inputs(run)
        if reuse_from and stage.portable:
            _adopt(inputs.fingerprints(), run, reuse_from)
        if stage.job is not None:  # the shards first, then the task publishes them
            shards.fan_out(cfg, stage, inputs, pool)  # pool mode: on the workers
            local_devices.fan_out(cfg, stage, inputs)  # local mode on several devices: a process per device
        # pool mode: no shard lands on a device that training holds; shards a stage cuts while it runs (a re-mining
        # round's) go where the stages' shards go
        with shards.devices_held(cfg, stage), spreading(partial(_spread, cfg)):
            run.record(stage, stage.task(inputs))
    store = ArtifactStore(run_dir)
    metrics = None
    if "evaluate" in run.fps:
        from gplflow.tasks.evaluate import read_metrics

        metrics = read_metrics(store)
    summary = {"run_dir": run_dir, "fingerprints": run.fps, "models": run.resolved or {}, "metrics": metrics,
               "started": started, "seconds": round(time.time() - started, 1)}
    publish_report(cfg, store, summary)
    return summary


def _spread(cfg: PipelineConfig, job: ShardJob) -> None:
    """Where the shards of a job a stage made while it runs are computed: on the pool (with the training's devices
    given back meanwhile), on every local device, or (neither applies) by the stage itself."""
    if cfg.execution.mode == "pool":
        with shards.devices_released():
            shards.fan_out_job(cfg, job)
    else:
        local_devices.fan_out_job(cfg, job)


def flow_run_name() -> str:
    """``<config name>-<date>-<time>`` (demo-2026-11-05-1432): a run the UI lists by what it ran."""
    params = runtime.flow_run.parameters
    config_path = params.get("config_path")
    try:
        name = PipelineConfig.load(config_path, params.get("overrides") or []).name
    except ValueError:  # a config error: the flow itself fails with the message
        name = Path(config_path).stem if config_path else "gplflow"
    return f"{artifact_key(name)}-{datetime.now():%Y-%m-%d-%H%M}"


@flow(name="gpl-pipeline", flow_run_name=flow_run_name)
def gpl_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                 run_dir: str | None = None) -> dict[str, Any]:
    """Adapt a bi-encoder to a corpus: ingest → generate → mine → label → train → evaluate (GPL or GenQ)."""
    cfg = PipelineConfig.load(config_path, overrides or [])
    return run_pipeline(cfg, run_dir or default_run_dir(cfg), config_path, overrides)


@flow(name="genq-pipeline", flow_run_name=flow_run_name)
def genq_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                  run_dir: str | None = None) -> dict[str, Any]:
    """GenQ: ingest → generate → train with MultipleNegativesRankingLoss → evaluate."""
    overrides = [*(overrides or []), "flow=genq", "train.loss=mnrl"]
    cfg = PipelineConfig.load(config_path, overrides)
    return run_pipeline(cfg, run_dir or default_run_dir(cfg), config_path, overrides)


@flow(name="supervised-pipeline", flow_run_name=flow_run_name)
def supervised_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                        run_dir: str | None = None) -> dict[str, Any]:
    """Fine-tune on labelled pairs: ingest → read pairs → (pretrain →) train → evaluate on the qrels."""
    overrides = [*(overrides or []), "flow=supervised"]
    cfg = PipelineConfig.load(config_path, overrides)
    return run_pipeline(cfg, run_dir or default_run_dir(cfg), config_path, overrides)


@flow(name="augmented-sbert-pipeline", flow_run_name=flow_run_name)
def augmented_sbert_pipeline(config_path: str | None = None, overrides: list[str] | None = None,
                             run_dir: str | None = None) -> dict[str, Any]:
    """Augmented SBERT: ingest → read gold pairs → train a cross-encoder on them → sample pairs (BM25, semantic
    search) → label them with the cross-encoder (silver) → train on gold + silver → evaluate on the qrels."""
    overrides = [*(overrides or []), "flow=augmented_sbert"]
    cfg = PipelineConfig.load(config_path, overrides)
    return run_pipeline(cfg, run_dir or default_run_dir(cfg), config_path, overrides)
