"""Evaluate: base vs adapted model on BEIR qrels (nDCG@10, MAP@100, Recall@100, MRR@10 via pytrec_eval).

For each model: encode the corpus and the judged queries, retrieve the top 100 passages of every query by
exact search (a flat FAISS index: evaluation numbers must not depend on an approximate index) with the
model's own similarity (``cosine``: L2-normalised, ``dot``: raw), and score the run as BEIR does (see
``adapters/metrics.py``). Judged documents missing from the corpus stay in the qrels (they count as
relevant documents no model can retrieve, as in BEIR) and are counted and logged.

Writes ``evaluate/``: ``metrics.json`` (``models`` -> label -> metric -> mean, ``delta`` = adapted - base,
``counts``, ``refs``, ``similarity``, ``primary_metric``) and one Parquet part with a row per
(query, model) and one column per metric.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from pydantic import Field

from gplflow.adapters import beir_io, encoding
from gplflow.adapters import metrics as trec
from gplflow.adapters import models as model_io
from gplflow.adapters.store import Artifact, ArtifactStore, content_signature
from gplflow.adapters.vector_index import VectorIndex
from gplflow.tasks.base import StageConfig, artifact_cache_key, reuse, stage_fingerprint
from gplflow.tasks.ingest import STAGE as CORPUS_STAGE

logger = logging.getLogger(__name__)

STAGE = "evaluate"
CODE_VERSION = "evaluate-1"
TOP_K = 100
REQUIRED_MODELS = ("base", "adapted")
_SIMILARITY = {"cosine": "cos_sim", "dot": "dot"}
SCHEMA = pa.schema([("query_id", pa.string()), ("model", pa.string()),
                    *[(name, pa.float64()) for name in trec.METRICS]])


class EvaluateConfig(StageConfig):
    qrels: str | None = None     # a BEIR qrels TSV (query-id, corpus-id, score); None skips evaluation
    queries: str | None = None   # BEIR queries.jsonl; default: queries.jsonl in the qrels folder's parent
    batch_size: int = Field(default=64, gt=0)
    max_seq_length: int = Field(default=350, gt=0)
    ignore_identical_ids: bool = True  # as BEIR: a retrieved passage whose id is the query's id is skipped


def _paths(cfg: EvaluateConfig) -> tuple[str, str]:
    if not cfg.qrels:
        raise ValueError("evaluate.qrels is not set: name a BEIR qrels file (e.g. data/scifact/qrels/test.tsv)")
    return cfg.qrels, cfg.queries or beir_io.default_queries_path(cfg.qrels)


def _inputs(cfg: EvaluateConfig, corpus_fp: str, model_ids: Mapping[str, str]) -> dict[str, str]:
    qrels, queries = _paths(cfg)
    inputs = {"corpus": corpus_fp, "qrels": content_signature(qrels), "queries": content_signature(queries)}
    inputs.update({f"model:{label}": ident for label, ident in model_ids.items()})
    return inputs


def model_identity(ref: str) -> str:
    """What a fingerprint records for a model: the artifact fingerprint of a published model folder
    (``<run>/model``, local or fsspec URL), else the hash of a local folder's files, else the hub name."""
    artifact = _artifact_at(ref)
    if artifact is not None:
        return artifact.fingerprint
    path = Path(model_io.resolve(ref))
    return f"files:{content_signature(path)}" if path.is_dir() else ref


def _artifact_at(ref: str) -> Artifact | None:
    """The published, validated artifact a model reference points to, if it points to one."""
    if "://" in ref:
        parent, _, name = ref.rstrip("/").rpartition("/")
    else:
        path = Path(model_io.resolve(ref))
        if not path.is_dir():
            return None
        parent, name = str(path.parent), path.name
    store = ArtifactStore(parent)
    return store.load(name) if store.read_manifest(name) is not None else None


def _loadable(ref: str) -> str:
    """A reference ``load_bi_encoder`` takes: an artifact on remote storage is fetched to a local folder."""
    if "://" not in ref:
        return ref
    artifact = _artifact_at(ref)
    if artifact is None:
        raise FileNotFoundError(f"model {ref}: no valid model artifact there (a URL must name a published "
                                "stage folder such as <run>/model)")
    return str(artifact.local_dir())


