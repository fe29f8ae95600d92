"""Filter: drop the training queries a rule finds wanting, before they are mined, labelled and trained on.

Runs between the split and mining on the training queries only (``queries-train/``, or every query when none
are held out); the held-out queries stay as generated, so runs with and without filters are evaluated on the
same held-out set. Every rule is off by default and can be turned on alone. They apply in this order, each to
the queries the rules before it kept (cheap ones first, the models last):

1. length: fewer than ``min_words`` or more than ``max_words`` words (words: runs of letters and digits);
2. copy: at least ``max_overlap`` of the query's words occur in its source passage (``evaluate.token_overlap``:
   1.0 for an extractive span);
3. duplicates (``dedup``): ``exact`` drops a query whose words, lower-cased, equal those of a query kept before
   it (punctuation and spacing ignored); ``near`` also drops one whose word set has a Jaccard similarity of at
   least ``near_threshold`` with a kept one. Near pairs are found exactly, not sampled: a set-similarity join
   with prefix filtering (words in ascending corpus frequency; two sets that reach the threshold share a word
   among the first ``|x| - ceil(t|x|) + 1`` of each), every candidate verified. ``dedup_scope`` ``passage``
   compares the queries of a passage only, ``corpus`` every pair; the first in the artifact's order is kept;
4. log-prob: keep the top ``logprob_fraction`` by the generator's mean token log-prob (InPars);
5. round trip: keep a query only if its source passage is in the top ``round_trip_k`` of a retriever
   (Promptagator): the base model or one of the miners. The corpus is encoded here, once, with mining's encoding
   settings (mining runs after the filter, on what it keeps, so it has no embeddings to lend yet);
6. teacher: keep the top ``teacher_fraction`` by the run's teacher's raw score of (query, source passage)
   (InPars-v2). The scores are kept in the artifact, and labelling reuses them: no pair is scored twice.

A top fraction keeps ``ceil(fraction x n)`` of the n queries that reach the rule, by descending score, ties in
the artifact's order. Drops are counted by reason (``dropped_<reason>``), and the manifest keeps the first
``examples`` dropped queries of each reason.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from prefect import get_run_logger
from pydantic import Field, model_validator

from gplflow.adapters import artifacts
from gplflow.adapters.errors import InputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.store import Artifact
from gplflow.adapters.text import passage_texts
from gplflow.tasks.base import ModelUse, Ref, StageConfig, StageInputs, stage_task
from gplflow.tasks.evaluate import token_overlap
from gplflow.tasks.generate import planned_queries
from gplflow.tasks.label import TeacherModel
from gplflow.tasks.planning import StagePlan, encode_rate, score_rate

# torch, transformers, faiss: loaded when the stage computes, not when a config is read
encoding = lazy("gplflow.adapters.encoding")
model_io = lazy("gplflow.adapters.models")
scoring = lazy("gplflow.adapters.scoring")
vector_index = lazy("gplflow.adapters.vector_index")

logger = logging.getLogger(__name__)

STAGE = artifacts.QUERIES_FILTERED
SECTION = "filter"
CODE_VERSION = "filter-1"
QUERY_CHUNK = 50_000  # queries encoded and searched at a time in the round trip
_WORD = re.compile(r"\w+")

# drop reasons, in the order the rules apply
TOO_SHORT, TOO_LONG, COPY = "too_short", "too_long", "copies_passage"
DUP_PASSAGE, DUP_CORPUS = "duplicate_in_passage", "duplicate_across_corpus"
NEAR_PASSAGE, NEAR_CORPUS = "near_duplicate_in_passage", "near_duplicate_across_corpus"
LOW_LOGPROB, ROUND_TRIP, LOW_TEACHER = "low_logprob", "round_trip_miss", "low_teacher_score"
REASONS = (TOO_SHORT, TOO_LONG, COPY, DUP_PASSAGE, DUP_CORPUS, NEAR_PASSAGE, NEAR_CORPUS, LOW_LOGPROB, ROUND_TRIP,
           LOW_TEACHER)


class FilterConfig(StageConfig):
    """The ``filter:`` section: each rule off by default (None, or ``dedup: off``), each able to be on alone."""

    min_words: int | None = Field(default=None, ge=1)
    max_words: int | None = Field(default=None, ge=1)
    max_overlap: float | None = Field(default=None, gt=0, le=1)  # drop when this share of its words is in its passage
    dedup: Literal["off", "exact", "near"] = "off"
    dedup_scope: Literal["passage", "corpus"] = "corpus"
    near_threshold: float = Field(default=0.8, gt=0, le=1)  # dedup near: Jaccard similarity of the word sets
    logprob_fraction: float | None = Field(default=None, gt=0, le=1)
    round_trip_k: int | None = Field(default=None, ge=1)
    round_trip_retriever: str = "base"  # "base", or the name of one of models.retrievers
    teacher_fraction: float | None = Field(default=None, gt=0, le=1)
    examples: int = Field(default=3, ge=0)  # dropped queries the manifest keeps per reason

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words}): no query fits")
        return self

    def rules(self) -> list[str]:
        """The rules that are on, in the order they apply."""
        on = {"length": self.min_words is not None or self.max_words is not None,
              "copy": self.max_overlap is not None, "dedup": self.dedup != "off",
              "logprob": self.logprob_fraction is not None, "round_trip": self.round_trip_k is not None,
              "teacher": self.teacher_fraction is not None}
        return [rule for rule, found in on.items() if found]


RULE_KEYS = ("min_words", "max_words", "max_overlap", "dedup", "logprob_fraction", "round_trip_k", "teacher_fraction")


def active(cfg: FilterConfig) -> bool:
    return bool(cfg.rules())


class Encoder(StageConfig):
    """The round trip's retriever as resolved: a loadable model, its similarity and mining's encoding settings."""

    ref: str
    score: Literal["cos_sim", "dot"]
    max_seq_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"


class FilterInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What the filter reads: the training queries, the corpus, and the models of the rules that use one."""

    cfg: FilterConfig
    corpus: Ref
    queries: Ref  # queries-train (or queries when none are held out): never the held-out queries
    retriever: Encoder | None = None  # set when round_trip_k is
    teacher: TeacherModel | None = None  # set when teacher_fraction is

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The rules, and each model by content; batch sizes change no result and are left out."""
        config: dict[str, Any] = self.cfg.model_dump(mode="json")
        inputs = {"corpus": self.corpus.fingerprint, "queries": self.queries.fingerprint}
        for name, model in (("retriever", self.retriever), ("teacher", self.teacher)):
            if model is not None:
                config[name] = model.model_dump(mode="json", exclude={"ref", "batch_size"})
                inputs[name] = model_signature(model.ref)
        return config, inputs


# --- the registry's view: which models a run's rules use ----------------------------------------------------

def retriever_slot(cfg: Any) -> tuple[str, str]:
    """(resolved-models slot, similarity) of ``filter.round_trip_retriever`` in a PipelineConfig ``cfg``."""
    name = cfg.section(SECTION).round_trip_retriever
    if name == "base":
        return "base", cfg.train.similarity
    names = [r.name for r in cfg.models.retrievers]
    if name not in names:
        listed = ", ".join(repr(n) for n in names) or "none listed"
        raise InputError(f"'filter.round_trip_retriever': {name!r} is neither 'base' nor the name of one of "
                         f"models.retrievers ({listed})")
    i = names.index(name)
    return f"retrievers.{i}", cfg.models.retrievers[i].score


def encoder(cfg: Any, models: dict[str, Any]) -> Encoder | None:
    """The round trip's retriever resolved from the run's ``models`` (None when the rule is off)."""
    if cfg.section(SECTION).round_trip_k is None:
        return None
    slot, score = retriever_slot(cfg)
    name, _, i = slot.partition(".")
    ref = models[name][int(i)][0] if i else models[name]
    m = cfg.mine
    return Encoder(ref=str(ref), score=score, max_seq_length=m.max_seq_length, batch_size=m.batch_size, index=m.index)


def teacher(cfg: Any, models: dict[str, Any]) -> TeacherModel | None:
    """The run's teacher with labelling's settings (None when the teacher rule is off)."""
    if cfg.section(SECTION).teacher_fraction is None:
        return None
    return TeacherModel.of(cfg, models)


def problems(cfg: Any) -> list[tuple[str, str]]:
    """(key, problem) of the filter settings that do not fit the rest of ``cfg``: found before any stage runs."""
    f, found = cfg.section(SECTION), []
    if f.logprob_fraction is not None and cfg.generate.method != "llm":
        found.append(("filter.logprob_fraction", f"needs generate.method llm (the only generator that records "
                                                 f"log-probs), not {cfg.generate.method}"))
    if f.round_trip_k is not None:
        try:
            retriever_slot(cfg)
        except InputError as err:
            found.append(("filter.round_trip_retriever", str(err).split(": ", 1)[1]))
    return found


# --- the work ---------------------------------------------------------------------------------------------

class Dropped:
    """Which queries the rules dropped, by reason, with the first few of each kept as examples."""

    def __init__(self, n: int, examples: int):
        self.keep = np.ones(n, dtype=bool)
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[int]] = defaultdict(list)
        self.values: dict[int, float] = {}
        self._limit = examples

    def drop(self, i: int, reason: str, value: float | None = None) -> None:
        self.keep[i] = False
        self.counts[reason] += 1
        if len(self.examples[reason]) < self._limit:
            self.examples[reason].append(i)
            if value is not None:
                self.values[i] = value


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def run_filter(inputs: FilterInputs) -> Artifact:
    """Apply the rules that are on to the training queries and publish what they keep as ``queries-filtered/``."""
    if (found := inputs.reuse()) is not None:
        return found
    cfg = inputs.cfg
    queries = inputs.load(inputs.queries)
    table = queries.read_table()
    n = table.num_rows
    if n == 0:
        raise InputError(f"{queries.url}: no queries to filter")
    texts, docs = table.column("text").to_pylist(), table.column("doc_id").to_pylist()
    corpus = _Passages.read(inputs.load(inputs.corpus), docs, queries.url)
    out = Dropped(n, cfg.examples)
    scores: dict[str, np.ndarray] = {}
    if cfg.min_words is not None or cfg.max_words is not None:
        _length(texts, cfg, out)
    # the overlap is cheap, and a column of the artifact whether or not the copy rule is on
    scores["overlap"] = np.array([token_overlap(t, corpus.text(d)) for t, d in zip(texts, docs, strict=True)],
                                 dtype=np.float32)
    if cfg.max_overlap is not None:
        _copies(scores["overlap"], cfg.max_overlap, out)
    if cfg.dedup != "off":
        _duplicates(texts, docs, cfg, out)
    if cfg.logprob_fraction is not None:
        _top_fraction(_logprobs(table, queries.url), cfg.logprob_fraction, LOW_LOGPROB, out)
    extra: dict[str, Any] = {}
    if inputs.retriever is not None and cfg.round_trip_k is not None:
        scores["round_trip_rank"], extra["round_trip"] = _round_trip(inputs.retriever, cfg.round_trip_k, texts,
                                                                     docs, corpus, out)
    if inputs.teacher is not None and cfg.teacher_fraction is not None:
        scores["teacher_score"], extra["teacher"] = _teacher_scores(inputs.teacher, texts, docs, corpus, out)
        _top_fraction(scores["teacher_score"], cfg.teacher_fraction, LOW_TEACHER, out)
    return _publish(inputs, queries, table, out, scores, extra)


class _Passages:
    """The corpus passages the queries come from, read once: ``text(doc_id)``, ``rows`` of every passage."""

    def __init__(self, doc_ids: list[str], texts: list[str]):
        self.doc_ids, self.texts = doc_ids, texts
        self.row = {d: i for i, d in enumerate(doc_ids)}

    @classmethod
    def read(cls, corpus: Artifact, query_docs: list[str], where: str) -> _Passages:
        table = corpus.read_table(["doc_id", "title", "text"])
        found = cls(table.column("doc_id").to_pylist(), passage_texts(table))
        if missing := next((d for d in query_docs if d not in found.row), None):
            raise InputError(f"{where}: doc_id {missing!r} is not in the corpus ({corpus.url})")
        return found

    def text(self, doc_id: str) -> str:
        return self.texts[self.row[doc_id]]


def _length(texts: list[str], cfg: FilterConfig, out: Dropped) -> None:
    for i, text in enumerate(texts):
        count = len(words(text))
        if cfg.min_words is not None and count < cfg.min_words:
            out.drop(i, TOO_SHORT, count)
        elif cfg.max_words is not None and count > cfg.max_words:
            out.drop(i, TOO_LONG, count)


def _copies(overlap: np.ndarray, limit: float, out: Dropped) -> None:
    for i in np.flatnonzero(out.keep & (overlap >= limit - 1e-6)):  # float32 overlaps against the setting
        out.drop(int(i), COPY, float(overlap[i]))


def _duplicates(texts: list[str], docs: list[str], cfg: FilterConfig, out: Dropped) -> None:
    """Exact duplicates by their lower-cased words; with ``near``, word sets of Jaccard >= the threshold too."""
    across = cfg.dedup_scope == "corpus"
    tokens = [words(t) for t in texts]
    seen: dict[str, str] = {}  # normalised text -> the passage of the first query kept with it
    seen_in: set[tuple[str, str]] = set()
    for i in np.flatnonzero(out.keep):
        key, doc = " ".join(tokens[i]), docs[i]
        if (doc, key) in seen_in:
            out.drop(int(i), DUP_PASSAGE)
        elif across and key in seen:
            out.drop(int(i), DUP_CORPUS)
        else:
            seen_in.add((doc, key))
            seen.setdefault(key, doc)
    if cfg.dedup == "near":
        _near_duplicates([set(t) for t in tokens], docs, cfg.near_threshold, across, out)


def _near_duplicates(sets: list[set[str]], docs: list[str], t: float, across: bool, out: Dropped) -> None:
    """Drop each query whose word set is within Jaccard ``t`` of a query kept before it (prefix-filtered join)."""
    frequency = Counter(w for i in np.flatnonzero(out.keep) for w in sets[i])
    index: dict[tuple[str, str], list[int]] = defaultdict(list)  # (scope, word) -> kept queries with it in prefix
    for i in np.flatnonzero(out.keep):
        x = sets[i]
        if not x:
            continue
        ordered = sorted(x, key=lambda w: (frequency[w], w))
        prefix = ordered[: len(x) - math.ceil(t * len(x) - 1e-9) + 1]
        scope = "" if across else docs[i]
        matches = sorted(j for j in {j for w in prefix for j in index.get((scope, w), ())}
                         if _jaccard(x, sets[j]) >= t - 1e-9)
        if matches:
            j = next((j for j in matches if docs[j] == docs[i]), matches[0])  # a sibling counts as in-passage
            out.drop(int(i), NEAR_PASSAGE if docs[j] == docs[i] else NEAR_CORPUS, round(_jaccard(x, sets[j]), 4))
            continue
        for w in prefix:
            index[scope, w].append(int(i))


def _jaccard(x: set[str], y: set[str]) -> float:
    return len(x & y) / len(x | y)


def _logprobs(table: pa.Table, where: str) -> np.ndarray:
    """The mean token log-prob of each query, NaN where the generator gave none (ranked below every other)."""
    if "logprob" not in table.column_names or table.column("logprob").null_count == table.num_rows:
        raise InputError(f"{where}: no query has a log-prob (the generator or its server returned none); "
                         "unset filter.logprob_fraction")
    return table.column("logprob").to_numpy(zero_copy_only=False).astype(np.float64)


def _top_fraction(values: np.ndarray, fraction: float, reason: str, out: Dropped) -> None:
    """Keep the top ``ceil(fraction x n)`` of the n queries still kept, by descending value (NaN last), ties in
    order; drop the rest for ``reason``."""
    alive = np.flatnonzero(out.keep)
    keep = math.ceil(fraction * len(alive) - 1e-9)
    ranked = alive[np.lexsort((alive, np.nan_to_num(-values[alive], nan=np.inf)))]
    for i in np.sort(ranked[keep:]):  # in the artifact's order, as every rule drops
        out.drop(int(i), reason, None if np.isnan(values[i]) else float(values[i]))


def _round_trip(model: Encoder, k: int, texts: list[str], docs: list[str], corpus: _Passages,
                out: Dropped) -> tuple[np.ndarray, dict[str, Any]]:
    """Rank (1-based) of each query's source passage in the retriever's top ``k``; drop the queries it misses."""
    alive = np.flatnonzero(out.keep)
    ranks = np.full(len(texts), np.nan)
    if alive.size:
        bi_encoder = model_io.load_bi_encoder(model.ref, max_seq_length=model.max_seq_length, inference=True)
        normalize = model.score == "cos_sim"
        emb = encoding.encode(bi_encoder, corpus.texts, role="document", batch_size=model.batch_size,
                              normalize=normalize, desc="filter: encoding the corpus (round trip)",
                              setting="mine.batch_size")
        index = vector_index.VectorIndex(emb, score=model.score, kind=model.index, copy=False)
        del emb
        sources = np.array([corpus.row[d] for d in docs], dtype=np.int64)
        for start in range(0, alive.size, QUERY_CHUNK):
            part = alive[start : start + QUERY_CHUNK]
            q = encoding.encode(bi_encoder, [texts[i] for i in part], role="query", batch_size=model.batch_size,
                                normalize=normalize, desc="filter: encoding queries (round trip)",
                                show_progress=part.size > 1000, setting="mine.batch_size")
            _scores, ids = index.search(q, min(k, len(corpus.texts)))
            hit = ids == sources[part, None]
            ranks[part] = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, np.nan)
        index = bi_encoder = None
        encoding.release_memory()
    for i in alive[np.isnan(ranks[alive])]:
        out.drop(int(i), ROUND_TRIP)
    return ranks, {"retriever": model.ref, "k": k, "score": model.score, "encoded_passages": len(corpus.texts),
                   "encoded_queries": int(alive.size)}


def _teacher_scores(model: TeacherModel, texts: list[str], docs: list[str], corpus: _Passages,
                    out: Dropped) -> tuple[np.ndarray, dict[str, Any]]:
    """The teacher's raw score of (query, source passage) for each query still kept (NaN for the others)."""
    alive = np.flatnonzero(out.keep)
    scores = np.full(len(texts), np.nan)
    if alive.size:
        rows = np.unique([corpus.row[docs[i]] for i in alive])
        scorer = scoring.load_scorer(model.kind, model.ref, max_seq_length=model.max_seq_length,
                                     batch_size=model.batch_size, normalize=model.normalize)
        pair_p = np.searchsorted(rows, [corpus.row[docs[i]] for i in alive])
        found = scorer.score([texts[i] for i in alive], [corpus.texts[r] for r in rows], np.arange(alive.size),
                             pair_p)
        scores[alive] = found
        scorer = None
        encoding.release_memory()
    return scores, {**model.record(), "ref": model.ref, "scored_pairs": int(alive.size)}


