"""Generate: pseudo-queries for every passage (T5 nucleus sampling, or extractive Inverse-Cloze spans).

Writes ``queries/`` (query_id, doc_id, text): the passage a query came from is its positive. The corpus is
worked through in shards of ``shard_size`` passages, one Parquet part per shard, so a later run can resume
shard by shard.

Determinism:
- query ids are ``f"{doc_id}-q{k}"``, k = 0, 1, … over the queries kept for that passage. Doc ids are unique
  and k is all digits, so the last ``-q`` in an id separates the two: ids are unique whatever a doc id holds.
- extractive: each passage draws from its own RNG seeded by (seed, hash of its doc id), so the rows depend
  neither on the shard size nor on the corpus order, and a passage keeps its queries when the corpus grows.
- t5: within a shard, passages are sorted by (token length, doc id) and cut into batches; batch b of shard s
  samples with a seed derived from (seed, s, b). Same seed + same shard size + same batch size (a number is in
  the fingerprint; ``auto`` is a per-device size, and CPU and CUDA sample differently anyway) give the
  same rows, whatever the corpus order inside a shard. The shard size is not in the fingerprint: a run with
  another shard size draws other, equally valid, samples and reuses the artifact.
- output order is always corpus order, then k.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from pydantic import Field
from tqdm.auto import tqdm

from gplflow.adapters import artifacts
from gplflow.adapters.errors import InputError, MissingInputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.staging import ShardStaging, sum_counters
from gplflow.adapters.store import Artifact, ArtifactStore
from gplflow.adapters.text import passage_text, split_sentences
from gplflow.tasks.base import (
    AutoOrPositive,
    Progress,
    Seed,
    ShardJob,
    StageConfig,
    retry_unless_deterministic,
    stage_cache,
    stage_fingerprint,
)

# torch, transformers, bm25s: loaded when a stage computes, not when a config is read
models = lazy("gplflow.adapters.models")
generation = lazy("gplflow.adapters.generation")
oom = lazy("gplflow.adapters.oom")

logger = logging.getLogger(__name__)

STAGE = artifacts.QUERIES
CODE_VERSION = "generate-2"  # 2: extractive queries cut by adapters/text.py split_sentences
DEFAULT_SHARD_SIZE = 10_000
AUTO_MIN_QPP = 3  # the paper's QPP for large corpora, and the least `auto` ever picks (as UKPLab gpl does)
T5_ONLY_FIELDS = ("batch_size", "top_k", "top_p", "max_query_length", "prefix")
SPAN_WORDS = (6, 16)  # extractive: a span of 6-16 words when a passage has fewer than two usable sentences
MIN_SENTENCE_WORDS = 3  # extractive: shorter sentences ("Fig. 3.") are not used as queries …
MIN_SENTENCE_CHARS = 15  # … unless long in characters (scripts written without spaces)
_U64 = 2**64
# Sampling is latency-bound (one decoder step per token for the whole batch), so the rate grows with the batch:
# on 2 CPU cores (T5-base, bf16) 64 passages per call ran 1.4x the rate of 32; on an H200, 32 / 128 / 256 gave
# 21 / 74 / 150 passages/s (benchmarks/README.md). A batch that does not fit is retried in halves.
AUTO_BATCH = {"cpu": 64, "cuda": 256}
SHARD_COUNTERS = ("duplicate_queries", "empty_passage", "empty_queries")  # counted per shard, then added up


class GenerateConfig(StageConfig):
    method: Literal["t5", "extractive"] = "t5"
    queries_per_passage: AutoOrPositive = "auto"
    target_queries: int = Field(default=250_000, gt=0)   # the paper's |corpus| x QPP budget for `auto`
    max_passages: int = Field(default=83_334, gt=0)      # above this, `auto` samples passages and uses QPP 3
    batch_size: AutoOrPositive = "auto"  # passages per generate call; auto: see AUTO_BATCH
    seed: Seed = 42
    top_k: int = Field(default=25, ge=0)  # 0: no top-k cut (transformers' meaning)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_query_length: int = Field(default=64, gt=0)     # tokens of a generated query
    max_passage_length: int = Field(default=350, gt=0)  # passage tokens given to the generator (extractive: words)
    prefix: str = ""                  # an optional prompt prefix put before every passage

    def batch_for(self, device: str) -> int:
        """Passages per ``generate`` call on ``device`` (``auto``: AUTO_BATCH)."""
        return AUTO_BATCH[device] if self.batch_size == "auto" else int(self.batch_size)


class Passage(NamedTuple):
    index: int  # position in the corpus
    doc_id: str
    title: str
    text: str


# (passages of one shard, shard number, progress callback) -> per passage: candidate queries, None if empty
QueryMaker = Callable[[list[Passage], int, Callable[[int], Any]], list[list[str] | None]]


def _fingerprint_parts(cfg: GenerateConfig, corpus_fp: str, generator: str) -> tuple[dict, dict]:
    """The config and inputs the fingerprint hashes; extractive runs ignore the generator and its settings."""
    config = cfg.model_dump(mode="json")
    if cfg.method == "extractive":
        config = {k: v for k, v in config.items() if k not in T5_ONLY_FIELDS}
        generator = ""
    return config, {"corpus": corpus_fp, "generator": model_signature(generator)}


def generate_fingerprint(cfg: GenerateConfig, corpus_fp: str, generator: str) -> str:
    config, inputs = _fingerprint_parts(cfg, corpus_fp, generator)
    return stage_fingerprint(STAGE, config, inputs, CODE_VERSION)


def queries_per_passage(cfg: GenerateConfig, n_passages: int) -> tuple[int, int | None]:
    """(QPP, sample size or None). An int QPP is used for every passage.

    ``auto`` follows UKPLab gpl: above ``max_passages`` passages, a seeded sample of ``max_passages`` with
    QPP 3; otherwise QPP = ceil(target_queries / n), never below 3 (1,000 passages: 250; 999: 251).
    """
    if n_passages < 1:
        raise InputError("generate: the corpus has no passages")
    if cfg.queries_per_passage != "auto":
        return int(cfg.queries_per_passage), None
    if n_passages > cfg.max_passages:
        return AUTO_MIN_QPP, cfg.max_passages
    return max(AUTO_MIN_QPP, math.ceil(cfg.target_queries / n_passages)), None


def run_generate(cfg: GenerateConfig, store: ArtifactStore, corpus: Artifact, generator: str,
                 shard_size: int = DEFAULT_SHARD_SIZE, on_progress: Progress | None = None) -> Artifact:
    """Generate queries for the corpus (or its seeded sample) shard by shard; reuse a matching artifact.

    Shards a killed run finished are kept (see ``adapters/staging.py``) and not computed again.
    ``on_progress(n)`` is told of passages done, ``n`` at a time.
    """
    return GenerateJob(cfg, store, corpus, generator, shard_size).result(on_progress)


class GenerateJob(ShardJob):
    """The generate stage cut into shards of ``shard_size`` passages (of the corpus or its seeded sample)."""

    stage = STAGE

    def __init__(self, cfg: GenerateConfig, store: ArtifactStore, corpus: Artifact, generator: str,
                 shard_size: int = DEFAULT_SHARD_SIZE):
        if shard_size < 1:
            raise ValueError(f"generate: shard_size must be >= 1, got {shard_size}")
        self.cfg, self.store, self.corpus, self.generator, self.shard_size = cfg, store, corpus, generator, shard_size
        self.fingerprint = generate_fingerprint(cfg, corpus.fingerprint, generator)
        self.staging = ShardStaging(store, STAGE, self.fingerprint)
        self.qpp, self.sample = queries_per_passage(cfg, corpus.rows)
        self.used = self.sample or corpus.rows
        self._make: QueryMaker | None = None

    @property
    def n_shards(self) -> int:
        return math.ceil(self.used / self.shard_size)

    @property
    def work(self) -> int:
        """Passages (of the corpus or its sample)."""
        return self.used

    def shard_work(self, k: int) -> int:
        return len(self._shard_ranges()[k])

    def plan(self) -> dict[str, Any]:
        return {"n_shards": self.n_shards, "shard_size": self.shard_size, "passages": self.used,
                "queries_per_passage": self.qpp}

    def run(self, on_progress: Progress | None = None) -> Artifact:
        """All pending shards from one pass over the corpus, then publish."""
        self._on_progress = on_progress
        pending = set(self.prepare())
        with tqdm(total=self.used, unit="passage", desc="generate queries") as bar:

            def advance(n: int) -> None:
                bar.update(n)
                self.advance(n)

            advance(sum(self.shard_work(k) for k in range(self.n_shards) if k not in pending))
            for k, shard in enumerate(_shards(self._passages(), self.shard_size)):
                if k in pending:
                    self._run(k, shard, advance)
        return self.publish()

    def run_shard(self, k: int) -> dict[str, Any]:
        start = k * self.shard_size
        shard = list(itertools.islice(self._passages(), start, start + self.shard_size))
        return self._run(k, shard, lambda _n: None)

    def _run(self, k: int, shard: list[Passage], progress: Callable[[int], Any]) -> dict[str, Any]:
        started = time.time()
        if self._make is None:
            self._make = (_t5_maker(self.cfg, self.generator, self.qpp) if self.cfg.method == "t5"
                          else _extractive_maker(self.cfg, self.qpp))
        counters = dict.fromkeys(SHARD_COUNTERS, 0)

        def count(name: str, value: int = 1) -> None:
            counters[name] += value

        batch = _to_batch(shard, self._make(shard, k, progress), count)
        return self.staging.write_parquet(k, [batch], artifacts.QUERIES_SCHEMA, counters, started)

    def publish(self) -> Artifact:
        records = self.done_records()
        config, inputs = _fingerprint_parts(self.cfg, self.corpus.fingerprint, self.generator)
        with self.store.writer(STAGE, config=config, inputs=inputs, code_version=CODE_VERSION) as out:
            out.extra["shard_size"] = self.shard_size
            out.extra["shards"] = self.shard_summary(records)
            out.count("passages", self.corpus.rows)
            out.count("queries_per_passage", self.qpp)
            if self.sample is not None:
                out.count("sampled_passages", self.sample)
            for name, value in sum_counters(records).items():
                out.count(name, value)
            for k, record in enumerate(records):
                out.add_part(self.staging.file(k, "parquet"), k, record["rows"])
            if sum(r["rows"] for r in records) == 0:
                raise InputError(f"generate: no queries from {self.corpus.url} ({out.counters}); every passage "
                                 "was empty after truncation or every generated query was empty")
        self.staging.remove()
        artifact = self.store.require(STAGE)
        logger.info("generated %d queries (%s)", artifact.rows, artifact.counters)
        return artifact

    def _passages(self) -> Iterator[Passage]:
        keep = None if self.sample is None else _sample_mask(self.corpus.rows, self.sample, self.cfg.seed)
        return _passages(self.corpus, keep)

    def _shard_ranges(self) -> list[range]:
        return [range(s, min(s + self.shard_size, self.used)) for s in range(0, self.used, self.shard_size)]


def _to_batch(shard: list[Passage], candidates: list[list[str] | None], count) -> pa.RecordBatch:
    """Rows in corpus order, then k; empty and repeated queries of a passage are dropped and counted."""
    cols: dict[str, list[str]] = {"query_id": [], "doc_id": [], "text": []}
    for passage, queries in zip(shard, candidates, strict=True):
        if queries is None:
            count("empty_passage")
            continue
        kept = list(dict.fromkeys(q for q in queries if q))
        count("empty_queries", sum(1 for q in queries if not q))
        count("duplicate_queries", sum(1 for q in queries if q) - len(kept))
        for k, text in enumerate(kept):
            cols["query_id"].append(f"{passage.doc_id}-q{k}")
            cols["doc_id"].append(passage.doc_id)
            cols["text"].append(text)
    return pa.RecordBatch.from_pydict(cols, schema=artifacts.QUERIES_SCHEMA)


def _sample_mask(n: int, size: int, seed: int) -> np.ndarray:
    """A seeded choice of ``size`` of ``n`` corpus positions (kept in corpus order)."""
    keep = np.zeros(n, dtype=bool)
    keep[np.random.default_rng(seed % _U64).choice(n, size=size, replace=False)] = True
    return keep


def _passages(corpus: Artifact, keep: np.ndarray | None) -> Iterator[Passage]:
    index = 0
    for batch in corpus.iter_batches(columns=["doc_id", "title", "text"]):
        cols = batch.to_pydict()
        for doc_id, title, text in zip(cols["doc_id"], cols["title"], cols["text"], strict=True):
            if keep is None or keep[index]:
                yield Passage(index, doc_id, title or "", text or "")
            index += 1


def _shards(passages: Iterator[Passage], size: int) -> Iterator[list[Passage]]:
    while shard := list(itertools.islice(passages, size)):
        yield shard


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p % _U64 for p in parts]).generate_state(1, np.uint64)[0])


# --- t5 ---------------------------------------------------------------------------------------------------

def load_t5(cfg: GenerateConfig, generator: str) -> generation.QueryGenerator:
    """The generator model with the stage's sampling settings (loaded once per process and stage)."""
    tokenizer, model = models.load_seq2seq(generator)
    params = generation.SamplingParams(top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_query_length,
                            max_input_length=cfg.max_passage_length, prefix=cfg.prefix)
    return generation.QueryGenerator(tokenizer, model, params)