def _model_ids(model_refs: Mapping[str, str], adapted_fp: str | None) -> dict[str, str]:
    missing = [label for label in REQUIRED_MODELS if not model_refs.get(label)]
    if missing:
        raise ValueError(f"evaluate needs models labelled {', '.join(REQUIRED_MODELS)}; missing: "
                         f"{', '.join(missing)}")
    ids = {label: model_identity(ref) for label, ref in model_refs.items() if label != "adapted"}
    return {**ids, "adapted": adapted_fp or model_identity(model_refs["adapted"])}


def fingerprint_for(cfg: EvaluateConfig, corpus_fp: str, model_refs: Mapping[str, str],
                    adapted_fp: str | None = None) -> str:
    """The fingerprint ``run_evaluate`` publishes under for these model references."""
    return stage_fingerprint(STAGE, cfg, _inputs(cfg, corpus_fp, _model_ids(model_refs, adapted_fp)),
                             CODE_VERSION)


def run_evaluate(cfg: EvaluateConfig, store: ArtifactStore, corpus: Artifact, models: dict[str, str],
                 adapted_fp: str | None = None) -> Artifact:
    """Evaluate each model (label -> reference: ``base``, ``adapted``, optionally more) on the qrels.

    ``adapted_fp`` (the model artifact's fingerprint) saves hashing the adapted model folder when known.
    """
    ids = _model_ids(models, adapted_fp)
    inputs = _inputs(cfg, corpus.fingerprint, ids)
    if (found := reuse(store, STAGE, stage_fingerprint(STAGE, cfg, inputs, CODE_VERSION))) is not None:
        return found
    qrels_path, queries_path = _paths(cfg)
    # The writer is opened first so that the manifest's timings cover the evaluation, not only the writing.
    with store.writer(STAGE, config=cfg.model_dump(mode="json"), inputs=inputs, code_version=CODE_VERSION) as out:
        evalset = beir_io.load_eval_set(qrels_path, queries_path)
        table = corpus.read_table(["doc_id", "title", "text"])
        doc_ids = table.column("doc_id").to_pylist()
        passages = [encoding.passage_text(t, x) for t, x in zip(table.column("title").to_pylist(),
                                                                table.column("text").to_pylist(), strict=True)]
        del table
        counts = _counts(evalset, doc_ids)
        per_model, similarity = {}, {}
        for label, ref in models.items():
            per_model[label], similarity[label] = _evaluate_model(cfg, ref, label, evalset, doc_ids, passages)
        summary = _summary(per_model, counts, models, similarity)
        out.write_part([_per_query_table(per_model)], SCHEMA)
        beir_io.save_metrics(out.local_dir(), summary)
        for name, value in counts.items():
            out.count(name, value)
        out.extra["primary_metric"] = trec.PRIMARY
    logger.info("evaluation: %s", "; ".join(f"{label} nDCG@10={m[trec.PRIMARY]:.4f}"
                                            for label, m in summary["models"].items()))
    return store.require(STAGE)


def _counts(evalset: beir_io.EvalSet, doc_ids: list[str]) -> dict[str, int]:
    known = set(doc_ids)
    judgments = evalset.qrels.judgments
    missing = sum(did not in known for docs in judgments.values() for did in docs)
    no_relevant = sum(not any(s > 0 for s in docs.values()) for docs in judgments.values())
    if missing:
        logger.warning("%s: %d judged documents are not in the corpus; they stay relevant but cannot be "
                       "retrieved (as in BEIR)", evalset.qrels.path, missing)
    return {"queries": len(evalset.queries), "docs": len(doc_ids), "judgments": evalset.qrels.count,
            "judged_docs_not_in_corpus": missing, "queries_without_relevant": no_relevant,
            "repeated_judgments": evalset.qrels.repeated}


def _evaluate_model(cfg: EvaluateConfig, ref: str, label: str, evalset: beir_io.EvalSet, doc_ids: list[str],
                    passages: list[str]) -> tuple[dict[str, dict[str, float]], str]:
    """Per-query metrics of one model, and the similarity it was scored with."""
    model = model_io.load_bi_encoder(_loadable(ref), max_seq_length=cfg.max_seq_length, inference=True)
    name = str(getattr(model, "similarity_fn_name", None) or "cosine")
    if name not in _SIMILARITY:
        raise ValueError(f"model {label} ({ref}): similarity {name!r} is not supported for retrieval; "
                         f"expected one of {', '.join(_SIMILARITY)}")
    qids = list(evalset.queries)
    docs = encoding.encode(model, passages, role="document", batch_size=cfg.batch_size,
                           desc=f"{label}: encoding corpus")
    queries = encoding.encode(model, [evalset.queries[q] for q in qids], role="query",
                              batch_size=cfg.batch_size, desc=f"{label}: encoding queries")
    del model
    encoding.release_memory()
    index = VectorIndex(docs, score=_SIMILARITY[name], kind="flat", copy=False)
    depth = TOP_K + 1 if cfg.ignore_identical_ids else TOP_K  # one spare for a passage with the query's id
    scores, positions = index.search(queries, depth)
    run = _run(qids, doc_ids, scores, positions, cfg.ignore_identical_ids)
    return trec.evaluate_run(evalset.qrels.judgments, run, cfg.ignore_identical_ids), name


