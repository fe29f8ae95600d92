"""``gplflow run --plan``: what a config will do, and how long each stage should take on this device.

The stages are the registry's (``flows/stages.py``): its ``when`` picks them, and each names its ``estimate``
here (the work it does for this config and corpus, and how to time it). Counts come from the config and the
corpus (ingested into a temporary folder unless the run directory already holds it). Rates come from a few
seconds of calibration per stage: each configured model is loaded and runs the stage's own compute path
(``tasks.generate.t5_queries``, ``adapters.encoding.encode``, the label scorer, the trainer) on a small batch
of the corpus, after one warm-up call. Nothing is written to the run directory.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gplflow.adapters.errors import InputError
from gplflow.adapters.store import Artifact, ArtifactStore
from gplflow.flows.config import PipelineConfig
from gplflow.tasks import generate, ingest

logger = logging.getLogger(__name__)

CALIBRATION_TEXTS = 128  # texts encoded or pairs scored to measure a rate
CALIBRATION_STEPS = 3  # training steps; the first one (setup) is not counted
CALIBRATION_PASSAGES = 16  # passages given to the generator (at most one batch)


@dataclass
class StagePlan:
    """One stage: how much work, in which unit, and the calibrated rate (None when it could not be measured).

    ``measure`` times the stage's own compute path on a few passages (given the resolved models and the passage
    sample) and returns its rate in ``unit`` per second. ``stage`` is the registry's step name, set by the plan.
    """

    work: float
    unit: str
    detail: str
    rate: float | None = None
    note: str = ""
    measure: Callable[[dict[str, Any], list[str]], float] | None = field(default=None, repr=False, compare=False)
    stage: str = ""

    @property
    def seconds(self) -> float | None:
        return self.work / self.rate if self.rate else None


@dataclass(frozen=True)
class Plan:
    device: str
    passages: int
    stages: list[StagePlan]

    @property
    def seconds(self) -> float | None:
        found = [s.seconds for s in self.stages]
        return None if any(s is None for s in found) else sum(found)  # type: ignore[misc]


def make_plan(cfg: PipelineConfig, run_dir: str, calibrate: bool = True) -> Plan:
    """The stages ``cfg`` runs, with their work and (when ``calibrate``) the estimated time on this device."""
    from gplflow.adapters import models

    if cfg.corpus is None:
        raise InputError("--plan needs corpus.path (a plan for an import.gpl_dir run is not supported)")
    with tempfile.TemporaryDirectory(prefix="gplflow-plan-") as scratch:
        corpus = _corpus(cfg.corpus, run_dir, Path(scratch))
        stages = planned_stages(cfg, corpus.rows)
        if calibrate:
            _calibrate(cfg, corpus, stages)
    return Plan(models.device(), corpus.rows, stages)


def _corpus(cfg: ingest.IngestConfig, run_dir: str, scratch: Path) -> Artifact:
    """The run directory's corpus when it matches the config, else one ingested into ``scratch``."""
    found = ArtifactStore(run_dir).load(ingest.STAGE, expect_fingerprint=ingest.ingest_fingerprint(cfg))
    return found or ingest.run_ingest(cfg, ArtifactStore(str(scratch)))


def planned_stages(cfg: PipelineConfig, n: int) -> list[StagePlan]:
    """The registry's stages this config computes, in order, each with the work its ``estimate`` counts.

    The registry's own ``when`` decides which stages run, on a run whose artifacts are all still to be made.
    Stages without an estimate (ingest, split, promote: cheap next to the rest) are left out of the table.
    """
    from gplflow.flows.stages import STAGES, Run

    run = Run(cfg, "", planning=True)
    out = []
    for stage in STAGES:
        if not stage.when(run):
            continue
        run.fps.update(dict.fromkeys(stage.makes, "planned"))
        if stage.estimate is not None:
            out.append(replace(stage.resolve_estimate()(cfg, n), stage=stage.step))
    return out


def _generated(cfg: PipelineConfig, n: int) -> tuple[int, int]:
    """(passages queries are generated from, queries per passage) for a corpus of ``n`` passages."""
    qpp, sample = generate.queries_per_passage(cfg.generate, n)
    return sample or n, qpp


def generate_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    used, qpp = _generated(cfg, n)
    sampled = f" (a seeded sample of {used} of {n})" if used < n else ""
    return StagePlan(used, "passages", f"{used} passages{sampled} x {qpp} = {used * qpp} queries "
                     f"({cfg.generate.method})",
                     measure=lambda resolved, passages: _generate_rate(cfg, resolved, passages, qpp))


