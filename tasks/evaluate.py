"""Evaluate: base vs adapted model on BEIR qrels and on held-out synthetic queries (nDCG@10, MAP@100, Recall@100,
MRR@10 via pytrec_eval), and the promotion decision (see ``tasks/promote.py``).

Two evaluation sets, each optional, scored the same way: ``qrels`` (``evaluate.qrels``: judged queries) and
``heldout`` (the ``heldout/`` artifact of ``tasks/split.py``: generated queries never trained on, each with the
passage it was generated from as its one relevant passage). Two more come from the held-out queries:
``heldout_low_overlap`` (those sharing less than ``evaluate.heldout_max_overlap`` of their words with their
passage: the ones a model cannot answer by word matching alone) and ``teacher`` (the held-out queries judged by
the run's teacher or ``evaluate.judge`` on the pooled top passages of every model, see ``tasks/evaluators.py``).

Every evaluation compares each model with the base on the per-query nDCG@10 (``tasks/significance.py``: gain,
interval, p-value, verdict, queries needed). The run's verdict (``tasks/promote.py``) is the qrels' verdict when
given; without qrels it is the consensus of the held-out signals. Promotion follows the verdict.

For each model: encode the corpus once, then each set's queries, retrieve the top 100 passages of every query by
exact search (a flat FAISS index: evaluation numbers must not depend on an approximate index) with the
model's own similarity (``cosine``: L2-normalised, ``dot``: raw), and score the run as BEIR does (see
``adapters/metrics.py``). Judged documents missing from the corpus stay in the qrels (they count as
relevant documents no model can retrieve, as in BEIR) and are counted and logged.

Writes ``evaluate/``: ``metrics.json`` (``evaluations`` -> qrels | heldout | heldout_low_overlap | teacher ->
{``models`` -> label -> metric -> mean, ``delta`` = adapted - base, ``counts``, ``comparisons`` -> model -> the
paired test and verdict against the base}, ``primary_evaluation``, ``primary_metric``, ``verdicts`` (``qrels``,
``no_qrels``), ``verdict`` (the one that decides), ``promotion``, ``refs``, ``similarity``) and one Parquet part
with a row per (evaluation, query, model) and one column per metric (teacher-judged rows: nDCG@10 only). The
manifest repeats ``promotion`` and ``verdict``.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import Field

from gplflow.adapters import artifacts, beir_io
from gplflow.adapters import metrics as trec
from gplflow.adapters.errors import InputError, MissingInputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.pair_readers import iter_pairs, read_labels
from gplflow.adapters.store import MANIFEST, Artifact, ArtifactStore, Check, canonical_json, content_signature
from gplflow.adapters.text import passage_texts
from gplflow.adapters.vector_index import VectorIndex
from gplflow.tasks import promote, significance
from gplflow.tasks.base import Ref, Seed, StageConfig, StageInputs, stage_task
from gplflow.tasks.evaluation_table import metrics_table
from gplflow.tasks.evaluators import (
    MAP_FILE,
    ClusteringConfig,
    EmbeddingMapConfig,
    Evaluators,
    Judging,
    MtebConfig,
    StsConfig,
    Teacher,
    signatures,
)
from gplflow.tasks.planning import Measured, StagePlan, encode_timed, once_then_each, score_rate

# torch, transformers, bm25s: loaded when a stage computes, not when a config is read
encoding = lazy("gplflow.adapters.encoding")
model_io = lazy("gplflow.adapters.models")

logger = logging.getLogger(__name__)

STAGE = artifacts.EVALUATE
CODE_VERSION = "evaluate-4"
TOP_K = 100
REQUIRED_MODELS = ("base", "adapted")
_SIMILARITY = {"cosine": "cos_sim", "dot": "dot"}
EVALUATIONS = ("qrels", "heldout")  # in order of precedence: the first one present is the primary evaluation
LOW_OVERLAP, JUDGED = "heldout_low_overlap", "teacher"  # the evaluations derived from the held-out queries
_WORD = re.compile(r"\w+")


class EvaluateConfig(StageConfig):
    qrels: str | None = None     # a BEIR qrels TSV (query-id, corpus-id, score); None skips evaluation
    queries: str | None = None   # BEIR queries.jsonl; default: queries.jsonl in the qrels folder's parent
    batch_size: int = Field(default=64, gt=0)
    max_seq_length: int = Field(default=350, gt=0)
    ignore_identical_ids: bool = True  # as BEIR: a retrieved passage whose id is the query's id is skipped
    # held-out synthetic queries (tasks/split.py): this share of the generated queries, at most heldout_max
    heldout_fraction: float = Field(default=0.05, ge=0.0, le=0.5)  # 0 turns the held-out evaluation off
    heldout_max: int = Field(default=2_000, ge=0)
    heldout_seed: Seed = 42
    heldout_max_overlap: float = Field(default=0.5, ge=0.0, le=1.0)  # held-out queries below: "low overlap"
    # which model promoted/ names (tasks/promote.py): the adapted one when the verdict is better (if_better), not
    # worse (if_not_worse), or whatever it is (always)
    promote: Literal["always", "if_better", "if_not_worse"] = "if_better"
    min_gain: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)  # least nDCG@10 gain a "better" verdict needs
    # the paired test of each model against the base (tasks/significance.py)
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    resamples: int = Field(default=10_000, ge=100, le=1_000_000)
    seed: Seed = 0
    # teacher-judged evaluation of the held-out queries: a cross-encoder to judge with instead of the run's teacher,
    # and the pool depth (each model's top passages judged per query)
    judge: str | None = None
    judge_depth: int = Field(default=10, ge=1, le=100)
    # evaluators beside retrieval (tasks/evaluators.py), each off unless configured
    sts: StsConfig | None = None
    clustering: ClusteringConfig | None = None
    embedding_map: EmbeddingMapConfig | None = None
    mteb: MtebConfig | None = None  # run when the mteb package is installed


def _paths(cfg: EvaluateConfig) -> tuple[str, str]:
    if not cfg.qrels:
        raise InputError("evaluate.qrels is not set: name a BEIR qrels file (e.g. data/scifact/qrels/test.tsv)")
    return cfg.qrels, cfg.queries or beir_io.default_queries_path(cfg.qrels)


def _inputs(cfg: EvaluateConfig, corpus_fp: str, model_ids: Mapping[str, str],
            heldout_fp: str | None, teacher: Teacher | None = None) -> dict[str, str]:
    if not cfg.qrels and not heldout_fp and cfg.sts is None and cfg.clustering is None and cfg.mteb is None:
        raise InputError("evaluate: nothing to evaluate on; set evaluate.qrels or evaluate.heldout_fraction > 0")
    inputs = {"corpus": corpus_fp}
    if cfg.qrels:
        qrels, queries = _paths(cfg)
        inputs.update(qrels=content_signature(qrels), queries=content_signature(queries))
    if heldout_fp:
        inputs["heldout"] = heldout_fp
        if teacher is not None:
            inputs["teacher"] = canonical_json(teacher.model_dump(mode="json"))
        if cfg.judge:
            inputs["judge"] = model_identity(cfg.judge)
    inputs.update(signatures(cfg.sts, cfg.clustering, cfg.mteb))
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


def _artifact_at(ref: str, check: Check = "cheap") -> Artifact | None:
    """The published, validated artifact a model reference points to, if it points to one (checked as deep as
    ``check`` says: cheaply for its identity, fully before it is loaded)."""
    if "://" in ref:
        parent, _, name = ref.rstrip("/").rpartition("/")
    else:
        path = Path(model_io.resolve(ref))
        if not path.is_dir():
            return None
        parent, name = str(path.parent), path.name
    store = ArtifactStore(parent)
    return store.load(name, check=check) if store.read_manifest(name) is not None else None


def _loadable(ref: str) -> str:
    """A reference ``load_bi_encoder`` takes: a model artifact is verified before it is loaded (see
    ``ArtifactStore.consume``), and one on remote storage is fetched to a local folder."""
    if "://" not in ref:
        path = Path(ref).expanduser()
        if (path / MANIFEST).is_file():
            ArtifactStore(path.parent).require(path.name, check="consume")
        return ref
    artifact = _artifact_at(ref, check="consume")
    if artifact is None:
        raise MissingInputError(f"model {ref}: no valid model artifact there (a URL must name a published "
                                "stage folder such as <run>/model)")
    return str(artifact.local_dir())


def _model_ids(model_refs: Mapping[str, str], adapted_fp: str | None) -> dict[str, str]:
    missing = [label for label in REQUIRED_MODELS if not model_refs.get(label)]
    if missing:
        raise ValueError(f"evaluate needs models labelled {', '.join(REQUIRED_MODELS)}; missing: "
                         f"{', '.join(missing)}")
    ids = {label: model_identity(ref) for label, ref in model_refs.items() if label != "adapted"}
    return {**ids, "adapted": adapted_fp or model_identity(model_refs["adapted"])}


class EvaluateInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What the evaluation reads: the corpus, the compared models (label -> reference: ``base``, ``adapted``,
    optionally ``pretrained``), the held-out queries when some exist, and GPL's teacher for its agreement."""

    cfg: EvaluateConfig
    corpus: Ref
    models: dict[str, str]
    adapted_fp: str | None = None  # the model artifact's fingerprint: saves hashing the adapted folder
    heldout: Ref | None = None
    teacher: Teacher | None = None

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        heldout_fp = self.heldout.fingerprint if self.heldout is not None else None
        return self.cfg.model_dump(mode="json"), _inputs(self.cfg, self.corpus.fingerprint,
                                                         _model_ids(self.models, self.adapted_fp), heldout_fp,
                                                         self.teacher)