def _run(qids: list[str], doc_ids: list[str], scores: np.ndarray, positions: np.ndarray,
         ignore_identical_ids: bool) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    for qid, row_scores, row_pos in zip(qids, scores, positions, strict=True):
        hits: dict[str, float] = {}
        for score, pos in zip(row_scores.tolist(), row_pos.tolist(), strict=True):
            if pos < 0 or (ignore_identical_ids and doc_ids[pos] == qid):
                continue
            hits[doc_ids[pos]] = score
            if len(hits) == TOP_K:
                break
        run[qid] = hits
    return run


def _summary(per_model: dict[str, dict[str, dict[str, float]]], counts: dict[str, int],
             refs: Mapping[str, str], similarity: dict[str, str]) -> dict[str, Any]:
    means = {label: trec.mean_metrics(rows) for label, rows in per_model.items()}
    return {"primary_metric": trec.PRIMARY, "models": means, "delta": trec.delta(means["adapted"], means["base"]),
            "counts": counts, "refs": dict(refs), "similarity": similarity}


def _per_query_table(per_model: dict[str, dict[str, dict[str, float]]]) -> pa.Table:
    rows = [(qid, label, values) for label, per_query in per_model.items() for qid, values in per_query.items()]
    columns = {"query_id": [r[0] for r in rows], "model": [r[1] for r in rows]}
    columns.update({name: [r[2][name] for r in rows] for name in trec.METRICS})
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def read_metrics(store: ArtifactStore) -> dict[str, Any] | None:
    """The ``metrics.json`` of the run's evaluate artifact, or None when there is no valid one."""
    artifact = store.load(STAGE)
    return beir_io.load_metrics(artifact.local_dir()) if artifact is not None else None


def metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for a table (a Prefect table artifact, markdown): one per model, then ``adapted − base``."""
    order = [*REQUIRED_MODELS, *sorted(set(metrics["models"]) - set(REQUIRED_MODELS))]
    ordered = {label: metrics["models"][label] for label in order if label in metrics["models"]}
    extra = [("adapted − base", metrics["delta"])] if metrics.get("delta") else []
    return trec.table_rows(ordered, extra)


@task(name="evaluate retrieval", task_run_name="evaluate retrieval", retries=0, persist_result=True,
      cache_key_fn=artifact_cache_key(STAGE, lambda p: fingerprint_for(p["cfg"], p["corpus_fp"], p["models"],
                                                                        p.get("adapted_fp"))))
def evaluate_task(cfg: EvaluateConfig, run_dir: str, corpus_fp: str, models: dict[str, str],
                  adapted_fp: str | None = None) -> str:
    store = ArtifactStore(run_dir)
    corpus = store.load(CORPUS_STAGE, expect_fingerprint=corpus_fp)
    if corpus is None:
        raise FileNotFoundError(f"{store.url(CORPUS_STAGE)}: no valid corpus artifact with fingerprint {corpus_fp}")
    artifact = run_evaluate(cfg, store, corpus, models, adapted_fp)
    metrics = beir_io.load_metrics(artifact.local_dir())
    create_table_artifact(key="evaluation", table=metrics_table(metrics),
                          description=f"Retrieval on {cfg.qrels}: {metrics['counts']['queries']} queries, "
                                      f"{metrics['counts']['docs']} passages")
    delta = metrics["delta"].get(trec.PRIMARY, float("nan"))
    get_run_logger().info("nDCG@10 base %.4f, adapted %.4f (%+.4f)", metrics["models"]["base"][trec.PRIMARY],
                          metrics["models"]["adapted"][trec.PRIMARY], delta)
    return artifact.fingerprint
