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
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
from prefect import get_run_logger
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from gplflow.adapters import artifacts
from gplflow.adapters.errors import InputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.staging import sum_counters
from gplflow.adapters.store import Artifact, canonical_json
from gplflow.adapters.text import passage_text, split_sentences
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
from gplflow.tasks.planning import CALIBRATION_PASSAGES, StagePlan, clock

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
LLM_ONLY_FIELDS = ("endpoint", "prompt", "template", "examples", "temperature", "stop", "max_query_words")
LLM_UNUSED_FIELDS = ("top_k", "prefix")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SPAN_WORDS = (6, 16)  # extractive: a span of 6-16 words when a passage has fewer than two usable sentences
MIN_SENTENCE_WORDS = 3  # extractive: shorter sentences ("Fig. 3.") are not used as queries …
MIN_SENTENCE_CHARS = 15  # … unless long in characters (scripts written without spaces)
_U64 = 2**64
# Sampling is latency-bound (one decoder step per token for the whole batch), so the rate grows with the batch:
# on 2 CPU cores (T5-base, bf16) 64 passages per call ran 1.4x the rate of 32; on an H200, 32 / 128 / 256 gave
# 21 / 74 / 150 passages/s (benchmarks/README.md). A batch that does not fit is retried in halves.
AUTO_BATCH = {"cpu": 64, "cuda": 256}
SHARD_COUNTERS = ("duplicate_queries", "empty_passage", "empty_queries")  # counted per shard, then added up
# llm: the parse layer's drops (empty_queries is shared) and what the generator cost
LLM_COUNTERS = ("copied_passage", "too_long_queries", "prompt_tokens", "completion_tokens", "requests", "retries")


class EndpointConfig(StageConfig):
    """An OpenAI-compatible server for ``generate.method: llm``. The API key itself is never part of a config: it
    is read from the environment variable ``api_key_env`` names."""

    base_url: str = Field(min_length=1)  # the API root, usually ending in /v1 (http://localhost:8000/v1)
    model: str = Field(min_length=1)     # the model name the server lists under GET /models
    api_key_env: str = ""                # the environment variable holding the key; "" for a server without one
    max_concurrency: int = Field(default=8, ge=1, le=1024)  # requests in flight at once
    timeout_s: float = Field(default=60.0, gt=0)             # per request
    max_retries: int = Field(default=5, ge=0, le=50)         # on timeouts, 429, 5xx and malformed answers
    logprobs: bool = True  # ask for token log-probs (the filter stage can rank by them); not every server has them

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, value: str) -> str:
        # The message never repeats the value: a key pasted here by mistake must not reach a log.
        if value and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable (letters, digits and _), not the key "
                             "itself; export the key in that variable")
        if value and _looks_like_a_key(value):
            raise ValueError("looks like a key, not the name of an environment variable (a key prefix such as "
                             "hf_ or sk_, 32 characters or more, or 6 digits or more); export the key in a variable "
                             "and name that variable here")
        return value


def _looks_like_a_key(value: str) -> bool:
    """Whether a would-be variable name has the shape of a token (letters, digits and _ only, as HF tokens and
    many providers' keys are): such a value is refused without being repeated, before it can reach a log."""
    return (value.lower().startswith(("hf_", "sk_", "gsk_", "pk_", "rk_")) or len(value) >= 32
            or sum(c.isdigit() for c in value) >= 6)