def run_evaluate(inputs: EvaluateInputs) -> Artifact:
    """Evaluate each model on the qrels (when ``cfg.qrels``) and on the held-out queries (when they have rows),
    and decide the promotion; with a teacher (GPL runs) its agreement on the held-out queries is measured too."""
    cfg, store, models, teacher = inputs.cfg, inputs.store, inputs.models, inputs.teacher
    corpus = inputs.load(inputs.corpus)
    heldout = inputs.load(inputs.heldout) if inputs.heldout is not None else None
    if heldout is not None and not heldout.rows:  # a tiny corpus may hold out none: evaluated without them
        inputs = inputs.model_copy(update={"heldout": None})
        heldout = None
    if (found := inputs.reuse()) is not None:
        return found
    _, fps = inputs.fingerprint_parts()
    # The writer is opened first so that the manifest's timings cover the evaluation, not only the writing.
    with store.writer(STAGE, config=cfg.model_dump(mode="json"), inputs=fps, code_version=CODE_VERSION) as out:
        sets = _eval_sets(cfg, heldout)
        table = corpus.read_table(["doc_id", "title", "text"])
        doc_ids = table.column("doc_id").to_pylist()
        passages = passage_texts(table)
        del table
        held = heldout.read_table(["query_id", "doc_id", "text"]).to_pydict() if heldout is not None else None
        extras = Evaluators(cfg.sts, cfg.clustering, cfg.embedding_map, doc_ids, held, cfg.batch_size,
                            _judging(cfg, store, teacher, held), passages, cfg.mteb)
        per_set: dict[str, dict[str, dict[str, dict[str, float]]]] = {name: {} for name in sets}
        similarity = {}
        for label, ref in models.items():
            found, similarity[label] = _evaluate_model(cfg, ref, label, sets, doc_ids, passages, extras)
            for name, per_query in found.items():
                per_set[name][label] = per_query
        counts: dict[str, dict[str, Any]] = {name: _counts(s, doc_ids) for name, s in sets.items()}
        more = extras.finish(out.local_dir())
        if held is not None:  # an empty subset (extractive queries copy their passage) is only counted
            low = _low_overlap(held, doc_ids, passages, cfg.heldout_max_overlap)
            counts["heldout"].update(low_overlap_queries=len(low), max_overlap=cfg.heldout_max_overlap)
            if low:
                per_set[LOW_OVERLAP] = {label: {q: rows[q] for q in low} for label, rows in per_set["heldout"].items()}
                counts[LOW_OVERLAP] = {"queries": len(low), "of": len(held["query_id"]), "docs": len(doc_ids),
                                       "max_overlap": cfg.heldout_max_overlap}
        if extras.judged:
            per_set[JUDGED], counts[JUDGED] = extras.judged, extras.judged_counts
        summary = _summary(cfg, per_set, counts, models, similarity)
        summary.update(more)
        out.write_part([_per_query_table(per_set)], artifacts.EVALUATE_SCHEMA)
        beir_io.save_metrics(out.local_dir(), summary)
        for name, counts in summary["evaluations"].items():
            for key, value in counts["counts"].items():
                if isinstance(value, int) and not isinstance(value, bool):  # not the judge's name, nor a threshold
                    out.count(f"{name}_{key}", value)
        out.extra["verdict"] = summary["verdict"]
        out.extra["primary_metric"] = trec.PRIMARY
        out.extra["primary_evaluation"] = summary["primary_evaluation"]
        out.extra["promotion"] = summary["promotion"]
    for name, results in summary["evaluations"].items():
        logger.info("evaluation on %s: %s", name, "; ".join(f"{label} nDCG@10={m[trec.PRIMARY]:.4f}"
                                                            for label, m in results["models"].items()))
    return store.require(STAGE)


