"""The GPL, GenQ and supervised flows: stages chained by the fingerprints of the artifacts they publish.

Each stage is a cached Prefect task keyed by its fingerprint. Before calling one, the flow checks that the
artifact behind that fingerprint still validates; if it does not (deleted, corrupted, never written) the task
is called with ``refresh_cache=True``, so Prefect's cache can never hand back a path to nothing.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task

from gplflow.adapters.gpl_format import import_gpl
from gplflow.adapters.models import TINY, packaged_minilm_path, truncated_copy
from gplflow.adapters.runlock import run_lock
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models, default_cache_dir
from gplflow.flows import shards
from gplflow.flows.config import PipelineConfig, default_run_dir
from gplflow.flows.report import artifact_key, publish_report
from gplflow.flows.validate import validate_run
from gplflow.tasks import evaluate, generate, ingest, label, mine, pairs, pretrain, promote, split, train
from gplflow.tasks.base import retry_unless_deterministic

logger = logging.getLogger(__name__)


def _call(stage_task: Any, stage: str, fp: str, **params: Any) -> str:
    """Run a stage task, bypassing Prefect's cache when the artifact it would point to is not valid."""
    fresh = ArtifactStore(params["run_dir"]).load(stage, expect_fingerprint=fp) is None
    return stage_task.with_options(refresh_cache=fresh, retry_condition_fn=retry_unless_deterministic)(**params)


@task(name="prepare models", task_run_name="prepare models", persist_result=False)
def prepare_models(cfg: PipelineConfig, run_dir: str) -> dict[str, Any]:
    """Resolve every model slot; ``tiny`` slots get tiny models built offline from the corpus (cached)."""
    resolved = resolve_models(cfg, ArtifactStore(run_dir))
    get_run_logger().info("models: %s", resolved)
    return resolved


def resolve_models(cfg: PipelineConfig, store: ArtifactStore) -> dict[str, Any]:
    """Each model slot as a loadable reference; ``tiny`` ones are built from the corpus in ``store`` (cached)."""
    slots = {
        "generator": cfg.models.generator,
        "cross_encoder": cfg.models.cross_encoder,
        "base": cfg.models.base,
        # unused then: with BM25-only mining (no retrievers) validate_run wants a teacher named or a cross-encoder
        "bi_encoder_teacher": cfg.models.bi_encoder_teacher or next((r.name for r in cfg.models.retrievers),
                                                                    cfg.models.base),
    }
    retrievers = [(r.name, r.score) for r in cfg.models.retrievers]
    tiny = None
    if TINY in slots.values() or any(name == TINY for name, _ in retrievers):
        corpus = store.require(ingest.STAGE)
        texts = (row["text"] for batch in corpus.iter_batches(["text"]) for row in batch.to_pylist())
        tiny = build_tiny_models(texts, default_cache_dir(), seed=cfg.models.tiny_seed)
    paths = {"generator": "generator", "cross_encoder": "cross_encoder", "base": "bi_encoder",
             "bi_encoder_teacher": "bi_encoder"}
    resolved = {k: str(getattr(tiny, paths[k])) if v == TINY else _packaged(v) for k, v in slots.items()}
    resolved["retrievers"] = [(str(tiny.bi_encoder) if n == TINY else _packaged(n), s) for n, s in retrievers]
    if cfg.models.base_layers:
        resolved["base"] = str(truncated_copy(resolved["base"], cfg.models.base_layers, default_cache_dir()))
    return resolved


@task(name="import gpl folder", task_run_name="import gpl folder", persist_result=False)
def import_gpl_task(gpl_dir: str, run_dir: str) -> dict[str, str]:
    """Take the stages a UKPLab gpl folder already holds (corpus, queries, negatives, triples)."""
    imported = import_gpl(gpl_dir, ArtifactStore(run_dir))
    get_run_logger().info("imported from %s: %s", gpl_dir, ", ".join(sorted(imported)) or "nothing")
    return imported


def _packaged(ref: str) -> str:
    """The pip-packaged all-MiniLM-L6-v2 stands in for its hub name, so it works offline."""
    if ref.lower() in {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}:
        path = packaged_minilm_path()
        if path is not None:
            return str(path)
    return ref