def _queries(cfg: PipelineConfig, n: int) -> int:
    used, qpp = _generated(cfg, n)
    return used * qpp


def pretrain_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    p = cfg.pretrain
    return StagePlan(p.steps, "steps", f"{p.method}, {p.steps} steps of batch {p.batch_size}",
                     measure=lambda resolved, passages: _pretrain_rate(cfg, resolved, passages))


def mine_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    dense, queries = len(cfg.models.retrievers), _queries(cfg, n)
    miners = [r.name for r in cfg.models.retrievers] + (["bm25"] if cfg.mine.bm25 else [])
    return StagePlan(dense * (n + queries), "texts", f"{dense} dense retriever(s) x ({n} passages + "
                     f"{queries} queries), {cfg.mine.negatives_per_query} negatives from {', '.join(miners)}",
                     measure=lambda resolved, passages: _mine_rate(cfg, resolved, passages))


def label_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    triples, queries = cfg.n_triples, _queries(cfg, n)
    pairs = triples + min(triples, queries)  # each triple's negative pair; a query's positive pair once
    detail = f"{triples} triples, about {pairs} distinct pairs for the {cfg.label.teacher} teacher"
    measure = lambda resolved, passages: _label_rate(cfg, resolved, passages)  # noqa: E731
    if cfg.label.teacher == "cross_encoder":
        return StagePlan(pairs, "pairs", detail, measure=measure)
    texts = min(triples, queries) + n  # each distinct text is encoded once: the queries with triples, every passage
    return StagePlan(texts, "texts", f"{detail}: at most {texts} texts encoded", measure=measure)


def train_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    t = cfg.train
    return StagePlan(t.steps, "steps", f"{t.loss}, {t.steps} steps of batch {t.batch_size} "
                     f"({t.steps * t.batch_size} examples)",
                     measure=lambda resolved, passages: _train_rate(cfg, resolved, passages))


def evaluate_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    """Retrieval's encoding of the corpus by each compared model is timed; the evaluators beside it are named."""
    e = cfg.evaluate
    compared = 3 if cfg.pretrain.method != "none" else 2
    also = [name for name, on in (("STS", e.sts), ("clustering", e.clustering), ("embedding map", e.embedding_map))
            if on is not None]
    if e.mteb is not None:
        also.append(f"MTEB {' '.join(e.mteb.tasks)} (can take far longer)")
    untimed = f"; untimed: {', '.join(also)}" if also else ""
    return StagePlan(compared * n, "texts", f"{compared} models x {n} passages (and the judged or "
                     f"held-out queries){untimed}", measure=lambda resolved, passages: _encode_rate(
                         resolved["base"], passages, e.max_seq_length, e.batch_size))


@functools.lru_cache(maxsize=8)
def _gold(path: str, version: tuple[int, int], kind: str, fmt: str, columns: tuple[tuple[str, Any], ...],
          score_max: float | None) -> tuple[int, int]:
    """The gold pairs file's row count and distinct sentences: read once for the three augmented stages, and
    again when the file changed (``version``: its size and modification time)."""
    from gplflow.adapters.pair_readers import iter_pairs

    rows = list(iter_pairs(path, kind, fmt, dict(columns), score_max))
    return len(rows), len({text for row in rows for text in (row["sentence1"], row["sentence2"])})


def _gold_counts(cfg: PipelineConfig) -> tuple[int, int]:
    from gplflow.adapters.corpus_readers import detect_format

    p = cfg.pairs
    assert p is not None  # augmented_sbert's validation requires pairs
    found = os.stat(p.path)
    return _gold(str(p.path), (found.st_size, found.st_mtime_ns), p.kind, p.format or detect_format(p.path),
                 tuple(p.columns.model_dump().items()), p.score_max)


def cross_encoder_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    c = cfg.augment.cross_encoder
    rows, _ = _gold_counts(cfg)
    steps = c.steps or c.epochs * math.ceil(rows / c.batch_size)
    return StagePlan(steps, "steps", f"{steps} steps of batch {c.batch_size} on {rows} gold pairs",
                     measure=lambda resolved, passages: _cross_train_rate(cfg, resolved, passages))


def sample_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    a = cfg.augment
    _, sentences = _gold_counts(cfg)
    pool = sentences + min(a.corpus_passages, n)
    samplers = {"bm25": "BM25", "semantic": "the bi-encoder", "both": "BM25 and the bi-encoder"}[a.sampling]
    return StagePlan(pool, "texts", f"{pool} texts ({sentences} gold sentences + up to "
                     f"{a.corpus_passages} passages) searched with {samplers}, top {a.top_k}",
                     measure=lambda resolved, passages: _sample_rate(cfg, resolved, passages))


