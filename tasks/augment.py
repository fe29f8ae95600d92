"""Augmented SBERT (Thakur et al., NAACL 2021): a small gold set of scored pairs made into a larger silver set.

Three stages sit between reading the gold pairs (tasks/pairs.py) and training the bi-encoder on gold + silver
(tasks/train.py ``run_train_pairs``):

1. ``cross-encoder/``: a cross-encoder trained on the gold pairs (binary cross-entropy on scores in [0, 1]).
   Its manifest says how well it fits the gold pairs before and after (loss, Spearman).
2. ``silver-candidates/``: new, unlabelled pairs. The pool is the gold pairs' sentences plus a seeded sample
   of corpus passages; each pool text, in a seeded order, is paired with its ``top_k`` nearest pool texts by
   BM25 and/or by the bi-encoder's cosine (semantic search). Pairs are unordered and kept once; gold pairs
   are dropped. The paper's point: random pairs are nearly all unrelated, so a bi-encoder learns little from
   them, while BM25 and semantic-search neighbours spread over the whole range of scores.
3. ``silver/``: the candidates scored by the cross-encoder (the sigmoid of its logit, the gold scale); the
   manifest holds their size and how the scores spread, per sampler too.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from prefect import get_run_logger
from pydantic import Field, model_validator

from gplflow.adapters import artifacts, distributed
from gplflow.adapters.checkpoints import folder as checkpoint_folder
from gplflow.adapters.checkpoints import remove as remove_checkpoints
from gplflow.adapters.errors import InputError
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.store import Artifact
from gplflow.tasks.base import AutoOrPositive, ModelUse, Ref, Seed, StageConfig, StageInputs, stage_task
from gplflow.tasks.pairs import score_summary
from gplflow.tasks.planning import (
    CALIBRATION_STEPS,
    CALIBRATION_TEXTS,
    StagePlan,
    StepClock,
    clock,
    encode_rate,
    pseudo_query,
    score_rate,
)

logger = logging.getLogger(__name__)

CROSS_ENCODER, CANDIDATES, SILVER = artifacts.CROSS_ENCODER, artifacts.SILVER_CANDIDATES, artifacts.SILVER
CODE_VERSION = "augment-1"
SAMPLERS = {"bm25": ("bm25",), "semantic": ("semantic",), "both": ("bm25", "semantic")}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class CrossEncoderTrainConfig(StageConfig):
    """The cross-encoder trained on the gold pairs (the paper: 4 epochs of batch 16, 10 % warm-up)."""

    epochs: int = Field(default=4, gt=0)
    steps: int | None = Field(default=None, gt=0)  # exactly this many steps instead of `epochs`
    batch_size: int = Field(default=16, gt=0)
    learning_rate: float = Field(default=2e-5, ge=0.0, allow_inf_nan=False)
    warmup_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    max_seq_length: int = Field(default=128, gt=0)
    seed: Seed = 42
    # 'auto': every visible GPU (1 on a CPU); N > 1 trains as a torchrun job of N processes (on a CPU, N gloo
    # processes). batch_size stays the global batch. Left out of the fingerprint, as train.devices is.
    devices: AutoOrPositive = "auto"

    @model_validator(mode="after")
    def _batch_divides(self) -> CrossEncoderTrainConfig:
        if self.devices != "auto":
            distributed.check_batch(self.batch_size, int(self.devices), KEY)
        return self


KEY = "augment.cross_encoder"  # the cross-encoder's config section, as errors name it


class AugmentConfig(StageConfig):
    """Flow augmented_sbert: how the silver pairs are sampled and labelled."""

    cross_encoder: CrossEncoderTrainConfig = CrossEncoderTrainConfig()
    sampling: Literal["bm25", "semantic", "both"] = "both"
    top_k: int = Field(default=3, gt=0)  # neighbours of each pool text, per sampler
    silver_per_gold: int = Field(default=4, gt=0)  # silver pairs = this x the gold pairs ...
    silver_pairs: int | None = Field(default=None, gt=0)  # ... unless this sets their number
    # a seeded sample of this many corpus passages joins the gold sentences in the pool (0: the gold sentences
    # alone, the paper's in-domain setting)
    corpus_passages: int = Field(default=10_000, ge=0)
    batch_size: int = Field(default=64, gt=0)  # encoding (semantic search) and cross-encoder scoring
    seed: Seed = 42

    def silver_target(self, gold_pairs: int) -> int:
        return self.silver_pairs or self.silver_per_gold * gold_pairs


def _sampling_config(cfg: AugmentConfig) -> dict[str, Any]:
    """What the sampled pairs depend on (not the cross-encoder's training)."""
    return cfg.model_dump(mode="json", exclude={"cross_encoder"})


# --- 1. the cross-encoder -------------------------------------------------------------------------------------


class CrossEncoderInputs(StageInputs, artifact=CROSS_ENCODER, code_version=CODE_VERSION):
    """What the cross-encoder's training reads: the gold pairs and the model it starts from."""

    cfg: AugmentConfig
    start: str  # a cross-encoder, or any encoder: it gets a new head
    pairs: Ref

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        return (self.cfg.cross_encoder.model_dump(mode="json", exclude={"devices"}),
                {"start": model_signature(self.start), "pairs": self.pairs.fingerprint})


def run_cross_encoder(inputs: CrossEncoderInputs) -> Artifact:
    """Train a cross-encoder from ``start`` on the gold pairs and publish ``cross-encoder/``: in this process on
    one device, as a torchrun job (adapters/distributed.py) on several (``augment.cross_encoder.devices``)."""
    pairs = inputs.load(inputs.pairs)
    if pairs.manifest.get("kind", "scored") != "scored":
        raise InputError("flow augmented_sbert trains its cross-encoder on scored pairs (pairs.kind: scored)")
    if (found := inputs.reuse()) is not None:
        return found
    c, store = inputs.cfg.cross_encoder, inputs.store
    count = distributed.device_count(c.devices, c.batch_size, KEY)
    if distributed.in_process(count):
        _train_cross_encoder(inputs)
    else:  # no checkpoints (a killed run trains again): the job folder alone lives there
        job = checkpoint_folder(store, CROSS_ENCODER, inputs.fingerprint())
        distributed.launch(job / "job", count, f"{__name__}:cross_encoder_on_rank", inputs.model_dump(mode="json"),
                           what="cross-encoder")
        remove_checkpoints(job)
    return store.require(CROSS_ENCODER)


def _train_cross_encoder(inputs: CrossEncoderInputs, world_size: int = 1) -> None:
    """Train on this process's device; the one process, or rank 0 of a torchrun job, measures the fit on the gold
    pairs before and after and publishes ``cross-encoder/`` with the world size and every rank's device."""
    from gplflow.adapters import cross_training, models  # torch and sentence-transformers: only when training

    cfg, store, start = inputs.cfg, inputs.store, inputs.start
    c = cfg.cross_encoder
    table = inputs.load(inputs.pairs).read_table(["sentence1", "sentence2", "score"])
    gold = cross_training.ScoredPairs(*(table[name].to_pylist() for name in table.column_names))
    model = models.load_cross_encoder(start, max_length=c.max_seq_length, inference=False)
    if not distributed.is_main():
        cross_training.fit(model, gold, c, world_size=world_size)
        distributed.devices_used()  # a collective: rank 0 waits for every rank's answer
        return
    config, fps = inputs.fingerprint_parts()
    with store.writer(CROSS_ENCODER, config=config, inputs=fps, code_version=CODE_VERSION) as out:
        before = cross_training.fit_on(model, gold, cfg.batch_size)
        report = cross_training.fit(model, gold, c, world_size=world_size)
        used = distributed.devices_used()
        after = cross_training.fit_on(model, gold, cfg.batch_size)
        cross_training.save(model, out.local_dir())
        out.extra["train"] = info = {"start": start, "examples": len(gold), **report.as_dict(),
                                     "gold_fit": {"before": before, "after": after}, "world_size": world_size,
                                     "devices": used}
    logger.info("cross-encoder: %d steps on %d gold pairs on %d device(s); their loss %s -> %s, Spearman %s -> %s",
                info["steps"], len(gold), world_size, before["bce"], after["bce"], before["spearman"],
                after["spearman"])


def cross_encoder_on_rank(payload: dict[str, Any]) -> None:
    """One rank of a torchrun cross-encoder job (adapters/distributed.py calls it with the job file's payload)."""
    _train_cross_encoder(CrossEncoderInputs.model_validate(payload), distributed.world_size())


# --- 2. sampling --------------------------------------------------------------------------------------------


class SampleInputs(StageInputs, artifact=CANDIDATES, code_version=CODE_VERSION):
    """What sampling reads: the corpus, the gold pairs and the bi-encoder of semantic search."""

    cfg: AugmentConfig
    corpus: Ref
    pairs: Ref
    bi_encoder: str  # finds the semantic-search neighbours (the model the flow goes on to train)

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        inputs = {"corpus": self.corpus.fingerprint, "pairs": self.pairs.fingerprint}
        if "semantic" in SAMPLERS[self.cfg.sampling]:
            inputs["bi_encoder"] = model_signature(self.bi_encoder)
        return _sampling_config(self.cfg), inputs


def run_sample(inputs: SampleInputs) -> Artifact:
    """Sample unlabelled pairs from the gold sentences and corpus passages and publish ``silver-candidates/``."""
    cfg, store, bi_encoder = inputs.cfg, inputs.store, inputs.bi_encoder
    if (found := inputs.reuse()) is not None:
        return found
    corpus, pairs = inputs.load(inputs.corpus), inputs.load(inputs.pairs)
    config, fps = inputs.fingerprint_parts()
    gold = pairs.read_table(["sentence1", "sentence2"])
    sentences = list(dict.fromkeys(gold["sentence1"].to_pylist() + gold["sentence2"].to_pylist()))
    passages = _corpus_sample(corpus, cfg.corpus_passages, cfg.seed)
    pool = list(dict.fromkeys(sentences + passages))  # a passage equal to a gold sentence is one text
    if len(pool) < 2:
        raise InputError("augment: fewer than two distinct texts to pair (set augment.corpus_passages above 0)")
    target = cfg.silver_target(gold.num_rows)
    neighbours = {name: _neighbours(name, pool, cfg, bi_encoder) for name in SAMPLERS[cfg.sampling]}
    gold_keys = {_key(a, b) for a, b in zip(gold["sentence1"].to_pylist(), gold["sentence2"].to_pylist(),
                                            strict=True)}
    rows, dropped = select_pairs(pool, neighbours, gold_keys, cfg.top_k, target, cfg.seed)
    if not rows:
        raise InputError(f"augment: no pair sampled besides the gold pairs from {len(pool)} texts; raise "
                         "augment.top_k or augment.corpus_passages")
    if len(rows) < target:
        logger.warning("augment: %d silver pairs sampled, fewer than the %d asked for: every pool text's top %d "
                       "neighbours are used (raise augment.top_k or augment.corpus_passages for more)",
                       len(rows), target, cfg.top_k)
    table = pa.Table.from_pylist(rows, schema=artifacts.SILVER_CANDIDATES_SCHEMA)
    with store.writer(CANDIDATES, config=config, inputs=fps, code_version=CODE_VERSION) as out:
        out.write_part([table], artifacts.SILVER_CANDIDATES_SCHEMA)
        for reason, n in sorted(dropped.items()):
            out.count(reason, n)
        out.extra.update(target=target, gold_pairs=gold.num_rows,
                         pool={"gold_sentences": len(sentences), "corpus_passages": len(passages), "texts": len(pool)},
                         sampled=dict(Counter(row["sampler"] for row in rows)))
    logger.info("sampled %d pairs (of %d asked for) from %d texts", len(rows), target, len(pool))
    return store.require(CANDIDATES)


def _corpus_sample(corpus: Artifact, n: int, seed: int) -> list[str]:
    """``n`` passages of the corpus (all when it has fewer), drawn with ``seed``, in corpus order."""
    from gplflow.adapters.text import passage_texts

    if n == 0:
        return []
    table = corpus.read_table(["title", "text"])
    if n < table.num_rows:
        table = table.take(np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False)))
    return passage_texts(table)