def _eval_sets(cfg: EvaluateConfig, heldout: Artifact | None) -> dict[str, beir_io.EvalSet]:
    """The evaluation sets, in EVALUATIONS order: the qrels (read and checked) and the held-out queries."""
    sets = {}
    if cfg.qrels:
        sets["qrels"] = beir_io.load_eval_set(*_paths(cfg))
    if heldout is not None:
        sets["heldout"] = heldout_eval_set(heldout.read_table(["query_id", "doc_id", "text"]), heldout.url)
    return sets


def _judging(cfg: EvaluateConfig, store: ArtifactStore, teacher: Teacher | None,
             held: dict[str, list[str]] | None) -> Judging:
    """The teacher measures' settings: the judge is ``evaluate.judge`` (a cross-encoder) when set, else the
    teacher; a teacher reuses the scores the label stage gave held-out pairs (``triples/``), if any."""
    judge = (Teacher(kind="cross_encoder", ref=cfg.judge, max_seq_length=cfg.max_seq_length,
                     batch_size=cfg.batch_size) if cfg.judge else teacher)
    known = _labelled_scores(store, set(held["query_id"])) if judge is not None and judge == teacher and held else {}
    return Judging(teacher=teacher, judge=judge, depth=cfg.judge_depth, known=known)


def _labelled_scores(store: ArtifactStore, queries: set[str]) -> dict[tuple[str, str], float]:
    """The teacher's scores of (query, passage) pairs of ``queries`` in the run's ``triples/``. The split keeps
    held-out queries out of labelling, so this is usually empty; the scores only save teacher calls (they are the
    ones the teacher would give), hence they are not in the fingerprint."""
    triples = store.load(artifacts.TRIPLES)
    if triples is None or not queries:
        return {}
    found: dict[tuple[str, str], float] = {}
    tuples = artifacts.negatives_per_example(triples.manifest) > 1
    columns = ["neg_doc_ids", "neg_scores"] if tuples else ["neg_doc_id", "neg_score"]
    for batch in triples.iter_batches(["query_id", "pos_doc_id", "pos_score", *columns]):
        rows = batch.to_pydict()
        for qid, pos, pos_score, negs, neg_scores in zip(*rows.values(), strict=True):
            if qid in queries:
                found[qid, pos] = pos_score
                for neg, score in zip(*((negs, neg_scores) if tuples else ([negs], [neg_scores])), strict=True):
                    found[qid, neg] = score
    return found