def _publish(inputs: FilterInputs, queries: Artifact, table: pa.Table, out: Dropped, scores: dict[str, np.ndarray],
             extra: dict[str, Any]) -> Artifact:
    cfg, n = inputs.cfg, table.num_rows
    if not out.keep.any():
        raise InputError(f"filter: every one of the {n} training queries of {queries.url} was dropped "
                         f"({_reasons(out.counts)}); loosen the filter settings")
    logprob = "logprob" in table.column_names
    schema = artifacts.filtered_schema(logprob)
    keep = pa.array(out.keep)
    columns = [table.column(name).filter(keep) for name in artifacts.queries_schema(logprob).names]
    for field in artifacts.FILTER_SCORES:
        found = scores.get(field.name)
        values = None if found is None else found[out.keep]
        columns.append(pa.nulls(len(columns[0]), field.type) if values is None else
                       pa.array(np.nan_to_num(values), mask=np.isnan(values)).cast(field.type))
    texts, docs, ids = (table.column(c).to_pylist() for c in ("text", "doc_id", "query_id"))
    config, fps = inputs.fingerprint_parts()
    with inputs.store.writer(STAGE, config=config, inputs=fps, code_version=CODE_VERSION) as writer:
        writer.write_part([pa.Table.from_arrays(columns, schema=schema)], schema)
        writer.count("queries_in", n)
        writer.count("kept", int(out.keep.sum()))
        for reason in reasons(cfg):
            writer.count(f"dropped_{reason}", out.counts[reason])
        writer.extra["rules"] = cfg.rules()
        writer.extra["examples"] = {reason: [{"query_id": ids[i], "doc_id": docs[i], "text": texts[i],
                                              **({"value": out.values[i]} if i in out.values else {})}
                                             for i in found] for reason, found in out.examples.items() if found}
        writer.extra.update(extra)
    artifact = inputs.store.require(STAGE)
    logger.info("filter: kept %d of %d training queries (%s)", artifact.rows, n, _reasons(out.counts) or "none dropped")
    return artifact