class GenerateConfig(StageConfig):
    method: Literal["t5", "extractive", "llm"] = "t5"
    queries_per_passage: AutoOrPositive = "auto"
    target_queries: int = Field(default=250_000, gt=0)   # the paper's |corpus| x QPP budget for `auto`
    max_passages: int = Field(default=83_334, gt=0)      # above this, `auto` samples passages and uses QPP 3
    batch_size: AutoOrPositive = "auto"  # passages per generate call; auto: see AUTO_BATCH
    seed: Seed = 42
    top_k: int = Field(default=25, ge=0)  # 0: no top-k cut (transformers' meaning)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_query_length: int = Field(default=64, gt=0)     # tokens of a generated query
    # passage tokens given to the generator (extractive, and llm through an endpoint: words)
    max_passage_length: int = Field(default=350, gt=0)
    prefix: str = ""                  # an optional prompt prefix put before every passage
    # llm: a local causal LM (models.generator) or, when set, an OpenAI-compatible server
    endpoint: EndpointConfig | None = None
    prompt: Literal["zero_shot", "few_shot"] = "few_shot"  # the built-in prompt (adapters/llm_prompts.py)
    template: str = ""   # a template file with {passage} and {examples}: replaces the built-in prompt's text
    examples: str = ""   # a file of (passage, query) pairs from your domain: replaces the built-in examples
    temperature: float = Field(default=1.0, gt=0.0, le=2.0)
    stop: tuple[str, ...] = ()  # stop strings: a completion ends before the first one
    max_query_words: int = Field(default=32, gt=0)  # longer answers are dropped (counted as too_long_queries)

    def batch_for(self, device: str) -> int:
        """Passages per ``generate`` call on ``device`` (``auto``: AUTO_BATCH)."""
        return AUTO_BATCH[device] if self.batch_size == "auto" else int(self.batch_size)

    @property
    def uses_generator(self) -> bool:
        """Whether ``models.generator`` is loaded: t5, and llm without an endpoint."""
        return self.method == "t5" or (self.method == "llm" and self.endpoint is None)

    def fingerprinted(self) -> dict[str, Any]:
        """The settings that decide the queries: what the fingerprint hashes. A method's unused settings are left
        out (so t5 and extractive fingerprints are those of configs before llm existed); so are the endpoint's
        concurrency, timeout and retries, and the prompt files' paths, whose content ``prompt_inputs`` hashes."""
        config = self.model_dump(mode="json")
        unused = {"t5": LLM_ONLY_FIELDS, "extractive": (*T5_ONLY_FIELDS, *LLM_ONLY_FIELDS),
                  "llm": LLM_UNUSED_FIELDS}[self.method]
        config = {k: v for k, v in config.items() if k not in unused}
        if self.method == "llm":
            config.pop("template"), config.pop("examples")
            if self.endpoint is not None:
                config.pop("batch_size")
                config["endpoint"] = {k: config["endpoint"][k] for k in ("base_url", "model", "logprobs")}
        return config

    def prompt_inputs(self) -> dict[str, str]:
        """llm: a digest of the prompt (template text and examples), as a fingerprint input; else nothing."""
        if self.method != "llm":
            return {}
        from gplflow.adapters.llm_prompts import build_prompt

        record = build_prompt(self.prompt, self.template, self.examples).record()
        return {"prompt": hashlib.sha256(canonical_json(record).encode()).hexdigest()}


class Passage(NamedTuple):
    index: int  # position in the corpus
    doc_id: str
    title: str
    text: str


Query = str | tuple[str, float | None]  # a query's text, or (text, mean token log-prob) from an LLM
# (passages of one shard, shard number, progress callback, counter) -> per passage: candidate queries, None if empty
QueryMaker = Callable[[list[Passage], int, Callable[[int], Any], Callable[..., None]], list[list[Query] | None]]


class GenerateInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What generation reads: the corpus and, for ``t5``, the generator model."""

    cfg: GenerateConfig
    corpus: Ref
    generator: str = ""  # a loadable model reference ("" when the method needs none)
    shard_size: int = Field(default=DEFAULT_SHARD_SIZE, gt=0)  # passages per shard

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        """A method's unused settings are left out, and the generator when it loads none (``fingerprinted``)."""
        generator = self.generator if self.cfg.uses_generator else ""
        return self.cfg.fingerprinted(), {"corpus": self.corpus.fingerprint, "generator": model_signature(generator),
                                          **self.cfg.prompt_inputs()}


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


def run_generate(inputs: GenerateInputs, on_progress: Progress | None = None) -> Artifact:
    """Generate queries for the corpus (or its seeded sample) shard by shard; reuse a matching artifact.

    Shards a killed run finished are kept (see ``adapters/staging.py``) and not computed again.
    ``on_progress(n)`` is told of passages done, ``n`` at a time.
    """
    return GenerateJob(inputs).result(on_progress)


class GenerateJob(ShardJob):
    """The generate stage cut into shards of ``shard_size`` passages (of the corpus or its seeded sample)."""

    def __init__(self, inputs: GenerateInputs):
        super().__init__(inputs, inputs.shard_size)
        self.cfg, self.corpus, self.generator = inputs.cfg, inputs.load(inputs.corpus), inputs.generator
        self.qpp, self.sample = queries_per_passage(self.cfg, self.corpus.rows)
        self.used = self.sample or self.corpus.rows
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
            self._make = _MAKERS[self.cfg.method](self.cfg, self.generator, self.qpp)
        counters = dict.fromkeys(SHARD_COUNTERS + (LLM_COUNTERS if self.cfg.method == "llm" else ()), 0)

        def count(name: str, value: int = 1) -> None:
            counters[name] += value

        schema = artifacts.queries_schema(logprob=self.cfg.method == "llm")
        batch = _to_batch(shard, self._make(shard, k, progress, count), count, schema)
        return self.staging.write_parquet(k, [batch], schema, counters, started)

    def publish(self) -> Artifact:
        records = self.done_records()
        with self.store.writer(STAGE, config=self.config, inputs=self.input_fps, code_version=CODE_VERSION) as out:
            out.extra["shard_size"] = self.shard_size
            out.extra["shards"] = self.shard_summary(records)
            if self.cfg.method == "llm":
                out.extra["llm"] = llm_record(self.cfg)
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


