"""Label: a fixed, seeded set of (query, positive, negative) triples scored once per distinct pair; with
``negatives_per_example`` n > 1, (query, positive, n negatives) examples instead.

The triples are drawn before anything is scored, from the union of every miner's negatives of a query
(duplicates across miners dropped, first occurrence kept; miners taken in name order), spread evenly over the
queries that have negatives: each gets floor(n/Q) or ceil(n/Q) triples, the seed choosing which get the extra
one. Within a query negatives are drawn without replacement; only a query that needs more triples than it has
negatives cycles through them again (a fresh shuffle per cycle, so each is used floor or ceil times). Queries
are sorted by id first, so the draw does not depend on the order the parts were written in.

With n > 1 negatives per example, each example's n negatives are distinct; only queries with at least n
negatives get examples, and a query that needs more negatives than it has draws each example's n from a fresh
shuffle. The artifact is then one row per example (``artifacts.TUPLES_SCHEMA``: list columns of the negatives and
their scores); with n = 1 it is the triples table, as before n existed.

Every distinct (query, passage) pair is then scored once, however many triples share it (a query's positive
recurs in each of its triples), and margin = score(q, pos) - score(q, neg) on raw teacher scores.

Counters: triples, queries (queries with triples), queries_without_negatives (skipped), cycled_queries
(queries that reuse negatives), distinct_pairs, scored_pairs. The manifest's ``diagnostics`` say whether the
teacher's margins look like a teacher's (``tasks/label_diagnostics.py``); a random-looking or uncalibrated
teacher is logged as a warning and listed in ``diagnostics.warnings``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger
from pydantic import Field

from gplflow.adapters import artifacts
from gplflow.adapters.errors import InputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.staging import sum_counters
from gplflow.adapters.store import ROW_GROUP_SIZE, Artifact
from gplflow.adapters.text import passage_texts
from gplflow.tasks.base import (
    AutoOrPositive,
    ModelUse,
    Progress,
    Ref,
    Seed,
    ShardJob,
    StageConfig,
    StageInputs,
    stage_task,
)
from gplflow.tasks.generate import planned_queries
from gplflow.tasks.label_diagnostics import label_diagnostics, summary_line
from gplflow.tasks.planning import StagePlan, score_rate

# torch, transformers, bm25s: loaded when a stage computes, not when a config is read
scoring = lazy("gplflow.adapters.scoring")

logger = logging.getLogger(__name__)

STAGE = artifacts.TRIPLES
CODE_VERSION = "label-1"
SCORE_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float32())])
DEFAULT_SHARD_SIZE = 10_000  # distinct pairs per shard


class LabelConfig(StageConfig):
    triples: AutoOrPositive = "auto"  # auto = train.steps x train.batch_size (the paper's rule)
    seed: Seed = 42
    teacher: Literal["cross_encoder", "bi_encoder"] = "cross_encoder"
    batch_size: int = Field(default=32, gt=0)
    max_seq_length: int = Field(default=350, gt=0)
    bi_encoder_score: Literal["dot", "cos_sim"] = "dot"  # bi_encoder teacher: cos_sim normalises first
    # negatives per training example: 1 = (query, positive, negative) triples (GPL); n > 1 = n-tuples for the
    # listwise losses (train.loss kl) and MarginMSE over n margins. At most mine.negatives_per_query.
    negatives_per_example: int = Field(default=1, gt=0)


def label_config(cfg: LabelConfig) -> dict[str, Any]:
    """The config part of the fingerprint: ``negatives_per_example`` only when above 1, so triples labelled before
    it existed keep their fingerprint."""
    return cfg.model_dump(mode="json", exclude={"negatives_per_example"} if cfg.negatives_per_example == 1 else None)


class TeacherModel(StageConfig):
    """The run's teacher as resolved, with labelling's settings, so whoever scores with it (the filter, the
    teacher-judged evaluation) gets the scores labelling would get."""

    kind: Literal["cross_encoder", "bi_encoder"]
    ref: str
    max_seq_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    normalize: bool = False

    @classmethod
    def of(cls, cfg: Any, models: dict[str, Any], **more: Any) -> Any:
        """The teacher of a run of ``cfg`` (a PipelineConfig) among its resolved ``models``."""
        lb = cfg.label
        return cls(kind=lb.teacher, ref=str(models[cfg.teacher_slot]), max_seq_length=lb.max_seq_length,
                   batch_size=lb.batch_size, normalize=lb.bi_encoder_score == "cos_sim", **more)

    def record(self) -> dict[str, Any]:
        """What labelling checks before it takes another stage's scores as its own (the model by content)."""
        return {"kind": self.kind, "signature": model_signature(self.ref), "max_seq_length": self.max_seq_length,
                "normalize": self.normalize}