def reasons(cfg: FilterConfig) -> list[str]:
    """The drop reasons of the rules that are on, in the order they apply."""
    length = [TOO_SHORT] * (cfg.min_words is not None) + [TOO_LONG] * (cfg.max_words is not None)
    by_rule = {"length": length, "copy": [COPY],
               "dedup": [DUP_PASSAGE, DUP_CORPUS] + ([NEAR_PASSAGE, NEAR_CORPUS] if cfg.dedup == "near" else []),
               "logprob": [LOW_LOGPROB], "round_trip": [ROUND_TRIP], "teacher": [LOW_TEACHER]}
    if cfg.dedup_scope == "passage":
        by_rule["dedup"] = [r for r in by_rule["dedup"] if not r.endswith("_corpus")]
    return [reason for rule in cfg.rules() for reason in by_rule[rule]]


def _reasons(counts: Counter[str] | dict[str, int]) -> str:
    """"too_short 13, round_trip_miss 80": the reasons in the order the rules apply (a manifest keeps them sorted)."""
    order = {reason: i for i, reason in enumerate(REASONS)}
    found = sorted((k.removeprefix("dropped_"), v) for k, v in counts.items() if v)
    return ", ".join(f"{reason} {count}" for reason, count in sorted(found, key=lambda rv: order.get(rv[0], 99)))