def _to_batch(shard: list[Passage], candidates: list[list[Query] | None], count, schema: pa.Schema) -> pa.RecordBatch:
    """Rows in corpus order, then k; empty and repeated queries of a passage are dropped and counted.

    A query is its text, or (text, mean token log-prob) from an LLM; a repeated text keeps its first log-prob.
    """
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for passage, queries in zip(shard, candidates, strict=True):
        if queries is None:
            count("empty_passage")
            continue
        pairs = [q if isinstance(q, tuple) else (q, None) for q in queries]
        kept: dict[str, float | None] = {}
        for text, logprob in pairs:
            if text:
                kept.setdefault(text, logprob)
        count("empty_queries", sum(1 for text, _ in pairs if not text))
        count("duplicate_queries", sum(1 for text, _ in pairs if text) - len(kept))
        for k, (text, logprob) in enumerate(kept.items()):
            cols["query_id"].append(f"{passage.doc_id}-q{k}")
            cols["doc_id"].append(passage.doc_id)
            cols["text"].append(text)
            if "logprob" in cols:
                cols["logprob"].append(logprob)
    return pa.RecordBatch.from_pydict(cols, schema=schema)


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

    def make(shard: list[Passage], shard_no: int, progress: Callable[[int], Any], _count) -> list[list[str] | None]:
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


def _extractive_maker(cfg: GenerateConfig, _generator: str, qpp: int) -> QueryMaker:
    """Queries from the passage body only: a title as its own query would be matched trivially."""

    def make(shard: list[Passage], _shard_no: int, progress: Callable[[int], Any], _count) -> list[list[str] | None]:
        found = [extractive_queries(p.text, qpp, _passage_rng(cfg.seed, p.doc_id), cfg.max_passage_length)
                 for p in shard]
        progress(len(shard))
        return found

    return make


# --- what the run's report, checks and plan ask of this stage ---------------------------------------------

def settings(cfg: Any) -> str:
    """The report's line on this stage (``cfg``: the PipelineConfig)."""
    g = cfg.generate
    return f"{g.method}, queries per passage: {g.queries_per_passage}, seed {g.seed}"


def models_used(cfg: Any) -> list[ModelUse]:
    """The generator model, for the methods that load one."""
    if not cfg.generate.uses_generator:  # extractive, and llm through an endpoint
        return []
    return [ModelUse("models.generator", cfg.models.generator, "query generator", "generator")]


def planned_queries(cfg: GenerateConfig, n: int) -> tuple[int, int]:
    """(passages queries are generated from, queries per passage) for a corpus of ``n`` passages."""
    qpp, sample = queries_per_passage(cfg, n)
    return sample or n, qpp


def estimate(cfg: Any, n: int) -> StagePlan:
    used, qpp = planned_queries(cfg.generate, n)
    sampled = f" (a seeded sample of {used} of {n})" if used < n else ""
    return StagePlan(used, "passages", f"{used} passages{sampled} x {qpp} = {used * qpp} queries "
                     f"({cfg.generate.method})",
                     measure=None if cfg.generate.endpoint is not None  # the plan never sends passages away
                     else lambda resolved, passages: _rate(cfg.generate, resolved, passages, qpp))


def _rate(g: GenerateConfig, resolved: dict[str, Any], passages: list[str], qpp: int) -> float:
    """Passages per second at the run's own queries per passage (sampling cost grows with it)."""
    if g.method == "extractive":
        rng = np.random.default_rng(0)
        return len(passages) / clock(lambda: [extractive_queries(p, qpp, rng, g.max_passage_length)
                                              for p in passages])
    if g.method == "llm":
        gen = load_llm(g, resolved["generator"], qpp)
        size = min(gen.batch_size, CALIBRATION_PASSAGES)
        shard = [Passage(i, f"d{i}", "", p) for i, p in enumerate(passages[:size])]
        return len(shard) / clock(lambda: llm_queries(gen, g, shard, 0, lambda _n: None, lambda *_a: None))
    gen = load_t5(g, resolved["generator"])
    size = min(g.batch_for(gen.model.device.type), CALIBRATION_PASSAGES)
    shard = [Passage(i, f"d{i}", "", p) for i, p in enumerate(passages[:size])]
    return len(shard) / clock(lambda: t5_queries(gen, g, qpp, shard, 0, lambda _n: None))