def token_overlap(query: str, passage: str) -> float:
    """The share of the query's words (lower-cased word tokens) that occur in the passage: 1 for an extractive
    span, low for a query a model must answer by meaning rather than by word matching."""
    words = _WORD.findall(query.lower())
    known = set(_WORD.findall(passage.lower()))
    return sum(w in known for w in words) / len(words) if words else 1.0


def _low_overlap(held: dict[str, list[str]], doc_ids: list[str], passages: list[str], limit: float) -> list[str]:
    """The held-out query ids whose token overlap with their source passage is below ``limit``."""
    row = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    return [qid for qid, doc_id, text in zip(held["query_id"], held["doc_id"], held["text"], strict=True)
            if token_overlap(text, passages[row[doc_id]]) < limit]


def heldout_eval_set(table: pa.Table, where: str) -> beir_io.EvalSet:
    """Held-out queries as an evaluation set: each query's one relevant passage is the one it came from."""
    rows = table.to_pydict()
    qrels = beir_io.Qrels(path=where, judgments={q: {d: 1} for q, d in zip(rows["query_id"], rows["doc_id"],
                                                                           strict=True)})
    return beir_io.EvalSet(qrels=qrels, queries=dict(zip(rows["query_id"], rows["text"], strict=True)),
                           queries_path=where)


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