# --- what the run's report, CLI summary, checks and plan ask of this stage ------------------------------------

def summary_line(cfg: Any, manifest: dict[str, Any] | None) -> str | None:
    """"filter: kept 812 of 905 training queries; dropped round_trip_miss 80, too_short 13" (None when the run
    ``cfg`` filters nothing: a ``queries-filtered/`` left by an earlier config is not this run's)."""
    if not manifest or not active(cfg.section(SECTION)):
        return None
    counters = manifest.get("counters", {})
    dropped = {k.removeprefix("dropped_"): v for k, v in counters.items() if k.startswith("dropped_") and v}
    return (f"filter: kept {counters.get('kept')} of {counters.get('queries_in')} training queries; "
            + (f"dropped {_reasons(dropped)}" if dropped else "none dropped"))


def report_lines(cfg: Any, manifest: dict[str, Any] | None, inline: Callable[[str], str]) -> list[str]:
    """The report's section: the summary line, then examples of the dropped queries by reason (``inline`` makes
    a query's text safe for one line of markdown)."""
    line = summary_line(cfg, manifest)
    if line is None or manifest is None:
        return []
    out = ["## Filtered training queries", line[0].upper() + line[1:] + "."]
    for reason, found in manifest.get("examples", {}).items():
        out.append(f"- {reason}: " + "; ".join(
            f"“{inline(str(e['text']))}” ({inline(str(e['doc_id']))}"
            + (f", {e['value']:.4g}" if isinstance(e.get("value"), int | float) else "") + ")" for e in found))
    return out