def _neighbours(sampler: str, pool: list[str], cfg: AugmentConfig, bi_encoder: str) -> np.ndarray:
    """Each pool text's nearest pool texts, best first, itself among them (positions; -1: none)."""
    k = min(cfg.top_k + 1, len(pool))  # one more: a text is its own nearest neighbour
    if sampler == "bm25":
        from gplflow.adapters.bm25 import BM25Index

        scores, ids = BM25Index(pool, show_progress=False).search(pool, k)
        return np.where(scores > 0, ids, -1)  # a text sharing no word with the anchor is no neighbour
    from gplflow.adapters import encoding, models
    from gplflow.adapters.vector_index import VectorIndex

    model = models.load_bi_encoder(bi_encoder, inference=True)
    vectors = encoding.encode(model, pool, batch_size=cfg.batch_size, normalize=True, desc="encoding the pool")
    del model
    encoding.release_memory()
    return VectorIndex(vectors, score="cos_sim", seed=cfg.seed, copy=False).search(vectors, k)[1]


def _key(a: str, b: str) -> tuple[str, str]:
    """A pair without its order: (a, b) and (b, a) are one pair."""
    return (a, b) if a <= b else (b, a)


def select_pairs(pool: list[str], neighbours: dict[str, np.ndarray], gold: set[tuple[str, str]], top_k: int,
                 target: int, seed: int) -> tuple[list[dict[str, str]], Counter[str]]:
    """Up to ``target`` pairs (anchor, one of its ``top_k`` neighbours), anchors in a seeded order, each sampler's
    neighbours in turn; a pair is kept once (either order, either sampler), never when it is a gold pair."""
    rows: list[dict[str, str]] = []
    seen = set(gold)
    dropped: Counter[str] = Counter()
    for anchor in np.random.default_rng(seed).permutation(len(pool)):
        for sampler, ids in neighbours.items():
            for other in [i for i in ids[anchor] if i >= 0 and i != anchor][:top_k]:
                key = _key(pool[anchor], pool[other])
                if key in seen:
                    dropped["dropped_gold" if key in gold else "dropped_duplicate"] += 1
                    continue
                seen.add(key)
                rows.append({"sentence1": pool[anchor], "sentence2": pool[other], "sampler": sampler})
                if len(rows) == target:
                    return rows, dropped
    return rows, dropped