def _evaluate_model(cfg: EvaluateConfig, ref: str, label: str, sets: dict[str, beir_io.EvalSet], doc_ids: list[str],
                    passages: list[str], extras: Evaluators | None = None,
                    ) -> tuple[dict[str, dict[str, dict[str, float]]], str]:
    """Per-query metrics of one model on each evaluation set (the corpus encoded once), and its similarity."""
    model = model_io.load_bi_encoder(_loadable(ref), max_seq_length=cfg.max_seq_length, inference=True)
    name = str(getattr(model, "similarity_fn_name", None) or "cosine")
    if name not in _SIMILARITY:
        raise InputError(f"model {label} ({ref}): similarity {name!r} is not supported for retrieval; "
                         f"expected one of {', '.join(_SIMILARITY)}")
    docs = encoding.encode(model, passages, role="document", batch_size=cfg.batch_size,
                           desc=f"{label}: encoding corpus")
    index = VectorIndex(docs, score=_SIMILARITY[name], kind="flat", copy=False)
    found = {}
    for set_name, evalset in sets.items():
        ignore = cfg.ignore_identical_ids and set_name == "qrels"  # held-out ids never name a passage
        qids = list(evalset.queries)
        queries = encoding.encode(model, [evalset.queries[q] for q in qids], role="query",
                                  batch_size=cfg.batch_size, desc=f"{label}: encoding {set_name} queries")
        depth = TOP_K + 1 if ignore else TOP_K  # one spare for a passage with the query's id
        scores, positions = index.search(queries, depth)
        found[set_name] = trec.evaluate_run(evalset.qrels.judgments, _run(qids, doc_ids, scores, positions, ignore),
                                            ignore)
        if set_name == "heldout":  # in the held-out artifact's order, which the teacher measures follow
            ranked = positions
    if extras is not None:
        extras.add(label, model, docs, ranked if "heldout" in sets else None)
    del model, index
    encoding.release_memory()
    return found, name


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


def _summary(cfg: EvaluateConfig, per_set: dict[str, dict[str, dict[str, dict[str, float]]]],
             counts: dict[str, dict[str, Any]], refs: Mapping[str, str], similarity: dict[str, str]) -> dict[str, Any]:
    evaluations = {}
    for name, per_model in per_set.items():
        means = {label: _means(rows) for label, rows in per_model.items()}
        evaluations[name] = {"models": means, "delta": trec.delta(means["adapted"], means["base"]),
                             "counts": counts[name], "comparisons": _comparisons(cfg, name, per_model)}
    primary = next((name for name in EVALUATIONS if name in evaluations), None)  # None: only STS or clustering
    verdicts = promote.verdicts(evaluations)
    verdict = promote.deciding(verdicts)
    return {"primary_metric": trec.PRIMARY, "primary_evaluation": primary, "evaluations": evaluations,
            "verdicts": verdicts, "verdict": verdict, "promotion": promote.decide(cfg.promote, cfg.min_gain, verdict),
            "refs": dict(refs), "similarity": similarity}