def settings(cfg: Any) -> str:
    f = cfg.section(SECTION)
    parts = []
    if f.min_words is not None or f.max_words is not None:
        parts.append(f"{f.min_words or 1}-{f.max_words or '∞'} words")
    if f.max_overlap is not None:
        parts.append(f"copies (word overlap >= {f.max_overlap})")
    if f.dedup != "off":
        near = f" and near (Jaccard >= {f.near_threshold})" if f.dedup == "near" else ""
        parts.append(f"exact{near} duplicates within {'a passage' if f.dedup_scope == 'passage' else 'the corpus'}")
    if f.logprob_fraction is not None:
        parts.append(f"top {f.logprob_fraction:.0%} by log-prob")
    if f.round_trip_k is not None:
        parts.append(f"round trip: source in the top {f.round_trip_k} of {f.round_trip_retriever}")
    if f.teacher_fraction is not None:
        parts.append(f"top {f.teacher_fraction:.0%} by {cfg.label.teacher.replace('_', '-')} teacher score")
    return "; ".join(parts)


def models_used(cfg: Any) -> list[ModelUse]:
    f, found = cfg.section(SECTION), []
    if f.round_trip_k is not None and not problems(cfg):  # an unknown name is one of the run's problems
        slot, score = retriever_slot(cfg)
        key, ref = (("models.base", cfg.models.base) if slot == "base" else
                    (f"models.{slot}.name", cfg.models.retrievers[int(slot.split('.')[1])].name))
        found.append(ModelUse(key, ref, f"round-trip retriever (filter, {score})", slot))
    if f.teacher_fraction is not None:
        kind = cfg.label.teacher.replace("_", "-")
        key = ("models.cross_encoder" if cfg.teacher_slot == "cross_encoder" else
               "models.bi_encoder_teacher" if cfg.models.bi_encoder_teacher else
               "models.retrievers.0.name" if cfg.models.retrievers else "models.base")
        found.append(ModelUse(key, cfg.teacher_ref, f"filter teacher ({kind})", cfg.teacher_slot))
    return found