def t5_queries(gen: generation.QueryGenerator, cfg: GenerateConfig, qpp: int, shard: list[Passage], shard_no: int,
               progress: Callable[[int], Any]) -> list[list[str] | None]:
    """``qpp`` sampled queries per passage of one shard (None for a passage with no tokens)."""
    encoded = gen.encode([passage_text(p.title, p.text) for p in shard])
    found: list[list[str] | None] = [None] * len(shard)
    # Length-sorted batches pay for little padding; ties broken by doc id, not by corpus position.
    order = sorted((i for i, ids in enumerate(encoded) if ids is not None),
                   key=lambda i: (len(encoded[i]), shard[i].doc_id))
    progress(len(shard) - len(order))
    size = cfg.batch_for(gen.model.device.type)
    for batch_no, start in enumerate(range(0, len(order), size)):
        members = order[start : start + size]
        seed = _derived_seed(cfg.seed, shard_no, batch_no)

        def sample(part: list[int], seed: int = seed) -> list[list[str]]:
            return gen.generate([encoded[i] for i in part], qpp, seed)

        for part, queries_of in oom.halve_on_oom(sample, members, what="generate.batch_size"):
            for i, queries in zip(part, queries_of, strict=True):
                found[i] = queries
        progress(len(members))
    return found


def _t5_maker(cfg: GenerateConfig, generator: str, qpp: int) -> QueryMaker:
    gen = load_t5(cfg, generator)

    def make(shard: list[Passage], shard_no: int, progress: Callable[[int], Any]) -> list[list[str] | None]:
        return t5_queries(gen, cfg, qpp, shard, shard_no, progress)

    return make