# --- 3. labelling -------------------------------------------------------------------------------------------


class SilverInputs(StageInputs, artifact=SILVER, code_version=CODE_VERSION):
    """What silver labelling reads: the sampled candidates and the trained cross-encoder."""

    cfg: AugmentConfig
    candidates: Ref
    cross_encoder: Ref

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        config = {"batch_size": self.cfg.batch_size, "max_seq_length": self.cfg.cross_encoder.max_seq_length}
        return config, {CANDIDATES: self.candidates.fingerprint, CROSS_ENCODER: self.cross_encoder.fingerprint}


def run_silver(inputs: SilverInputs) -> Artifact:
    """Score every candidate with the cross-encoder and publish ``silver/`` with the scores' spread."""
    from gplflow.adapters.cross_training import sigmoid
    from gplflow.adapters.scoring import load_scorer

    cfg, store = inputs.cfg, inputs.store
    if (found := inputs.reuse()) is not None:
        return found
    candidates, cross_encoder = inputs.load(inputs.candidates), inputs.load(inputs.cross_encoder)
    config, fps = inputs.fingerprint_parts()
    table = candidates.read_table(["sentence1", "sentence2", "sampler"])
    scorer = load_scorer("cross_encoder", str(cross_encoder.local_dir()),
                         max_seq_length=cfg.cross_encoder.max_seq_length, batch_size=cfg.batch_size)
    every = np.arange(table.num_rows)
    scores = sigmoid(scorer.score(table["sentence1"].to_pylist(), table["sentence2"].to_pylist(), every, every))
    silver = pa.table({"sentence1": table["sentence1"], "sentence2": table["sentence2"],
                       "score": pa.array(scores, pa.float32()), "sampler": table["sampler"]},
                      schema=artifacts.SILVER_SCHEMA)
    samplers = np.asarray(table["sampler"].to_pylist())
    with store.writer(SILVER, config=config, inputs=fps, code_version=CODE_VERSION) as out:
        out.write_part([silver], artifacts.SILVER_SCHEMA)
        out.extra["scores"] = score_distribution(scores)
        out.extra["by_sampler"] = {name: score_distribution(scores[samplers == name])
                                   for name in sorted(set(samplers))}
    logger.info("silver: %d pairs, scores %s", len(scores), out.extra["scores"])
    return store.require(SILVER)