def resolve_triples(cfg: LabelConfig, train_steps: int, train_batch_size: int) -> int:
    """How many triples to label: the configured count, or one per training example for ``auto``."""
    n = train_steps * train_batch_size if cfg.triples == "auto" else cfg.triples
    if n <= 0:
        raise ValueError(f"label.triples must be a positive integer or 'auto', got {n}")
    return n


class LabelInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What labelling reads: the training queries, their negatives and the corpus, scored by ``teacher``."""

    cfg: LabelConfig
    triples: int = Field(gt=0)  # resolved: label.triples, or train.steps x train.batch_size for 'auto'
    corpus: Ref
    queries: Ref  # the training queries (queries-train when some are held out)
    negatives: Ref
    teacher: str  # a loadable model reference
    shard_size: int = Field(default=DEFAULT_SHARD_SIZE, gt=0)  # distinct pairs per shard
    # queries-filtered, when the filter scored each (query, source passage) with this teacher: not scored again
    teacher_scores: Ref | None = None

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        config = {**label_config(self.cfg), "triples": self.triples}
        inputs = {"corpus": self.corpus.fingerprint, "queries": self.queries.fingerprint,
                  "negatives": self.negatives.fingerprint,
                  "teacher": model_signature(self.teacher)}  # by content: a teacher replaced in place labels anew
        if self.teacher_scores is not None:
            inputs["teacher_scores"] = self.teacher_scores.fingerprint
        return config, inputs


class RoundLabelInputs(LabelInputs):
    """Labelling a re-mining round's negatives (``train.remine_every``, tasks/remine.py): published as
    ``triples-round-<r>``; the pairs an earlier round's labels (``prior``) hold keep their scores, so the teacher
    scores only the new ones."""

    round: int = Field(ge=2)
    prior: tuple[Ref, ...] = ()

    @property
    def artifact(self) -> str:  # type: ignore[override]
        return artifacts.round_artifact(STAGE, self.round)

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        config, inputs = super().fingerprint_parts()
        return config, {**inputs, **{f"prior:{ref.name}": ref.fingerprint for ref in self.prior}}


@dataclass(frozen=True)
class Pool:
    """Queries sorted by id, each with its positive and its deduplicated negatives (rows of the corpus)."""

    query_ids: pa.Array  # sorted
    query_texts: list[str]
    doc_ids: pa.Array  # the corpus' doc_id column; doc indices below are rows of it
    positives: np.ndarray  # doc index per query
    offsets: np.ndarray  # negatives of query i: negatives[offsets[i]:offsets[i + 1]]
    negatives: np.ndarray  # doc indices, grouped by query


def run_label(inputs: LabelInputs, on_progress: Progress | None = None) -> Artifact:
    """Draw the triples, score their distinct pairs with the teacher (shard by shard), publish ``triples/``.

    ``on_progress(n)`` is told of pairs scored, a shard at a time.
    """
    return LabelJob(inputs).result(on_progress)


class LabelJob(ShardJob):
    """Labelling cut into shards of ``shard_size`` distinct (query, passage) pairs, in sorted pair order.

    The triples are drawn up front (cheap, seeded); shard k scores pairs [k*size, (k+1)*size) of those still to
    score (``pending``: the filter's teacher scores, when given, stand for theirs) and stages (query_id, doc_id,
    score). Publishing maps the scores back onto the triples.
    """

    def __init__(self, inputs: LabelInputs):
        super().__init__(inputs, inputs.shard_size)
        self.cfg = inputs.cfg
        self.corpus = inputs.load(inputs.corpus)
        self._sources = (inputs.load(inputs.queries), inputs.load(inputs.negatives), inputs.triples)
        self._draw: _Draw | None = None
        self._known: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: np.ndarray | None = None
        self._scorer: scoring.PairScorer | None = None

    @property
    def draw(self) -> _Draw:
        if self._draw is None:
            queries, negatives, n_triples = self._sources
            self._draw = _Draw.make(load_pool(self.corpus, queries, negatives), n_triples, self.cfg.seed,
                                    self.cfg.negatives_per_example)
        return self._draw

    @property
    def known(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``draw.keys``, scores) of the pairs already scored by this teacher: by the filter, or by an
        earlier round's labels (``RoundLabelInputs.prior``); none without them."""
        if self._known is None:
            ref = self.inputs.teacher_scores
            found = [] if ref is None else [known_scores(self.inputs.load(ref), self.inputs, self.draw)]
            found += [prior_scores(self.inputs.load(prior), self.inputs, self.draw)
                      for prior in getattr(self.inputs, "prior", ())]
            at = np.concatenate([np.empty(0, np.int64), *(a for a, _ in found)])
            scores = np.concatenate([np.empty(0, np.float32), *(s for _, s in found)])
            at, first = np.unique(at, return_index=True)  # a pair two sources hold: the first source's score
            self._known = (at, scores[first])
        return self._known

    @property
    def pending(self) -> np.ndarray:
        """The distinct pairs (sorted keys) the teacher scores here."""
        if self._pending is None:
            self._pending = np.delete(self.draw.keys, self.known[0])
        return self._pending

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.pending) / self.shard_size)

    @property
    def work(self) -> int:
        """Distinct (query, passage) pairs to score."""
        return len(self.pending)

    def shard_work(self, k: int) -> int:
        return len(self.pending[k * self.shard_size : (k + 1) * self.shard_size])

    def plan(self) -> dict[str, Any]:
        plan = {"n_shards": self.n_shards, "shard_size": self.shard_size, "distinct_pairs": len(self.pending)}
        return {**plan, "reused_pairs": len(self.known[0])} if len(self.known[0]) else plan

    def run_shard(self, k: int) -> dict[str, Any]:
        started = time.time()
        draw = self.draw
        keys = self.pending[k * self.shard_size : (k + 1) * self.shard_size]
        n_docs = len(draw.pool.doc_ids)
        pair_q, pair_d = keys // n_docs, keys % n_docs
        used_docs = np.unique(pair_d)
        if self._scorer is None:
            cfg = self.cfg
            self._scorer = scoring.load_scorer(cfg.teacher, self.inputs.teacher, max_seq_length=cfg.max_seq_length,
                                               batch_size=cfg.batch_size, normalize=cfg.bi_encoder_score == "cos_sim")
        logger.info("label shard %d: scoring %d distinct pairs with %s", k, len(keys), self.inputs.teacher)
        scores = self._scorer.score(draw.pool.query_texts, _passages(self.corpus, used_docs), pair_q,
                                    np.searchsorted(used_docs, pair_d))
        table = pa.table({"query_id": draw.pool.query_ids.take(pa.array(pair_q)),
                          "doc_id": draw.pool.doc_ids.take(pa.array(pair_d)),
                          "score": pa.array(scores, pa.float32())}, schema=SCORE_SCHEMA)
        record = self.staging.write_parquet(k, [table], SCORE_SCHEMA, {"scored_pairs": len(keys)}, started)
        self.advance(len(keys))
        return record

    def publish(self) -> Artifact:
        records = self.done_records()
        draw, scores = self.draw, self._staged_scores()
        tq, pos, neg, per = draw.tq, draw.pos, draw.neg, draw.per
        pos_score, neg_score = scores[draw.inverse[: len(tq)]], scores[draw.inverse[len(tq) :]].reshape(neg.shape)
        with self.store.writer(self.stage, config=self.config, inputs=self.input_fps,
                               code_version=CODE_VERSION) as out:
            if per == 1:
                out.write_part(_batches(draw.pool, tq, pos, neg[:, 0], pos_score, neg_score[:, 0]),
                               artifacts.TRIPLES_SCHEMA)
            else:
                out.write_part(_tuple_batches(draw.pool, tq, pos, neg, pos_score, neg_score), artifacts.TUPLES_SCHEMA)
                out.extra["negatives_per_example"] = per
            sizes = np.diff(draw.pool.offsets)
            counts = np.bincount(tq, minlength=len(sizes))
            out.count("triples" if per == 1 else "examples", len(tq))
            out.count("queries", int(np.count_nonzero(counts)))
            out.count("queries_without_negatives", int(np.count_nonzero(sizes == 0)))
            if per > 1:
                out.count("queries_with_too_few_negatives", int(np.count_nonzero((sizes > 0) & (sizes < per))))
            out.count("cycled_queries", int(np.count_nonzero(counts * per > sizes)))
            out.count("distinct_pairs", len(draw.keys))
            out.count("scored_pairs", sum_counters(records).get("scored_pairs", 0))
            if len(self.known[0]):
                out.count("reused_pairs", len(self.known[0]))  # scored by the filter or an earlier round
            out.extra["teacher"] = {"kind": self.cfg.teacher, "ref": self.inputs.teacher}
            out.extra["diagnostics"] = diagnostics = label_diagnostics(tq, pos_score, neg_score)
            out.extra["shards"] = self.shard_summary(records)
        self.staging.remove()
        artifact = self.store.require(self.stage)
        logger.info("labelled %d %s over %d distinct pairs (%s); %s", artifact.rows,
                    "triples" if per == 1 else "examples", len(draw.keys),
                    artifact.counters, summary_line(diagnostics))
        for warning in diagnostics["warnings"]:
            logger.warning("label: %s", warning)
        return artifact

    def _staged_scores(self) -> np.ndarray:
        """Every drawn pair's score in pair order: the staged ones, checked against the pairs this job scores, and
        the filter's."""
        draw, pending = self.draw, self.pending
        n_docs = len(draw.pool.doc_ids)
        expect_q = draw.pool.query_ids.take(pa.array(pending // n_docs))
        expect_d = draw.pool.doc_ids.take(pa.array(pending % n_docs))
        tables = [self.staging.read_table(k) for k in range(self.n_shards)]
        table = pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
        if (table.num_rows != len(pending) or not table.column("query_id").combine_chunks().equals(expect_q)
                or not table.column("doc_id").combine_chunks().equals(expect_d)):
            raise RuntimeError(f"{self.staging.url}: the staged scores are not those of this run's pairs; "
                               "delete the folder and rerun")
        scores = np.empty(len(draw.keys), dtype=np.float32)
        scores[np.delete(np.arange(len(draw.keys)), self.known[0])] = table.column("score").to_numpy()
        scores[self.known[0]] = self.known[1]
        return scores


@dataclass(frozen=True)
class _Draw:
    """The drawn examples (query, positive and negative rows: ``neg`` is examples x negatives per example) and
    their distinct pairs (sorted keys)."""

    pool: Pool
    tq: np.ndarray
    pos: np.ndarray
    neg: np.ndarray  # (examples, per)
    keys: np.ndarray  # distinct query * n_docs + doc, sorted
    inverse: np.ndarray  # keys[inverse] = the (q, pos) pair of every example, then its (q, neg) pairs row by row

    @property
    def per(self) -> int:
        return int(self.neg.shape[1])

    @classmethod
    def make(cls, pool: Pool, n_examples: int, seed: int, per: int = 1) -> _Draw:
        tq, at = draw_examples(np.diff(pool.offsets), n_examples, seed, per)
        neg = pool.negatives[pool.offsets[tq][:, None] + at]
        pos = pool.positives[tq]
        n_docs = len(pool.doc_ids)
        pairs = np.concatenate([tq * n_docs + pos, (tq[:, None] * n_docs + neg).ravel()])
        keys, inverse = np.unique(pairs, return_inverse=True)
        return cls(pool, tq, pos, neg, keys, inverse)


def known_scores(filtered: Artifact, inputs: LabelInputs, draw: _Draw) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ``draw.keys``, scores) of the (query, positive) pairs whose teacher score ``queries-filtered``
    holds; an error when this teacher did not make them (never mix two teachers' scores)."""
    cfg, made = inputs.cfg, filtered.manifest.get("teacher") or {}
    ours = {"kind": cfg.teacher, "signature": model_signature(inputs.teacher), "max_seq_length": cfg.max_seq_length,
            "normalize": cfg.bi_encoder_score == "cos_sim"}
    if {key: made.get(key) for key in ours} != ours:
        raise InputError(f"{filtered.url}: its teacher scores were made by {made.get('kind')} {made.get('ref')} "
                         f"(max_seq_length {made.get('max_seq_length')}), not by this run's teacher {cfg.teacher} "
                         f"{inputs.teacher} (max_seq_length {cfg.max_seq_length}); they cannot stand for its scores")
    table = filtered.read_table(["query_id", "teacher_score"])
    pool, keys, n_docs = draw.pool, draw.keys, len(draw.pool.doc_ids)
    row = pc.fill_null(pc.index_in(pool.query_ids, value_set=table.column("query_id").combine_chunks()), -1)
    row = row.to_numpy(zero_copy_only=False)
    score = table.column("teacher_score").to_numpy(zero_copy_only=False).astype(np.float32)
    query = np.flatnonzero(row >= 0)
    query = query[~np.isnan(score[row[query]])]
    wanted = query * n_docs + pool.positives[query]
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    drawn = keys[at] == wanted  # a query with no triple has no positive pair to score
    return at[drawn], score[row[query[drawn]]]


def prior_scores(prior: Artifact, inputs: LabelInputs, draw: _Draw) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ``draw.keys``, scores) of the pairs an earlier round's labels (``triples/`` or a round's)
    scored; an error when another teacher made them."""
    made, ours = prior.manifest.get("teacher") or {}, {"kind": inputs.cfg.teacher, "ref": inputs.teacher}
    if {key: made.get(key) for key in ours} != ours:
        raise InputError(f"{prior.url}: labelled by {made.get('kind')} {made.get('ref')}, not by this run's teacher "
                         f"{inputs.cfg.teacher} {inputs.teacher}; its scores cannot stand for this teacher's")
    n = artifacts.negatives_per_example(prior.manifest)
    negatives = ["neg_doc_ids", "neg_scores"] if n > 1 else ["neg_doc_id", "neg_score"]
    table = prior.read_table(["query_id", "pos_doc_id", "pos_score", *negatives])
    q_ids, neg_ids, neg_scores = (table.column(c).combine_chunks() for c in ("query_id", *negatives))
    neg_q = q_ids
    if n > 1:
        neg_q = q_ids.take(pc.list_parent_indices(neg_ids))
        neg_ids, neg_scores = pc.list_flatten(neg_ids), pc.list_flatten(neg_scores)
    scores = [table.column("pos_score").to_numpy(), neg_scores.to_numpy(zero_copy_only=False)]
    return _positions(draw, pa.concat_arrays([q_ids, neg_q]),
                      pa.concat_arrays([table.column("pos_doc_id").combine_chunks(), neg_ids]),
                      np.concatenate(scores).astype(np.float32))


def _positions(draw: _Draw, query_ids: pa.Array, doc_ids: pa.Array,
               scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ``draw.keys``, scores) of the given (query, doc) pairs that the draw holds."""
    pool, keys, n_docs = draw.pool, draw.keys, len(draw.pool.doc_ids)
    q = pc.fill_null(pc.index_in(query_ids, value_set=pool.query_ids), -1).to_numpy(zero_copy_only=False)
    d = pc.fill_null(pc.index_in(doc_ids, value_set=pool.doc_ids), -1).to_numpy(zero_copy_only=False)
    ok = (q >= 0) & (d >= 0)
    wanted = q[ok].astype(np.int64) * n_docs + d[ok]
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    drawn = keys[at] == wanted if len(keys) else np.zeros(len(wanted), bool)
    return at[drawn], np.asarray(scores, np.float32)[ok][drawn]