# --- extractive -------------------------------------------------------------------------------------------

def extractive_queries(text: str, n: int, rng: np.random.Generator, max_words: int) -> list[str] | None:
    """``n`` pseudo-queries cut from ``text`` (its first ``max_words`` words); None when it has no words.

    With two or more usable sentences, query k is sentence perm[k mod #sentences] (so repeats only come once
    every sentence was used); otherwise each query is a random span of 6-16 words (all words if fewer).
    """
    words = text.split()[:max_words]
    if not words:
        return None
    sentences = [s for s in split_sentences(" ".join(words))
                 if len(s.split()) >= MIN_SENTENCE_WORDS or len(s) >= MIN_SENTENCE_CHARS]
    if len(sentences) >= 2:
        order = rng.permutation(len(sentences))
        return [sentences[order[k % len(sentences)]] for k in range(n)]
    lengths = np.minimum(rng.integers(SPAN_WORDS[0], SPAN_WORDS[1] + 1, size=n), len(words))
    starts = (rng.random(n) * (len(words) - lengths + 1)).astype(int)
    return [" ".join(words[s : s + m]) for s, m in zip(starts.tolist(), lengths.tolist(), strict=True)]


def _passage_rng(seed: int, doc_id: str) -> np.random.Generator:
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return np.random.default_rng([seed % _U64, int.from_bytes(digest, "little")])