# --- llm --------------------------------------------------------------------------------------------------

def llm_prompt(cfg: GenerateConfig):
    """The prompt the config names (built-in or a template file, with the built-in or the user's examples)."""
    from gplflow.adapters.llm_prompts import build_prompt

    return build_prompt(cfg.prompt, cfg.template, cfg.examples)


def endpoint_settings(cfg: GenerateConfig):
    """The endpoint client's settings from ``generate.endpoint`` (None for a local model)."""
    from gplflow.adapters.llm_endpoint import EndpointSettings

    e = cfg.endpoint
    return None if e is None else EndpointSettings(
        base_url=e.base_url, model=e.model, api_key_env=e.api_key_env, max_concurrency=e.max_concurrency,
        timeout_s=e.timeout_s, max_retries=e.max_retries, logprobs=e.logprobs)


def load_llm(cfg: GenerateConfig, generator: str, qpp: int):
    """The LLM generator: an endpoint client, checked against its server before any request, or a local model."""
    from gplflow.adapters.llm_base import Sampling

    prompt = llm_prompt(cfg)
    sampling = Sampling(n=qpp, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_query_length,
                        stop=tuple(cfg.stop))
    if cfg.endpoint is not None:
        from gplflow.adapters.llm_endpoint import EndpointGenerator

        gen = EndpointGenerator(endpoint_settings(cfg), prompt, sampling, cfg.max_passage_length)
        gen.check()
        return gen
    from gplflow.adapters.llm_generation import CausalGenerator, load_causal_lm

    tokenizer, model = load_causal_lm(generator)
    return CausalGenerator(tokenizer, model, prompt, sampling, cfg.max_passage_length,
                           cfg.batch_for(model.device.type))


def llm_queries(gen: Any, cfg: GenerateConfig, shard: list[Passage], shard_no: int, progress: Callable[[int], Any],
                count: Callable[..., None]) -> list[list[Query] | None]:
    """(query, mean log-prob) per kept completion of each passage of one shard; drops and costs counted.

    A local model samples in batches seeded from (seed, shard, batch); an endpoint request per passage carries a
    seed from (seed, doc id), so a server that honours seeds answers a rerun the same whatever the shard size.
    """
    from gplflow.adapters.llm_prompts import parse_completions

    texts = [passage_text(p.title, p.text) for p in shard]
    seed = cfg.seed if cfg.endpoint is not None else _derived_seed(cfg.seed, shard_no)
    results, usage = gen.generate(texts, [p.doc_id for p in shard], seed, progress)
    for name, value in usage.counters.items():
        count(name, value)
    found: list[list[Query] | None] = []
    for text, result in zip(texts, results, strict=True):
        if result is None:
            found.append(None)
            continue
        parsed = parse_completions(((c.text, c.logprob) for c in result.completions), text, cfg.max_query_words,
                                   cfg.stop)
        for reason, n in parsed.drops.items():
            count(reason, n)
        found.append(list(zip(parsed.queries, parsed.logprobs, strict=True)))
    return found


def llm_problems(cfg: GenerateConfig) -> Iterator[tuple[str, str]]:
    """(key, problem) for an llm run, before any stage: the prompt files read, the key's variable is set, and the
    endpoint answers and serves the model (one ``GET /models``; no passage is sent)."""
    from gplflow.adapters.errors import GplflowError

    if cfg.method != "llm":
        return
    try:
        llm_prompt(cfg)
    except GplflowError as err:
        yield ("generate.examples" if "generate.examples" in str(err) else "generate.template"), _unkeyed(err)
    if cfg.endpoint is None:
        return
    from gplflow.adapters.llm_endpoint import check_server

    try:
        check_server(endpoint_settings(cfg))
    except GplflowError as err:
        key = str(err).split(": ", 1)[0]
        yield (key if key.startswith("generate.endpoint") else "generate.endpoint"), _unkeyed(err)


def _unkeyed(err: Exception) -> str:
    """An error's message without its leading ``generate.…: `` (the check's caller prefixes the key)."""
    text = str(err)
    return text.split(": ", 1)[1] if text.startswith("generate.") and ": " in text else text


def _llm_maker(cfg: GenerateConfig, generator: str, qpp: int) -> QueryMaker:
    gen = load_llm(cfg, generator, qpp)

    def make(shard: list[Passage], shard_no: int, progress: Callable[[int], Any],
             count: Callable[..., None]) -> list[list[Query] | None]:
        return llm_queries(gen, cfg, shard, shard_no, progress, count)

    return make


