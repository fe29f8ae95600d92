"""Mine: hard negatives per query from dense retrievers (FAISS) and optionally BM25.

One row per (query, retriever): the top ``negatives_per_query`` passages in descending retriever score,
with the query's own passage (its positive) removed. Each dense retriever encodes the corpus once, then
the queries chunk by chunk, so a large query set never needs all its embeddings at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from prefect import get_run_logger
from pydantic import Field
from tqdm.auto import tqdm

from gplflow.adapters import artifacts
from gplflow.adapters.errors import InputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.store import Artifact
from gplflow.adapters.text import passage_texts
from gplflow.adapters.vector_index import VectorIndex
from gplflow.tasks.base import ModelUse, Progress, Ref, ShardJob, StageConfig, StageInputs, stage_task
from gplflow.tasks.generate import planned_queries
from gplflow.tasks.planning import StagePlan, encode_rate

# torch, transformers, bm25s: loaded when a stage computes, not when a config is read
models = lazy("gplflow.adapters.models")
bm25 = lazy("gplflow.adapters.bm25")
encoding = lazy("gplflow.adapters.encoding")

logger = logging.getLogger(__name__)

STAGE = artifacts.NEGATIVES
CODE_VERSION = "mine-1"
BM25 = "bm25"
SCORES = ("cos_sim", "dot")
DEFAULT_SHARD_SIZE = 10_000  # corpus passages per encoding shard
# where mine_task looks for the queries fingerprint (queries-train: the queries left after the held-out split)


class MineConfig(StageConfig):
    negatives_per_query: int = Field(default=50, gt=0)
    bm25: bool = False
    batch_size: int = Field(default=64, gt=0)
    max_seq_length: int = Field(default=350, gt=0)
    index: Literal["auto", "flat", "ivf", "hnsw"] = "auto"  # auto: see adapters/vector_index.py
    query_chunk: int = Field(default=50_000, gt=0)           # queries encoded and searched at a time
    extra_k: int = Field(default=4, ge=0)  # retrieve negatives_per_query + 1 + extra_k, then drop the positive


Retriever = tuple[str, str]  # (model reference, "cos_sim" | "dot")


def _checked(retrievers: Sequence[Sequence[str]], cfg: MineConfig) -> list[Retriever]:
    out = [(str(ref), str(score)) for ref, score in retrievers]
    for ref, score in out:
        if score not in SCORES:
            raise InputError(f"retriever {ref!r}: score must be one of {', '.join(SCORES)}, got {score!r}")
    refs = [ref for ref, _ in out] + ([BM25] if cfg.bm25 else [])
    if dupes := sorted({ref for ref in refs if refs.count(ref) > 1}):
        raise InputError(f"mine: retriever {dupes[0]!r} listed twice (each retriever gives one row per query)")
    if not refs:
        raise InputError("mine: no retrievers; list at least one in models.retrievers or set mine.bm25: true")
    return out


class MineInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What mining reads: the corpus, the training queries, and the dense retrievers as (model, score)."""

    cfg: MineConfig
    corpus: Ref
    queries: Ref  # the training queries (queries-train when some are held out)
    retrievers: tuple[tuple[str, str], ...]  # loadable model references and their similarity
    shard_size: int = Field(default=DEFAULT_SHARD_SIZE, gt=0)  # passages per shard of the corpus encoding

    def checked(self) -> list[Retriever]:
        return _checked(self.retrievers, self.cfg)

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The corpus, the queries and each retriever by content (a folder replaced in place mines anew)."""
        checked = self.checked()
        config = {**self.cfg.model_dump(mode="json"), "retrievers": [{"model": r, "score": s} for r, s in checked]}
        inputs = {"corpus": self.corpus.fingerprint, "queries": self.queries.fingerprint,
                  **{f"retriever:{k}": model_signature(ref) for k, (ref, _) in enumerate(checked)}}
        return config, inputs


@dataclass
class _Corpus:
    doc_ids: np.ndarray  # object array of str, so a matrix of positions maps to ids in one step
    texts: list[str]

    @classmethod
    def read(cls, corpus: Artifact) -> _Corpus:
        table = corpus.read_table(["doc_id", "title", "text"])
        if table.num_rows == 0:
            raise InputError(f"{corpus.url}: the corpus is empty; nothing to mine")
        return cls(np.array(table["doc_id"].to_pylist(), dtype=object), passage_texts(table))


def run_mine(inputs: MineInputs, on_progress: Progress | None = None) -> Artifact:
    """Mine negatives with every dense retriever (and BM25 when asked); publish one artifact.

    ``on_progress(n)`` is told of texts done: passages encoded, then queries encoded and searched.
    """
    return MineJob(inputs).result(on_progress)


class MineJob(ShardJob):
    """Mining, with the corpus encoding cut into shards: shard k = (dense retriever r, corpus slice c).

    Shard k = r * n_slices + c encodes corpus rows [c*size, (c+1)*size) with retriever r and stages the
    embeddings as ``.npy`` (never published). Publishing builds each retriever's index from its staged
    embeddings, searches the queries, and writes one part per retriever (BM25 last).
    """

    def __init__(self, inputs: MineInputs):
        self.retrievers = inputs.checked()
        super().__init__(inputs, inputs.shard_size)
        self.cfg, self.corpus, self.queries = inputs.cfg, inputs.load(inputs.corpus), inputs.load(inputs.queries)
        self.slices = math.ceil(self.corpus.rows / self.shard_size)
        self._docs: _Corpus | None = None
        self._model: tuple[str, Any] | None = None

    @property
    def n_shards(self) -> int:
        return len(self.retrievers) * self.slices

    @property
    def work(self) -> int:
        """Passages each dense retriever encodes, then queries each retriever (BM25 too) searches with."""
        miners = len(self.retrievers) + (1 if self.cfg.bm25 else 0)
        return len(self.retrievers) * self.corpus.rows + miners * self.queries.rows

    def shard_work(self, k: int) -> int:
        c = k % self.slices
        return min(self.shard_size, self.corpus.rows - c * self.shard_size)

    def plan(self) -> dict[str, Any]:
        return {"n_shards": self.n_shards, "shard_size": self.shard_size, "passages": self.corpus.rows,
                "retrievers": [ref for ref, _ in self.retrievers]}

    @property
    def docs(self) -> _Corpus:
        if self._docs is None:
            self._docs = _Corpus.read(self.corpus)
        return self._docs

    def run(self, on_progress: Progress | None = None) -> Artifact:
        if self.queries.rows == 0:
            raise InputError(f"{self.queries.url}: no queries; nothing to mine")
        try:
            return super().run(on_progress)
        finally:
            self._drop_model()

    def run_shard(self, k: int) -> dict[str, Any]:
        started = time.time()
        r, c = divmod(k, self.slices)
        ref, score = self.retrievers[r]
        texts = self.docs.texts[c * self.shard_size : (c + 1) * self.shard_size]
        emb = encoding.encode(self._load(ref), texts, role="document", batch_size=self.cfg.batch_size,
                     normalize=score == "cos_sim", desc=f"encoding corpus ({_short(ref)}) {c + 1}/{self.slices}",
                     setting="mine.batch_size", on_progress=self.advance)
        return self.staging.write_array(k, emb, {"encoded_passages": len(texts)}, started)

    def publish(self) -> Artifact:
        if self.queries.rows == 0:
            raise InputError(f"{self.queries.url}: no queries; nothing to mine")
        records = self.done_records()
        schema = artifacts.NEGATIVES_SCHEMA
        with self.store.writer(STAGE, config=self.config, inputs=self.input_fps, code_version=CODE_VERSION) as out:
            out.count("queries", self.queries.rows)
            names = []
            for r, (ref, score) in enumerate(self.retrievers):
                emb = np.concatenate([self.staging.read_array(r * self.slices + c) for c in range(self.slices)])
                out.write_part(_dense_batches(self.cfg, ref, score, emb, self._load(ref), self.docs,
                                              self._query_chunks(_short(ref)), out.count), schema)
                names.append(ref)
            self._drop_model()
            if self.cfg.bm25:
                out.write_part(_bm25_batches(self.cfg, self.docs, self._query_chunks(BM25), out.count), schema)
                names.append(BM25)
            out.count("retrievers", len(names))
            out.extra["retrievers"] = names
            out.extra["shards"] = self.shard_summary(records)
        self.staging.remove()
        artifact = self.store.require(STAGE)
        logger.info("mined negatives for %d queries with %s (%d short lists)", self.queries.rows, ", ".join(names),
                    artifact.counters.get("short_lists", 0))
        return artifact

    def _query_chunks(self, name: str) -> Iterator[pa.RecordBatch]:
        """The queries ``query_chunk`` at a time; each chunk counts as done once the next is asked for."""
        with tqdm(total=self.queries.rows, desc=f"mining ({name})", unit="query") as bar:
            for batch in self.queries.iter_batches(["query_id", "doc_id", "text"], batch_size=self.cfg.query_chunk):
                yield batch
                bar.update(batch.num_rows)
                self.advance(batch.num_rows)

    def _load(self, ref: str) -> Any:
        """The retriever ``ref``, kept loaded while consecutive shards use it."""
        if self._model is None or self._model[0] != ref:
            self._drop_model()
            self._model = (ref, models.load_bi_encoder(ref, max_seq_length=self.cfg.max_seq_length,
                                                            inference=True))
        return self._model[1]

    def _drop_model(self) -> None:
        if self._model is not None:
            self._model = None
            encoding.release_memory()


def _short(ref: str, width: int = 32) -> str:
    """A model reference short enough for a progress bar label."""
    return ref if len(ref) <= width else "…" + ref[-(width - 1):]


def _dense_batches(cfg: MineConfig, ref: str, score: str, emb: np.ndarray, model: Any, docs: _Corpus,
                   chunks: Iterator[pa.RecordBatch], count: Callable[[str, int], None]) -> Iterator[pa.RecordBatch]:
    """Index the corpus embeddings, then encode and search the queries chunk by chunk."""
    normalize = score == "cos_sim"
    index = VectorIndex(emb, score=score, kind=cfg.index, copy=False)  # type: ignore[arg-type]
    del emb  # the index holds its own copy
    try:
        k = cfg.negatives_per_query + 1 + cfg.extra_k
        for chunk in chunks:
            q = encoding.encode(model, chunk["text"].to_pylist(), role="query", batch_size=cfg.batch_size,
                       normalize=normalize, desc="encoding queries", show_progress=chunk.num_rows > 1000,
                       setting="mine.batch_size")
            scores, ids = index.search(q, k)
            yield _ranked(ref, chunk, scores, ids, docs.doc_ids, cfg.negatives_per_query, count)
    finally:
        index = None
        encoding.release_memory()


def _bm25_batches(cfg: MineConfig, docs: _Corpus, chunks: Iterator[pa.RecordBatch],
                  count: Callable[[str, int], None]) -> Iterator[pa.RecordBatch]:
    index = bm25.BM25Index(docs.texts)
    k = cfg.negatives_per_query + 1 + cfg.extra_k
    for chunk in chunks:
        scores, ids = index.search(chunk["text"].to_pylist(), k)
        ids[scores <= 0] = -1  # a passage sharing no term with the query is no hard negative
        yield _ranked(BM25, chunk, scores, ids, docs.doc_ids, cfg.negatives_per_query, count)


def _ranked(name: str, chunk: pa.RecordBatch, scores: np.ndarray, ids: np.ndarray, doc_ids: np.ndarray,
            n: int, count: Callable[[str, int], None]) -> pa.RecordBatch:
    """Rows of the top ``n`` hits per query, misses (-1) and the query's positive removed, order kept."""
    positives = np.array(chunk["doc_id"].to_pylist(), dtype=object)[:, None]
    candidates = doc_ids[np.where(ids >= 0, ids, 0)]
    keep = (ids >= 0) & (candidates != positives)
    keep &= np.cumsum(keep, axis=1) <= n
    lengths = keep.sum(axis=1)
    count("short_lists", int((lengths < n).sum()))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.RecordBatch.from_arrays([
        chunk["query_id"],
        pa.array([name] * chunk.num_rows, pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(candidates[keep].tolist(), pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array(scores[keep], pa.float32())),
    ], schema=artifacts.NEGATIVES_SCHEMA)


# --- what the run's report, checks and plan ask of this stage ---------------------------------------------

def settings(cfg: Any) -> str:
    m = cfg.mine
    return f"{m.negatives_per_query} negatives per query from each retriever{', and BM25' if m.bm25 else ''}"


def models_used(cfg: Any) -> list[ModelUse]:
    return [ModelUse(f"models.retrievers.{i}.name", r.name, f"miner ({r.score})", f"retrievers.{i}")
            for i, r in enumerate(cfg.models.retrievers)]


def estimate(cfg: Any, n: int) -> StagePlan:
    used, qpp = planned_queries(cfg.generate, n)
    dense, queries = len(cfg.models.retrievers), used * qpp
    miners = [r.name for r in cfg.models.retrievers] + (["bm25"] if cfg.mine.bm25 else [])
    return StagePlan(dense * (n + queries), "texts", f"{dense} dense retriever(s) x ({n} passages + "
                     f"{queries} queries), {cfg.mine.negatives_per_query} negatives from {', '.join(miners)}",
                     measure=lambda resolved, passages: _rate(cfg.mine, resolved, passages), sharded=dense * n)


def _rate(m: MineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Texts per second over all dense retrievers (the stage encodes the same texts with each)."""
    seconds_per_text = sum(1 / encode_rate(ref, passages, m.max_seq_length, m.batch_size)
                           for ref, _score in resolved["retrievers"]) / max(1, len(resolved["retrievers"]))
    return 1 / seconds_per_text

@stage_task("mine hard negatives")
def mine_task(inputs: MineInputs) -> str:
    job = MineJob(inputs)
    miners = len(job.retrievers) + (1 if inputs.cfg.bm25 else 0)
    artifact = job.run_reported("mine-hard-negatives", f"Encoding {job.corpus.rows} passages and mining "
                                f"{inputs.cfg.negatives_per_query} negatives for {job.queries.rows} queries with "
                                f"{miners} retriever(s)")
    get_run_logger().info("negatives: %d rows from %s (%s)", artifact.rows,
                          ", ".join(artifact.manifest.get("retrievers", [])), artifact.counters)
    return artifact.fingerprint