def _extractive_maker(cfg: GenerateConfig, qpp: int) -> QueryMaker:
    """Queries from the passage body only: a title as its own query would be matched trivially."""

    def make(shard: list[Passage], _shard_no: int, progress: Callable[[int], Any]) -> list[list[str] | None]:
        found = [extractive_queries(p.text, qpp, _passage_rng(cfg.seed, p.doc_id), cfg.max_passage_length)
                 for p in shard]
        progress(len(shard))
        return found

    return make


# --- Prefect ----------------------------------------------------------------------------------------------

@task(name="generate queries", task_run_name="generate queries", retries=0, persist_result=True,
      retry_condition_fn=retry_unless_deterministic,
      cache_policy=stage_cache(STAGE, lambda p: generate_fingerprint(p["cfg"], p["corpus_fp"],
                                                                            p["generator"])))
def generate_task(cfg: GenerateConfig, run_dir: str, corpus_fp: str, generator: str,
                  shard_size: int = DEFAULT_SHARD_SIZE) -> str:
    job = generate_job(cfg, run_dir, corpus_fp, generator, shard_size)
    artifact = job.run_reported("generate-queries", f"Generating {cfg.method} queries for {job.used} passages, "
                                f"{job.qpp} per passage")
    get_run_logger().info("queries: %d from %d passages (%s)", artifact.rows, job.corpus.rows, artifact.counters)
    return artifact.fingerprint


def generate_job(cfg: GenerateConfig, run_dir: str, corpus_fp: str, generator: str,
                 shard_size: int = DEFAULT_SHARD_SIZE) -> GenerateJob:
    """The generate job for ``generate_task``'s parameters (the flow that fans shards out builds it the same way)."""
    store = ArtifactStore(run_dir)
    corpus = store.consume(artifacts.CORPUS, expect_fingerprint=corpus_fp)
    if corpus is None:
        raise MissingInputError(f"{store.url(artifacts.CORPUS)}: no valid corpus with fingerprint {corpus_fp}; "
                                "run ingest first")
    return GenerateJob(cfg, store, corpus, generator, shard_size)