def score_distribution(scores: np.ndarray) -> dict[str, Any]:
    """How many scores, their min, mean, max, five-bin histogram (tasks/pairs.py ``score_summary``) and quantiles."""
    if len(scores) == 0:
        return {"count": 0}
    values = np.asarray(scores, dtype=np.float64)
    quantiles = {f"p{round(q * 100):02d}": round(float(np.quantile(values, q)), 6) for q in QUANTILES}
    return {"count": len(values), **score_summary(values.tolist()), "quantiles": quantiles}


def distribution_value(found: dict[str, Any], name: str) -> Any:
    """One figure of a ``score_distribution`` (``count``, ``mean``, ``p50``…), None when it has none."""
    return found.get(name, found.get("quantiles", {}).get(name))


# --- the Prefect tasks ------------------------------------------------------------------------------------------


# --- what the run's report, checks and plan ask of these stages --------------------------------------------

def settings(cfg: Any) -> str:
    a, c = cfg.augment, cfg.augment.cross_encoder
    length = f"{c.steps} steps" if c.steps else f"{c.epochs} epochs"
    devices = f", {KEY}.devices {c.devices}" if c.devices != "auto" else ""
    return (f"cross-encoder: {length} of batch {c.batch_size}, lr {c.learning_rate:g}, seed {c.seed}{devices}; silver: "
            f"{a.silver_pairs or f'{a.silver_per_gold} per gold pair'}, top {a.top_k} {a.sampling} neighbours, "
            f"pool: gold sentences + up to {a.corpus_passages} passages, seed {a.seed}")