def _means(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each metric the queries have (all of ``trec.METRICS``; nDCG@10 alone when teacher-judged)."""
    return {name: float(np.mean([row[name] for row in per_query.values()])) for name in next(iter(per_query.values()))}


def _comparisons(cfg: EvaluateConfig, evaluation: str, per_model: dict[str, dict[str, dict[str, float]]],
                 ) -> dict[str, dict[str, Any]]:
    """Each model against the base on the per-query nDCG@10 of one evaluation (the paired test and verdict)."""
    base = per_model["base"]
    qids = sorted(base)
    return {label: significance.compare([base[q][trec.PRIMARY] for q in qids], [rows[q][trec.PRIMARY] for q in qids],
                                        alpha=cfg.alpha, resamples=cfg.resamples, seed=cfg.seed,
                                        min_gain=cfg.min_gain, names=(label, "base"),
                                        on=f"{trec.DISPLAY[trec.PRIMARY]} of {promote.NAMES[evaluation]}")
            for label, rows in per_model.items() if label != "base"}


def _per_query_table(per_set: dict[str, dict[str, dict[str, dict[str, float]]]]) -> pa.Table:
    rows = [(name, qid, label, values) for name, per_model in per_set.items()
            for label, per_query in per_model.items() for qid, values in per_query.items()]
    columns = {"evaluation": [r[0] for r in rows], "query_id": [r[1] for r in rows], "model": [r[2] for r in rows]}
    columns.update({name: [r[3].get(name) for r in rows] for name in trec.METRICS})  # teacher: nDCG@10 alone
    return pa.Table.from_pydict(columns, schema=artifacts.EVALUATE_SCHEMA)


def primary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The primary evaluation of a ``metrics.json`` (``models``, ``delta``, ``counts``)."""
    return metrics["evaluations"][metrics["primary_evaluation"]]


def read_metrics(store: ArtifactStore) -> dict[str, Any] | None:
    """The ``metrics.json`` of the run's evaluate artifact, or None when there is no valid one."""
    artifact = store.load(STAGE)
    return beir_io.load_metrics(artifact.local_dir()) if artifact is not None else None


# --- what the run's report and plan ask of this stage -----------------------------------------------------

def settings(cfg: Any) -> str:
    e = cfg.evaluate
    held = (f"{e.heldout_fraction:.0%} of the queries held out (at most {e.heldout_max}, seed {e.heldout_seed})"
            if e.heldout_fraction > 0 and e.heldout_max > 0 else "no held-out queries")
    return ((f"qrels `{e.qrels}`" if e.qrels else "no qrels") + f"; {held}; promote {e.promote}"
            + (f" (min gain {e.min_gain:g})" if e.promote != "always" else "")
            + f"; paired tests at alpha {e.alpha:g}" + (f"; judge `{e.judge}`" if e.judge else ""))


def estimate(cfg: Any, n: int) -> StagePlan:
    """Every text the evaluation encodes is counted (per compared model: the corpus, the held-out and judged
    queries, both sides of the STS pairs) and the encoding is timed; the teacher's judging of the held-out pool,
    the clustering and the embedding map are timed on the calibration sample at the run's sizes. MTEB is named,
    untimed."""
    e = cfg.evaluate
    compared = 3 if cfg.pretrain.method != "none" else 2
    held = _planned_heldout(cfg, n)
    judged = len(beir_io.load_eval_set(*_paths(e)).queries) if e.qrels else 0
    sts = sum(1 for _ in iter_pairs(e.sts.path, "scored", e.sts.format, e.sts.columns.model_dump(),
                                    e.sts.score_max)) if e.sts is not None else 0
    texts = compared * (n + held + judged + 2 * sts)
    counted = [f"{n} passages"] + [f"{k} {what}" for k, what in ((held, "held-out queries"),
                                                                 (judged, "judged queries"),
                                                                 (2 * sts, "STS sentences")) if k]
    untimed = f"; untimed: MTEB {' '.join(e.mteb.tasks)} (can take far longer)" if e.mteb is not None else ""
    return StagePlan(texts, "texts", f"{compared} models x ({' + '.join(counted)}){_power(e, judged, held)}{untimed}",
                     measure=lambda resolved, passages: _calibrate(cfg, compared, n, held, resolved, passages))


def _power(e: EvaluateConfig, judged: int, held: int) -> str:
    """What the verdict can resolve: the smallest nDCG@10 gain its queries tell from noise (``significance``)."""
    from gplflow.tasks.significance import ASSUMED_SD, resolvable_gain

    n, what = (judged, "judged") if judged else (held, "held-out")
    if (gain := resolvable_gain(n, e.alpha)) is None:
        return "; no verdict: no judged or held-out queries"
    return (f"; the verdict resolves nDCG@10 gains above about ±{gain:.3f} with {n} {what} queries (alpha "
            f"{e.alpha:g}, 80% power, per-query sd {ASSUMED_SD} assumed; raise evaluate.heldout_max or "
            f"heldout_fraction for smaller gains)")


CALIBRATION_ITEMS = 1_000  # clustering is timed on at most this many items, and scaled to the run's


def _planned_heldout(cfg: Any, n: int) -> int:
    """The held-out queries the split will keep (at most: it holds out whole passages' queries)."""
    from gplflow.tasks.generate import planned_queries

    e = cfg.evaluate
    if not (cfg.uses_queries and e.heldout_fraction > 0 and e.heldout_max > 0):
        return 0
    used, qpp = planned_queries(cfg.generate, n)
    return min(e.heldout_max, int(e.heldout_fraction * used * qpp))


def _calibrate(cfg: Any, compared: int, n: int, held: int, resolved: dict[str, Any],
               passages: list[str]) -> Measured:
    """The encoding rate, and the seconds of the evaluators beside it, each run on the calibration passages'
    embeddings (tiled to the run's size) as many times as models are compared."""
    from gplflow.adapters import embedding_eval

    e = cfg.evaluate
    rate, emb = encode_timed(resolved["base"], passages, e.max_seq_length, e.batch_size)
    seconds, timed = 0.0, []
    if held and cfg.is_gpl:
        seconds += _judging_seconds(cfg, compared, n, held, resolved, passages)
        timed.append(f"judging {held} queries' pools")
    if (c := e.clustering) is not None:
        labels = read_labels(c.labels, c.id_column, c.label_column, c.format)
        items, k = min(n, len(labels), c.max_docs), len(set(labels.values()))
        size = min(items, CALIBRATION_ITEMS)
        points, names = _tiled(emb, size, c.seed), [f"label {i % k}" for i in range(size)]
        seconds += once_then_each(lambda: embedding_eval.cluster_scores(points, names, c.seed, c.min_cluster_size),
                                  compared) * items / size
        timed.append(f"clustering {items} items")
    if (m := e.embedding_map) is not None:
        shown = min(m.sample, n)
        size = shown + (held * shown // n if m.queries else 0)
        points = _tiled(emb, size, m.seed)
        with tempfile.TemporaryDirectory(prefix="gplflow-plan-") as scratch:
            seconds += once_then_each(lambda: embedding_eval.embedding_map(
                {"base": points}, ["passage"] * size, Path(scratch) / MAP_FILE, seed=m.seed), compared)
        timed.append(f"embedding map of {size} points")
    return Measured(rate, seconds, ", ".join(timed))


def _judging_seconds(cfg: Any, compared: int, n: int, held: int, resolved: dict[str, Any],
                     passages: list[str]) -> float:
    """The teacher measures on the held-out queries: at most, per query, its passage, the base's top candidates
    and every other model's top judge_depth scored (a cross-encoder), or those texts encoded once (a bi-encoder)."""
    e = cfg.evaluate
    pool = 1 + max(cfg.mine.negatives_per_query, e.judge_depth) + e.judge_depth * (compared - 1)
    kind, ref, length, batch = (("cross_encoder", e.judge, e.max_seq_length, e.batch_size) if e.judge else
                                (cfg.label.teacher, resolved[cfg.teacher_slot], cfg.label.max_seq_length,
                                 cfg.label.batch_size))
    per_text = kind == "bi_encoder"
    work = held + min(n, held * pool) if per_text else held * pool
    return work / score_rate(kind, ref, passages, length, batch, per_text=per_text,
                             normalize=not e.judge and cfg.label.bi_encoder_score == "cos_sim")


def _tiled(emb: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` rows made from ``emb``'s, repeated with a little noise (so no two are the same point)."""
    rows = np.resize(np.asarray(emb, dtype=np.float32), (size, emb.shape[1]))
    return rows + np.random.default_rng(seed).normal(0, 1e-3, rows.shape).astype(np.float32)


@stage_task("evaluate retrieval")
def evaluate_task(inputs: EvaluateInputs) -> str:
    artifact = run_evaluate(inputs)
    corpus = inputs.store.require(inputs.corpus.name)
    metrics = beir_io.load_metrics(artifact.local_dir())
    sets = ", ".join(f"{name} ({r['counts']['queries']} queries)" for name, r in metrics["evaluations"].items())
    create_table_artifact(key="evaluation", table=metrics_table(metrics, shown=trec.METRICS).records(),
                          description=f"Retrieval on {sets} over {corpus.rows} passages")
    log = get_run_logger()
    for name, results in metrics["evaluations"].items():
        log.info("%s: nDCG@10 base %.4f, adapted %.4f (%+.4f)", name, results["models"]["base"][trec.PRIMARY],
                 results["models"]["adapted"][trec.PRIMARY], results["delta"].get(trec.PRIMARY, float("nan")))
    log.info("promoted the %s model: %s", metrics["promotion"]["promoted"], metrics["promotion"]["reason"])
    return artifact.fingerprint