def silver_estimate(cfg: PipelineConfig, n: int) -> StagePlan:
    rows, _ = _gold_counts(cfg)
    target = cfg.augment.silver_target(rows)
    return StagePlan(target, "pairs", f"at most {target} sampled pairs scored by the cross-encoder",
                     measure=lambda resolved, passages: _cross_score_rate(cfg, resolved, passages))


def _calibrate(cfg: PipelineConfig, corpus: Artifact, stages: list[StagePlan]) -> None:
    """Measure each stage's rate; a model that cannot be loaded here leaves its stage without an estimate."""
    from gplflow.flows.models import resolve_models

    try:
        resolved = resolve_models(cfg, corpus.store)
    except Exception as err:  # no model, no estimate: said in the table
        for stage in stages:
            stage.note = f"not calibrated: {_first_line(err)}"
        return
    passages = _passage_sample(corpus, max(CALIBRATION_TEXTS, CALIBRATION_STEPS * 3 * cfg.train.batch_size))
    for stage in stages:
        if stage.measure is None:
            stage.note = "not calibrated: the stage has no rate measurement"
            continue
        try:
            stage.rate = stage.measure(resolved, passages)
        except Exception as err:  # the stage keeps its counts; the note says why
            logger.debug("calibrating %s failed", stage.stage, exc_info=True)
            stage.note = f"not calibrated: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def _passage_sample(corpus: Artifact, n: int) -> list[str]:
    from gplflow.adapters.text import passage_texts

    texts = passage_texts(corpus.read_table(["title", "text"]).slice(0, n))
    return [texts[i % len(texts)] for i in range(n)]


def _pseudo_query(passage: str) -> str:
    return " ".join(passage.split()[:12])


def _clock(fn: Callable[[], Any]) -> float:
    """Seconds of the second of two calls: the first pays for one-off work (kernels chosen per shape, caches)."""
    fn()
    started = time.perf_counter()
    fn()
    return max(time.perf_counter() - started, 1e-9)


def _generate_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str], qpp: int) -> float:
    """Passages per second at the run's own queries per passage (sampling cost grows with it)."""
    import numpy as np

    g = cfg.generate
    if g.method == "extractive":
        rng = np.random.default_rng(0)
        return len(passages) / _clock(lambda: [generate.extractive_queries(p, qpp, rng, g.max_passage_length)
                                               for p in passages])
    gen = generate.load_t5(g, resolved["generator"])
    size = min(g.batch_for(gen.model.device.type), CALIBRATION_PASSAGES)
    shard = [generate.Passage(i, f"d{i}", "", p) for i, p in enumerate(passages[:size])]
    return len(shard) / _clock(lambda: generate.t5_queries(gen, g, qpp, shard, 0, lambda _n: None))


def _encode_rate(ref: str, texts: list[str], max_seq_length: int | None, batch_size: int) -> float:
    from gplflow.adapters import encoding, models

    model = models.load_bi_encoder(ref, max_seq_length=max_seq_length, inference=True)
    texts = texts[:CALIBRATION_TEXTS]
    return len(texts) / _clock(lambda: encoding.encode(model, texts, batch_size=batch_size, show_progress=False))