def models_used(cfg: Any) -> list[ModelUse]:
    """The cross-encoder the flow trains starts from this one."""
    return [ModelUse("models.cross_encoder", cfg.models.cross_encoder, "cross-encoder (trained from)",
                     "cross_encoder")]


@functools.lru_cache(maxsize=8)
def _gold(path: str, version: tuple[int, int], kind: str, fmt: str, columns: tuple[tuple[str, Any], ...],
          score_max: float | None) -> tuple[int, int]:
    """The gold pairs file's row count and distinct sentences: read once for the three augmented stages, and
    again when the file changed (``version``: its size and modification time)."""
    from gplflow.adapters.pair_readers import iter_pairs

    rows = list(iter_pairs(path, kind, fmt, dict(columns), score_max))
    return len(rows), len({text for row in rows for text in (row["sentence1"], row["sentence2"])})


def _gold_counts(cfg: Any) -> tuple[int, int]:
    from gplflow.adapters.corpus_readers import detect_format

    p = cfg.pairs
    found = os.stat(p.path)
    return _gold(str(p.path), (found.st_size, found.st_mtime_ns), p.kind, p.format or detect_format(p.path),
                 tuple(p.columns.model_dump().items()), p.score_max)


def cross_encoder_estimate(cfg: Any, n: int) -> StagePlan:
    c = cfg.augment.cross_encoder
    rows, _ = _gold_counts(cfg)
    steps = c.steps or c.epochs * math.ceil(rows / c.batch_size)
    several = f" on {c.devices} devices: one device's rate x{c.devices}, a scaling assumed until measured" \
        if c.devices != "auto" and int(c.devices) > 1 else ""
    return StagePlan(steps, "steps", f"{steps} steps of batch {c.batch_size} on {rows} gold pairs{several}",
                     measure=lambda resolved, passages: _cross_train_rate(c, resolved, passages)
                     * distributed.device_count(c.devices, c.batch_size, KEY))