def load_pool(corpus: Artifact, queries: Artifact, negatives: Artifact) -> Pool:
    """Map every id to a corpus row and every negatives row to its query; ids that do not resolve are errors."""
    doc_ids = corpus.read_table(["doc_id"]).column("doc_id").combine_chunks()
    qtable = queries.read_table(["query_id", "doc_id", "text"]).sort_by("query_id")
    query_ids = qtable.column("query_id").combine_chunks()
    if pc.count_distinct(query_ids).as_py() != len(query_ids):
        dup = pc.filter(query_ids[1:], pc.equal(query_ids[:-1], query_ids[1:]))[0]
        raise InputError(f"{queries.url}: query_id {dup} occurs more than once")
    positives = _rows_of(qtable.column("doc_id"), doc_ids, f"{queries.url}: positive doc_id")
    offsets, negs = _negatives(negatives, query_ids, doc_ids, positives)
    return Pool(query_ids, qtable.column("text").to_pylist(), doc_ids, positives, offsets, negs)


def _rows_of(values: pa.Array | pa.ChunkedArray, value_set: pa.Array, what: str) -> np.ndarray:
    """Index of each value in `value_set`; a value it lacks is an error naming `what`."""
    index = pc.index_in(values, value_set=value_set)
    if index.null_count:
        missing = pc.filter(values, pc.is_null(index))[0]
        raise InputError(f"{what} {missing} is not known (not in the artifact it refers to)")
    return index.to_numpy(zero_copy_only=False).astype(np.int64)