def run_pipeline(cfg: PipelineConfig, run_dir: str, config_path: str | Path | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """The stages in order, holding the run directory's lock; returns the fingerprints and the metrics (if any).

    ``config_path`` and ``overrides`` (what ``cfg`` was loaded from) are what pool workers load
    (``execution.mode: pool``); without them the whole config is passed to the workers as overrides.
    """
    validate_run(cfg, run_dir, config_path, overrides or ())  # models, qrels, run directory: before any stage
    with run_lock(run_dir):  # a second run on this run directory fails here, before any stage
        return _run_stages(cfg, run_dir, config_path, overrides)


def _run_stages(cfg: PipelineConfig, run_dir: str, config_path: str | Path | None,
                overrides: list[str] | None) -> dict[str, Any]:
    started = time.time()
    pool = shards.PoolSource.of(cfg, config_path, overrides) if cfg.execution.mode == "pool" else None
    fps: dict[str, str] = import_gpl_task(cfg.import_.gpl_dir, run_dir) if cfg.import_.gpl_dir else {}
    if "corpus" not in fps:
        if cfg.corpus is None:
            raise ValueError(f"import.gpl_dir {cfg.import_.gpl_dir}: no corpus.jsonl, and no corpus.path given")
        fps["corpus"] = _call(ingest.ingest_task, ingest.STAGE, ingest.ingest_fingerprint(cfg.corpus),
                              cfg=cfg.corpus, run_dir=run_dir)
    if cfg.flow == "supervised":  # the user's pairs are read (and checked) before any model is built
        fps["pairs"] = _call(pairs.pairs_task, pairs.STAGE, pairs.pairs_fingerprint(cfg.pairs), cfg=cfg.pairs,
                             run_dir=run_dir)
    models = prepare_models(cfg, run_dir)
    if cfg.flow == "supervised":
        start = _train_supervised(cfg, run_dir, models, fps)
    else:
        start = _train_on_queries(cfg, run_dir, models, fps, pool)
    metrics = _evaluate(cfg, run_dir, models, start, fps)
    summary = {"run_dir": run_dir, "fingerprints": fps, "models": models, "metrics": metrics,
               "started": started, "seconds": round(time.time() - started, 1)}
    publish_report(cfg, ArtifactStore(run_dir), summary)
    return summary


def _train_supervised(cfg: PipelineConfig, run_dir: str, models: dict[str, Any], fps: dict[str, str]) -> str:
    """flow supervised: (pretrain →) train on the labelled pairs; returns the model training started from."""
    start = _pretrain(cfg, run_dir, models, fps)
    fps["model"] = _call(train.train_pairs_task, train.STAGE,
                         train.train_pairs_fingerprint(cfg.train, start, fps["pairs"]),
                         cfg=cfg.train, run_dir=run_dir, base_model=start, pairs_fp=fps["pairs"])
    return start


def _train_on_queries(cfg: PipelineConfig, run_dir: str, models: dict[str, Any], fps: dict[str, str],
                      pool: shards.PoolSource | None = None) -> str:
    """GPL and GenQ: generate → hold out → (mine → label →) (pretrain →) train; returns where training started."""
    if "queries" not in fps:
        generator = models["generator"] if cfg.generate.method == "t5" else ""
        params = dict(cfg=cfg.generate, run_dir=run_dir, corpus_fp=fps["corpus"], generator=generator,
                      shard_size=cfg.execution.shard_size)
        shards.fan_out(cfg, "generate", params, pool)  # pool mode: the shards run on the workers first
        fps["queries"] = _call(generate.generate_task, generate.STAGE,
                               generate.generate_fingerprint(cfg.generate, fps["corpus"], generator), **params)
    _hold_out(cfg, run_dir, fps)
    train_queries = fps.get(split.TRAIN, fps["queries"])  # what mining, labelling and training may see
    triples_fp = ""
    if cfg.flow == "gpl" and cfg.train.loss == "margin_mse":
        triples_fp = fps.get("triples") or _mine_and_label(cfg, run_dir, models, fps, pool)
    start = _pretrain(cfg, run_dir, models, fps)
    fps["model"] = _call(
        train.train_task, train.STAGE,
        train.train_fingerprint(cfg.train, start, triples_fp or train_queries, fps["corpus"]),
        cfg=cfg.train, run_dir=run_dir, base_model=start, corpus_fp=fps["corpus"],
        queries_fp=train_queries, triples_fp=triples_fp or None,
    )
    return start


def _hold_out(cfg: PipelineConfig, run_dir: str, fps: dict[str, str]) -> None:
    """Split the held-out queries off (``heldout/``, ``queries-train/``) unless the config or an import rules it out.

    Negatives or triples imported from a gpl folder were made from every query, so nothing can be held out.
    """
    if not split.active(cfg.evaluate):
        return
    if "negatives" in fps or "triples" in fps:
        logger.warning("no held-out evaluation: the imported %s were made from every query",
                       "triples" if "triples" in fps else "negatives")
        return
    fp = split.split_fingerprints(cfg.evaluate, fps["queries"])
    store = ArtifactStore(run_dir)
    fresh = any(store.load(stage, expect_fingerprint=f) is None for stage, f in fp.items())
    fps.update(split.split_task.with_options(refresh_cache=fresh, retry_condition_fn=retry_unless_deterministic)(
        cfg=cfg.evaluate, run_dir=run_dir, queries_fp=fps["queries"]))


def _evaluate(cfg: PipelineConfig, run_dir: str, models: dict[str, Any], start: str,
              fps: dict[str, str]) -> dict[str, Any] | None:
    """Evaluate on the qrels and the held-out queries (whichever the run has), then publish ``promoted/``."""
    store = ArtifactStore(run_dir)
    compare = {"base": models["base"]}
    if start != models["base"]:
        compare["pretrained"] = start
    compare["adapted"] = store.url(train.STAGE)
    heldout = store.load(split.HELDOUT, expect_fingerprint=fps[split.HELDOUT]) if split.HELDOUT in fps else None
    heldout_fp = heldout.fingerprint if heldout is not None and heldout.rows else None
    metrics, inputs = None, {"model": fps["model"]}
    if cfg.evaluate.qrels or heldout_fp:
        fps["evaluate"] = inputs["evaluate"] = _call(
            evaluate.evaluate_task, evaluate.STAGE,
            evaluate.fingerprint_for(cfg.evaluate, fps["corpus"], compare, fps["model"], heldout_fp),
            cfg=cfg.evaluate, run_dir=run_dir, corpus_fp=fps["corpus"], models=compare, adapted_fp=fps["model"],
            heldout_fp=heldout_fp,
        )
        metrics = evaluate.read_metrics(store)
    decision = metrics["promotion"] if metrics else promote.decide(cfg.evaluate.promote, cfg.evaluate.min_gain,
                                                                   None, None)
    fps["promoted"] = promote.publish(store, decision, compare, inputs).fingerprint
    return metrics


def _pretrain(cfg: PipelineConfig, run_dir: str, models: dict[str, Any], fps: dict[str, str]) -> str:
    """The model training starts from: the pretrain stage's output when pretraining is on, else the base."""
    if cfg.pretrain.method == "none":
        return models["base"]
    fps["pretrain"] = _call(
        pretrain.pretrain_task, pretrain.STAGE,
        pretrain.pretrain_fingerprint(cfg.pretrain, fps["corpus"], models["base"]),
        cfg=cfg.pretrain, run_dir=run_dir, corpus_fp=fps["corpus"], base_model=models["base"],
    )
    return str(ArtifactStore(run_dir).require(pretrain.STAGE).local_dir())


def _mine_and_label(cfg: PipelineConfig, run_dir: str, models: dict[str, Any], fps: dict[str, str],
                    pool: shards.PoolSource | None = None) -> str:
    retrievers = models["retrievers"]
    if "negatives" not in fps:
        params = dict(cfg=cfg.mine, run_dir=run_dir, corpus_fp=fps["corpus"],
                      queries_fp=fps.get(split.TRAIN, fps["queries"]),
                      retrievers=retrievers, shard_size=cfg.execution.shard_size)
        shards.fan_out(cfg, "mine", params, pool)
        fps["negatives"] = _call(mine.mine_task, mine.STAGE,
                                 mine.mine_fingerprint(cfg.mine, fps["corpus"], fps["queries"], retrievers), **params)
    teacher = models["cross_encoder"] if cfg.label.teacher == "cross_encoder" else models["bi_encoder_teacher"]
    n_triples = label.resolve_triples(cfg.label, cfg.train.steps, cfg.train.batch_size)
    queries_stage = split.TRAIN if split.TRAIN in fps else generate.STAGE
    params = dict(cfg=cfg.label, run_dir=run_dir, n_triples=n_triples, corpus_fp=fps["corpus"],
                  queries_fp=fps[queries_stage], negatives_fp=fps["negatives"], teacher=teacher,
                  queries_stage=queries_stage, shard_size=cfg.execution.shard_size)
    shards.fan_out(cfg, "label", params, pool)
    fps["triples"] = _call(
        label.label_task, label.STAGE,
        label.label_fingerprint(cfg.label, n_triples, fps["corpus"], fps[queries_stage], fps["negatives"], teacher),
        **params,
    )
    return fps["triples"]


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