def llm_record(cfg: GenerateConfig) -> dict[str, Any]:
    """What the manifest keeps of an LLM run: the back-end, the model and the whole prompt (never a key)."""
    backend = ({"backend": "endpoint", "base_url": cfg.endpoint.base_url, "model": cfg.endpoint.model}
               if cfg.endpoint is not None else {"backend": "local"})
    return {**backend, "prompt": llm_prompt(cfg).record()}


def summary_line(cfg: Any, generator: str, manifest: dict[str, Any] | None) -> str:
    """The CLI summary's line on the queries' source (``cfg``: the PipelineConfig; ``generator``: what
    ``models.generator`` resolved to). An endpoint is named by URL and model, its key only by the variable that
    holds it, with the requests and tokens the ``queries/`` manifest counted."""
    g, ref = cfg.generate, cfg.models.generator
    model = ref if ref == generator else f"{ref} ({generator})"
    if g.method == "t5":
        return f"generator: {model}"
    if g.method == "extractive":
        return "generator: extractive pseudo-queries (no model)"
    prompt = f"prompt {g.template or g.prompt}" + (f" with the examples of {g.examples}" if g.examples else "")
    if g.endpoint is None:
        return f"generator: local causal LM {model}, {prompt}"
    e, counters = g.endpoint, (manifest or {}).get("counters", {})
    key = f"key from ${e.api_key_env}" if e.api_key_env else "no key"
    cost = (f"; {counters['requests']} requests (retries: {counters.get('retries', 0)}), "
            f"{counters.get('prompt_tokens')} prompt and {counters.get('completion_tokens')} completion tokens"
            if "requests" in counters else "")
    return f"generator: {e.model} at {e.base_url} ({key}), {prompt}{cost}"


def report_lines(manifest: dict[str, Any] | None, inline: Callable[[str], str]) -> list[str]:
    """The report's section on an LLM run's prompt, from the ``queries/`` manifest: where the queries came from,
    the system line, the user template and the examples as sent, and what parsing the answers dropped (nothing for
    the other methods). ``inline`` makes a short text safe for one line of markdown."""
    llm = (manifest or {}).get("llm")
    if not llm:
        return []
    prompt, counters = llm.get("prompt", {}), (manifest or {}).get("counters", {})
    source = (f"the OpenAI-compatible endpoint `{inline(str(llm.get('base_url')))}`, model "
              f"`{inline(str(llm.get('model')))}`" if llm.get("backend") == "endpoint"
              else "a local causal LM (`models.generator`)")
    template = str(prompt.get("template", ""))
    out = ["## Generation prompt",
           f"Queries generated by {source} with the prompt `{inline(str(prompt.get('name')))}`: the system line, then "
           "the user message, in which each passage (title first) takes the place of `{passage}`.",
           _fenced(str(prompt.get("system", ""))), _fenced(template)]
    if prompt.get("examples") and "{examples}" in template:
        out += [f"The {prompt['examples']} examples, in place of `{{examples}}`:", _fenced(str(prompt["example_text"]))]
    from gplflow.adapters.llm_prompts import DROP_REASONS

    drops = {reason: counters.get(reason, 0) for reason in (*DROP_REASONS, "duplicate_queries")}
    out.append("Answers parsing dropped: " + ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in
                                                        drops.items()) + ".")
    return out


def _fenced(text: str) -> str:
    """``text`` as a markdown code block, shown as written (a fence inside it is broken up)."""
    return "```text\n" + text.strip("\n").replace("```", "`\u200b``") + "\n```"


_MAKERS: dict[str, Callable[[GenerateConfig, str, int], QueryMaker]] = {
    "t5": lambda cfg, generator, qpp: _t5_maker(cfg, generator, qpp),
    "extractive": lambda cfg, generator, qpp: _extractive_maker(cfg, generator, qpp),
    "llm": lambda cfg, generator, qpp: _llm_maker(cfg, generator, qpp),
}


# --- Prefect ----------------------------------------------------------------------------------------------

@stage_task("generate queries")
def generate_task(inputs: GenerateInputs) -> str:
    job = GenerateJob(inputs)
    artifact = job.run_reported("generate-queries", f"Generating {inputs.cfg.method} queries for {job.used} "
                                f"passages, {job.qpp} per passage")
    get_run_logger().info("queries: %d from %d passages (%s)", artifact.rows, job.corpus.rows, artifact.counters)
    return artifact.fingerprint