def estimate(cfg: Any, n: int) -> StagePlan:
    f = cfg.section(SECTION)
    used, qpp = planned_queries(cfg.generate, n)
    queries = used * qpp  # an upper bound: the held-out share is not taken off
    texts = n + queries if f.round_trip_k is not None else 0
    pairs = queries if f.teacher_fraction is not None else 0
    if not texts and not pairs:
        return StagePlan(queries, "queries", f"{settings(cfg)}: at most {queries} queries, no model")
    lb = cfg.label

    def measure(resolved: dict[str, Any], passages: list[str]) -> float:
        seconds = 0.0
        if texts:
            model = encoder(cfg, resolved)
            seconds += texts / encode_rate(model.ref, passages, model.max_seq_length, model.batch_size)
        if pairs:
            seconds += pairs / score_rate(lb.teacher, resolved[cfg.teacher_slot], passages, lb.max_seq_length,
                                          lb.batch_size, normalize=lb.bi_encoder_score == "cos_sim")
        return (texts + pairs) / seconds

    detail = " and ".join(filter(None, (f"{texts} texts encoded for the round trip" if texts else "",
                                        f"{pairs} pairs for the teacher" if pairs else "")))
    return StagePlan(texts + pairs, "texts+pairs", f"{settings(cfg)}: {detail}", measure=measure)


@stage_task("filter queries")
def filter_task(inputs: FilterInputs) -> str:
    artifact = run_filter(inputs)
    counters = artifact.counters
    get_run_logger().info("filter: kept %s of %s training queries (%s)", counters["kept"], counters["queries_in"],
                          _reasons({k: v for k, v in counters.items() if k.startswith("dropped_")}) or "none dropped")
    return artifact.fingerprint