def _negatives(
    negatives: Artifact, query_ids: pa.Array, doc_ids: pa.Array, positives: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query union of every miner's negatives, first occurrence kept, positives dropped."""
    table = negatives.read_table(["query_id", "retriever", "doc_ids"])
    table = table.sort_by([("query_id", "ascending"), ("retriever", "ascending")])
    row_query = _rows_of(table.column("query_id"), query_ids, f"{negatives.url}: query_id")
    lists = table.column("doc_ids").combine_chunks()
    flat = pc.list_flatten(lists)
    query = row_query[pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)]
    doc = _rows_of(flat, doc_ids, f"{negatives.url}: negative doc_id")
    keep = doc != positives[query]
    query, doc = query[keep], doc[keep]
    _, first = np.unique(query * len(doc_ids) + doc, return_index=True)
    first.sort()  # rows are sorted by query, so this keeps them grouped, in first-occurrence order
    query, doc = query[first], doc[first]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(query, minlength=len(query_ids)))])
    return offsets, doc


def draw_triples(sizes: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n triples as (query index, position among that query's negatives), spread evenly, seeded.

    Queries with no negatives (size 0) get none. A query that needs more triples than it has negatives
    cycles through fresh shuffles of them.
    """
    rng = np.random.default_rng(seed)
    eligible, counts = _spread(rng, sizes > 0, n)
    if eligible.size == 0:
        raise InputError("label: no query has any negative; run the mine stage first (or check its output)")
    picks = [_pick(rng, int(sizes[q]), int(k)) for q, k in zip(eligible, counts, strict=True) if k]
    return np.repeat(eligible, counts), np.concatenate(picks)


def draw_examples(sizes: np.ndarray, n: int, seed: int, per: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """n examples as (query index, positions among that query's negatives: n x ``per``), seeded; ``per`` = 1 is
    ``draw_triples``. With ``per`` > 1 only queries with at least ``per`` negatives get examples, spread evenly as
    triples are, and an example's negatives are distinct: drawn without replacement over the query's examples while
    they last, else each example's from a fresh shuffle."""
    if per == 1:
        query, at = draw_triples(sizes, n, seed)
        return query, at[:, None]
    rng = np.random.default_rng(seed)
    eligible, counts = _spread(rng, sizes >= per, n)
    if eligible.size == 0:
        raise InputError(f"label: no query has {per} negatives (label.negatives_per_example); the most any query "
                         f"has is {int(np.max(sizes, initial=0))}: mine more (mine.negatives_per_query) or ask fewer")
    picks = [_pick_rows(rng, int(sizes[q]), int(k), per) for q, k in zip(eligible, counts, strict=True) if k]
    return np.repeat(eligible, counts), np.concatenate(picks)


def _spread(rng: np.random.Generator, eligible: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(eligible query indices, examples each): n spread evenly, the seed choosing who gets one more."""
    eligible = np.flatnonzero(eligible)
    if eligible.size == 0:
        return eligible, eligible
    base, extra = divmod(n, eligible.size)
    counts = np.full(eligible.size, base, dtype=np.int64)
    counts[rng.choice(eligible.size, size=extra, replace=False)] += 1
    return eligible, counts


def _pick_rows(rng: np.random.Generator, size: int, k: int, per: int) -> np.ndarray:
    """k rows of ``per`` distinct positions among ``size``."""
    if k * per <= size:
        return rng.choice(size, size=k * per, replace=False).reshape(k, per)
    return rng.random((k, size)).argsort(axis=1)[:, :per]


def _pick(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    if k <= size:
        return rng.choice(size, size=k, replace=False)
    return np.concatenate([rng.permutation(size) for _ in range(math.ceil(k / size))])[:k]


def _passages(corpus: Artifact, rows: np.ndarray) -> list[str]:
    """Passage texts of the given (sorted) corpus rows, streamed so only these texts are held."""
    out: list[str] = []
    start = 0
    for batch in corpus.iter_batches(["title", "text"]):
        end = start + batch.num_rows
        lo, hi = np.searchsorted(rows, [start, end])
        if hi > lo:
            out.extend(passage_texts(batch.take(pa.array(rows[lo:hi] - start))))
        start = end
    return out


def _batches(
    pool: Pool, tq: np.ndarray, pos: np.ndarray, neg: np.ndarray, pos_score: np.ndarray, neg_score: np.ndarray
) -> Iterator[pa.RecordBatch]:
    for start in range(0, len(tq), ROW_GROUP_SIZE):
        part = slice(start, start + ROW_GROUP_SIZE)
        yield pa.RecordBatch.from_arrays(
            [
                pool.query_ids.take(pa.array(tq[part])),
                pool.doc_ids.take(pa.array(pos[part])),
                pool.doc_ids.take(pa.array(neg[part])),
                pa.array(pos_score[part], pa.float32()),
                pa.array(neg_score[part], pa.float32()),
                pa.array(pos_score[part] - neg_score[part], pa.float32()),
            ],
            schema=artifacts.TRIPLES_SCHEMA,
        )


def _tuple_batches(
    pool: Pool, tq: np.ndarray, pos: np.ndarray, neg: np.ndarray, pos_score: np.ndarray, neg_score: np.ndarray
) -> Iterator[pa.RecordBatch]:
    per = neg.shape[1]
    for start in range(0, len(tq), ROW_GROUP_SIZE):
        part = slice(start, start + ROW_GROUP_SIZE)
        rows = len(tq[part])
        offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * per)
        yield pa.RecordBatch.from_arrays(
            [
                pool.query_ids.take(pa.array(tq[part])),
                pool.doc_ids.take(pa.array(pos[part])),
                pa.ListArray.from_arrays(offsets, pool.doc_ids.take(pa.array(neg[part].ravel()))),
                pa.array(pos_score[part], pa.float32()),
                pa.ListArray.from_arrays(offsets, pa.array(neg_score[part].ravel(), pa.float32())),
            ],
            schema=artifacts.TUPLES_SCHEMA,
        )


# --- what the run's report, checks and plan ask of this stage ---------------------------------------------

def settings(cfg: Any) -> str:
    lb = cfg.label
    per = lb.negatives_per_example
    what = f"{cfg.n_triples} triples" if per == 1 else f"{cfg.n_triples} examples of {per} negatives"
    return f"{what} ({lb.triples}), {lb.teacher} teacher, seed {lb.seed}"


def planned_pairs(cfg: Any, n: int) -> tuple[int, int]:
    """(distinct pairs, training queries) labelling scores for a corpus of n passages: each query's positive
    once, and each example's negatives, up to the most distinct negatives a query can have (every miner's top
    ``mine.negatives_per_query``, if they never overlap)."""
    used, qpp = planned_queries(cfg.generate, n)
    examples, queries = cfg.n_triples, used * qpp
    miners = len(cfg.models.retrievers) + (1 if cfg.mine.bm25 else 0)
    negatives = min(examples * cfg.label.negatives_per_example, queries * max(1, miners) * cfg.mine.negatives_per_query)
    return negatives + min(examples, queries), queries


def models_used(cfg: Any) -> list[ModelUse]:
    """The teacher, under the key that names it (a bi-encoder teacher defaults to the first retriever)."""
    models = cfg.models
    if cfg.label.teacher == "cross_encoder":
        key = "models.cross_encoder"
    elif models.bi_encoder_teacher:
        key = "models.bi_encoder_teacher"
    else:
        key = "models.retrievers.0.name" if models.retrievers else "models.base"
    return [ModelUse(key, cfg.teacher_ref, f"teacher ({cfg.label.teacher.replace('_', '-')})", cfg.teacher_slot)]


def estimate(cfg: Any, n: int) -> StagePlan:
    lb, triples = cfg.label, cfg.n_triples
    pairs, queries = planned_pairs(cfg, n)
    per = lb.negatives_per_example
    what = f"{triples} triples" if per == 1 else f"{triples} examples x {per} negatives"
    detail = f"{what}, about {pairs} distinct pairs for the {lb.teacher} teacher"

    def measure(resolved: dict[str, Any], passages: list[str]) -> float:
        # a bi-encoder teacher encodes each distinct text once: its work is counted in texts
        return score_rate(lb.teacher, resolved[cfg.teacher_slot], passages, lb.max_seq_length, lb.batch_size,
                          normalize=lb.bi_encoder_score == "cos_sim", per_text=lb.teacher != "cross_encoder")

    if lb.teacher == "cross_encoder":
        return StagePlan(pairs, "pairs", detail, measure=measure)
    texts = min(triples, queries) + n  # each distinct text is encoded once: the queries with triples, every passage
    return StagePlan(texts, "texts", f"{detail}: at most {texts} texts encoded", measure=measure)

@stage_task("pseudo-label triples")
def label_task(inputs: LabelInputs) -> str:
    job = LabelJob(inputs)
    per = inputs.cfg.negatives_per_example
    examples = f"{inputs.triples} triples" if per == 1 else f"{inputs.triples} examples of {per} negatives"
    artifact = job.run_reported("pseudo-label-triples", f"Scoring {job.work} distinct (query, passage) pairs of "
                                f"{examples} with the {inputs.cfg.teacher} teacher")
    log = get_run_logger()
    log.info("triples: %d labelled by %s %s (%s)", artifact.rows, inputs.cfg.teacher, inputs.teacher,
             artifact.counters)
    if diagnostics := artifact.manifest.get("diagnostics"):
        log.info("label diagnostics: %s", summary_line(diagnostics))
        for warning in diagnostics["warnings"]:
            log.warning("label: %s", warning)
    return artifact.fingerprint