def sample_estimate(cfg: Any, n: int) -> StagePlan:
    a = cfg.augment
    _, sentences = _gold_counts(cfg)
    pool = sentences + min(a.corpus_passages, n)
    samplers = {"bm25": "BM25", "semantic": "the bi-encoder", "both": "BM25 and the bi-encoder"}[a.sampling]
    return StagePlan(pool, "texts", f"{pool} texts ({sentences} gold sentences + up to "
                     f"{a.corpus_passages} passages) searched with {samplers}, top {a.top_k}",
                     measure=lambda resolved, passages: _sample_rate(a, resolved, passages))


def silver_estimate(cfg: Any, n: int) -> StagePlan:
    a = cfg.augment
    rows, _ = _gold_counts(cfg)
    target = a.silver_target(rows)
    return StagePlan(target, "pairs", f"at most {target} sampled pairs scored by the cross-encoder",
                     measure=lambda resolved, passages: score_rate(
                         "cross_encoder", resolved["cross_encoder"], passages, a.cross_encoder.max_seq_length,
                         a.batch_size))


def _cross_train_rate(c: CrossEncoderTrainConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Steps per second of the cross-encoder's training on (pseudo-query, passage) pairs (steps after the first)."""
    from gplflow.adapters import cross_training, models

    n = CALIBRATION_STEPS * c.batch_size
    texts = [passages[i % len(passages)] for i in range(n)]
    pairs = cross_training.ScoredPairs([pseudo_query(t) for t in texts], texts, [float(i % 2) for i in range(n)])
    steps = StepClock()
    model = models.load_cross_encoder(resolved["cross_encoder"], max_length=c.max_seq_length, inference=False)
    settings = c.model_copy(update={"epochs": 1, "steps": CALIBRATION_STEPS, "warmup_ratio": 0.0})
    cross_training.fit(model, pairs, settings, [steps.callback()])
    return steps.rate()


def _sample_rate(a: AugmentConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Pool texts per second: encoded (semantic search) and/or indexed and searched with BM25."""
    from gplflow.adapters.bm25 import BM25Index

    texts = passages[:CALIBRATION_TEXTS]
    seconds_per_text = 0.0
    if a.sampling in ("semantic", "both"):
        seconds_per_text += 1 / encode_rate(resolved["base"], texts, None, a.batch_size)
    if a.sampling in ("bm25", "both"):
        k = a.top_k + 1
        seconds_per_text += clock(lambda: BM25Index(texts, show_progress=False).search(texts, k)) / len(texts)
    return 1 / seconds_per_text


@stage_task("train cross-encoder", retries=1)
def cross_encoder_task(inputs: CrossEncoderInputs) -> str:
    artifact = run_cross_encoder(inputs)
    info = artifact.manifest["train"]
    get_run_logger().info("cross-encoder: %s steps in %ss; on the gold pairs %s", info["steps"], info["seconds"],
                          info["gold_fit"])
    return artifact.fingerprint


@stage_task("sample silver pairs", retries=1)
def sample_task(inputs: SampleInputs) -> str:
    artifact = run_sample(inputs)
    get_run_logger().info("silver candidates: %d pairs (%s)", artifact.rows, artifact.manifest.get("sampled"))
    return artifact.fingerprint


@stage_task("label silver pairs", retries=1)
def silver_task(inputs: SilverInputs) -> str:
    artifact = run_silver(inputs)
    get_run_logger().info("silver: %d pairs, scores %s", artifact.rows, artifact.manifest.get("scores"))
    return artifact.fingerprint