def _mine_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Texts per second over all dense retrievers (the stage encodes the same texts with each)."""
    seconds_per_text = sum(1 / _encode_rate(ref, passages, cfg.mine.max_seq_length, cfg.mine.batch_size)
                           for ref, _score in resolved["retrievers"]) / max(1, len(resolved["retrievers"]))
    return 1 / seconds_per_text


def _label_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    import numpy as np

    from gplflow.adapters.scoring import load_scorer

    teacher = resolved[cfg.teacher_slot]
    scorer = load_scorer(cfg.label.teacher, teacher, max_seq_length=cfg.label.max_seq_length,
                         batch_size=cfg.label.batch_size, normalize=cfg.label.bi_encoder_score == "cos_sim")
    n = CALIBRATION_TEXTS
    texts = passages[:n]
    queries = [_pseudo_query(p) for p in texts]
    pair_q, pair_p = np.arange(n), np.roll(np.arange(n), 1)
    # a bi-encoder teacher encodes each distinct text once: its work is counted in texts (n queries + n passages)
    work = n if cfg.label.teacher == "cross_encoder" else 2 * n
    return work / _clock(lambda: scorer.score(queries, texts, pair_q, pair_p))


def _train_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Steps per second of the trainer on corpus passages (steps after the first)."""
    import pyarrow as pa
    from transformers import TrainerCallback

    from gplflow.adapters import models, trainer

    b = cfg.train.batch_size
    n = CALIBRATION_STEPS * b
    docs = pa.table({"doc_id": [f"d{i}" for i in range(n)], "title": [""] * n, "text": passages[:n]})
    queries = pa.table({"query_id": [f"q{i}" for i in range(n)], "doc_id": docs["doc_id"],
                        "text": [_pseudo_query(p) for p in passages[:n]]})
    lookup = trainer.passage_lookup(docs)
    if cfg.train.loss in ("cosent", "cosine", "angle"):  # scored pairs (flow supervised)
        dataset = trainer.scored_pairs_dataset(pa.table({"sentence1": queries["text"], "sentence2": passages[:n],
                                                         "score": [float(i % 2) for i in range(n)]}))
    elif cfg.train.loss == "mnrl":
        dataset = trainer.pairs_dataset(queries, lookup)
    else:
        triples = pa.table({"query_id": queries["query_id"], "pos_doc_id": docs["doc_id"],
                            "neg_doc_id": [f"d{(i + 1) % n}" for i in range(n)], "margin": [0.0] * n})
        dataset = trainer.margin_mse_dataset(triples, trainer.query_texts(queries), lookup)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    settings = cfg.train.model_copy(update={"steps": CALIBRATION_STEPS, "batch_size": b, "warmup_steps": 0,
                                            "checkpoint_every": 10**9})
    model = models.load_bi_encoder(resolved["base"], max_seq_length=cfg.train.max_seq_length)
    with tempfile.TemporaryDirectory(prefix="gplflow-plan-train-") as out:
        trainer.fit(model, dataset, settings, Path(out), models.device(), [Clock()])
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def _cross_train_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Steps per second of the cross-encoder's training on (pseudo-query, passage) pairs (steps after the first)."""
    from transformers import TrainerCallback

    from gplflow.adapters import cross_training, models

    c = cfg.augment.cross_encoder
    n = CALIBRATION_STEPS * c.batch_size
    texts = [passages[i % len(passages)] for i in range(n)]
    pairs = cross_training.ScoredPairs([_pseudo_query(t) for t in texts], texts, [float(i % 2) for i in range(n)])
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    model = models.load_cross_encoder(resolved["cross_encoder"], max_length=c.max_seq_length, inference=False)
    settings = c.model_copy(update={"epochs": 1, "steps": CALIBRATION_STEPS, "warmup_ratio": 0.0})
    cross_training.fit(model, pairs, settings, [Clock()])
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def _sample_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Pool texts per second: encoded (semantic search) and/or indexed and searched with BM25."""
    from gplflow.adapters.bm25 import BM25Index

    texts = passages[:CALIBRATION_TEXTS]
    seconds_per_text = 0.0
    if cfg.augment.sampling in ("semantic", "both"):
        seconds_per_text += 1 / _encode_rate(resolved["base"], texts, None, cfg.augment.batch_size)
    if cfg.augment.sampling in ("bm25", "both"):
        k = cfg.augment.top_k + 1
        seconds_per_text += _clock(lambda: BM25Index(texts, show_progress=False).search(texts, k)) / len(texts)
    return 1 / seconds_per_text


def _cross_score_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Pairs per second the cross-encoder scores (the one training starts from: the same architecture)."""
    import numpy as np

    from gplflow.adapters.scoring import load_scorer

    a = cfg.augment
    scorer = load_scorer("cross_encoder", resolved["cross_encoder"], max_seq_length=a.cross_encoder.max_seq_length,
                         batch_size=a.batch_size)
    texts = passages[:CALIBRATION_TEXTS]
    every = np.arange(len(texts))
    return len(texts) / _clock(lambda: scorer.score(texts, texts, every, np.roll(every, 1)))


def _pretrain_rate(cfg: PipelineConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    from gplflow.adapters import pretraining
    stamps: list[float] = []
    settings = cfg.pretrain.model_copy(update={"steps": CALIBRATION_STEPS, "log_every": 1,
                                               "checkpoint_every": 10**9, "warmup_steps": 0})
    with tempfile.TemporaryDirectory(prefix="gplflow-plan-pretrain-") as out:
        pretraining.pretrain(settings, resolved["base"], passages, Path(out) / "ckpt", Path(out) / "model",
                             on_progress=lambda _step, _total, _loss: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def duration(seconds: float | None) -> str:
    """``42 s``, ``12.5 min``, ``17.3 h`` (``?`` when unknown)."""
    if seconds is None or math.isnan(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"
