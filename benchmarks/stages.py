"""Every compute stage, gplflow's own path against the reference pattern, side by side in one process.

For each stage the two variants get identical inputs, run interleaved (the order alternates each round), and
each loads its own model inside the measurement (load seconds are reported apart):

- generate: ``tasks.generate.t5_queries`` (length-sorted batches, bf16 weights where they pay) against fp32,
  corpus order, 32 passages per ``generate`` call, ``max_length=64``;
- mine: ``adapters.encoding.encode`` + ``VectorIndex`` (FAISS) against ``model.encode`` in fp32, batch 128, to
  tensors, and an exact ``topk`` of the full score matrix;
- label: each distinct pair scored once (``adapters.scoring``) against ``predict`` on both pairs of every
  triple, per batch of 32 triples, fp32;
- train: ``adapters.trainer.fit`` (MarginMSE, bf16 autocast where it pays) against the sentence-transformers
  Trainer in fp32 on the same rows, batch 32, 350 tokens;
- pretrain: ``adapters.pretraining.pretrain`` (MLM, bf16 autocast where it pays) against the same objective in
  a plain fp32 loop.

``--train-devices N`` adds gplflow's trainer in this process against the same training as a torchrun job of N
ranks (what ``train.devices: N`` runs), at the same global batch: the step rate, the launch overhead and the
cosine of the two models' embeddings.

Rates: passages/s (generate), texts/s encoded and searched (mine), triples/s and scored pairs/s (label),
steps/s (train, pretrain; the first step is setup and is not counted). "ratio" is gplflow's rate over the
reference's (>1 = faster). Peak memory is the RSS high-water mark above the level before the variant loaded its
model (CPU), or CUDA's max allocated (GPU); "mem ratio" is gplflow's over the reference's. The last table
extrapolates the paper's recipe (83,334 passages x QPP 3 = 250k queries, two miners, 140k steps x 32 triples)
from the measured rates.

    .venv/bin/python benchmarks/stages.py --scale tiny            # a quick look, ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/stages.py --scale paper           # the paper's model shapes, ~15 min on 2 cores
    .venv/bin/python benchmarks/stages.py --scale paper --device cuda --work 8   # on a GPU: 8x the CPU work
    .venv/bin/python benchmarks/stages.py --scale tiny --stages "" --train-devices 2   # torchrun x2 vs one process

Outputs are checked, not only timed: generated queries per passage, overlap of the mined top-k lists, the
largest score difference against the fp32 reference (as a share of the reference scores' span), and the loss
both trainers reach.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import standins

from gplflow.adapters import encoding, models, scoring
from gplflow.adapters.text import passage_text

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "demo" / "corpus.jsonl"
QPP, NEGATIVES, TOP_K, TOP_P, MAX_QUERY, MAX_SEQ, BATCH = 3, 50, 25, 0.95, 64, 350, 32
PAPER = {"passages": 83_334, "queries": 250_000, "miners": 2, "steps": 140_000, "triples": 140_000 * 32}
# work per variant and round, on CPU; --work multiplies it (a GPU takes --work 8 or more)
WORK = {
    "tiny": {"generate": 337, "mine_passages": 337, "mine_queries": 1011, "label": 1600, "train": 30,
             "pretrain": 30},
    "paper": {"generate": 128, "mine_passages": 337, "mine_queries": 1011, "label": 360, "train": 4,
              "pretrain": 4},
}
TRIPLES_PER_QUERY = PAPER["triples"] / PAPER["queries"]  # 17.9: how often a positive pair recurs in the paper


# --- inputs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    titles: list[str]
    texts: list[str]
    passages: list[str]  # title + " " + text
    queries: list[str]  # pseudo-queries: a sentence of each passage, QPP per passage
    query_doc: np.ndarray  # the passage each query came from


def load_inputs(n_passages: int) -> Inputs:
    """The demo corpus, repeated (with a marker, so texts stay distinct) until there are ``n_passages``."""
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    titles, texts = [], []
    for i in range(max(n_passages, len(rows))):
        row = rows[i % len(rows)]
        suffix = f" ({i // len(rows)})" if i >= len(rows) else ""
        titles.append(row.get("title") or "")
        texts.append(row["text"] + suffix)
    passages = [passage_text(t, x) for t, x in zip(titles, texts, strict=True)]
    queries, query_doc = [], []
    for d, text in enumerate(texts):
        sentences = [s for s in text.split(". ") if len(s.split()) >= 3] or [text]
        for k in range(QPP):
            queries.append(" ".join(sentences[k % len(sentences)].split()[:16]))
            query_doc.append(d)
    return Inputs(titles, texts, passages, queries, np.array(query_doc))


def draw_triples(inputs: Inputs, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n (query, positive, negative) index triples, TRIPLES_PER_QUERY per query as in the paper's recipe."""
    rng = np.random.default_rng(seed)
    n_queries = max(1, min(len(inputs.queries), round(n / TRIPLES_PER_QUERY)))
    q = np.sort(rng.choice(len(inputs.queries), size=n_queries, replace=False))[np.arange(n) % n_queries]
    pos = inputs.query_doc[q]
    neg = rng.integers(0, len(inputs.passages) - 1, size=n)
    neg = neg + (neg >= pos)  # never the positive
    return q, pos, neg


# --- measuring --------------------------------------------------------------------------------------------


class PeakMemory:
    """RSS high-water mark above the starting level (CPU, sampled every 5 ms) or CUDA max allocated."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        _release()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss() - self.start)

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss() - self.start)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError):  # give freed heap back to the OS: the next variant starts from the floor
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Run:
    """One variant's measurement in one round."""

    load_s: float
    run_s: float
    peak: int
    work: float  # units of work done in run_s (passages, texts, triples, steps)
    output: Any = None


@dataclass
class Variant:
    load: Callable[[], Any]
    run: Callable[[Any], tuple[float, float, Any]]  # model -> (seconds, work, output); its own timing


@dataclass
class StageResult:
    name: str
    unit: str
    runs: dict[str, list[Run]] = field(default_factory=dict)
    check: str = ""
    extra: str = ""

    def rate(self, variant: str) -> float:
        return statistics.median(r.work / r.run_s for r in self.runs[variant])

    def load(self, variant: str) -> float:
        return statistics.median(r.load_s for r in self.runs[variant])

    def peak(self, variant: str) -> int:
        return max(r.peak for r in self.runs[variant])


WARMUP = {"cpu": 0, "cuda": 1}  # untimed rounds first: --warmup


def measure(name: str, unit: str, variants: dict[str, Variant], rounds: int, device: str) -> StageResult:
    """Interleave the variants for ``rounds`` rounds (order alternating), each loading its own model, after
    ``WARMUP[device]`` untimed rounds: on an H200 a variant's first run in the process was 2-9x slower than its
    second (bf16 kernels met for the first time), which a median of two rounds does not hide."""
    result = StageResult(name, unit, {v: [] for v in variants})
    for round_ in range(-WARMUP[device], rounds):
        order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
        for label in order:
            variant = variants[label]
            with PeakMemory(device) as mem:
                started = time.perf_counter()
                model = variant.load()
                _sync(device)
                load_s = time.perf_counter() - started
                run_s, work, output = variant.run(model)
                del model
            if round_ < 0:
                print(f"  {name:<9} warm-up   {label:<9} run {run_s:7.2f} s (not counted)", flush=True)
                continue
            result.runs[label].append(Run(load_s, run_s, mem.peak, work, output))
            print(f"  {name:<9} round {round_ + 1}/{rounds} {label:<9} load {load_s:6.2f} s  run {run_s:7.2f} s  "
                  f"{work / run_s:10.2f} {unit}  peak {mem.peak / 2**20:8.0f} MiB", flush=True)
    return result


def timed(device: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - started, out


# --- the reference pattern (BEIR / UKPLab gpl, written from their documented behaviour) ----------------------


def ref_load_generator(path: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path).to(device).eval()


def ref_generate(tokenizer: Any, model: Any, texts: list[str], device: str) -> list[list[str]]:
    """fp32, corpus order, 32 passages per call, ``max_length=64``: QPP queries per passage."""
    out: list[list[str]] = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(texts[start : start + BATCH], truncation=True, max_length=MAX_SEQ, padding=True,
                        return_tensors="pt").to(device)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, top_k=TOP_K, top_p=TOP_P, max_length=MAX_QUERY,
                                 num_return_sequences=QPP)
        found = tokenizer.batch_decode(ids, skip_special_tokens=True)
        out += [found[i : i + QPP] for i in range(0, len(found), QPP)]
    return out


def ref_load_encoder(path: str, device: str) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device)
    model.max_seq_length = MAX_SEQ
    return model


def ref_mine(model: Any, corpus: list[str], queries: list[str], k: int) -> np.ndarray:
    """``model.encode`` in fp32 (batch 128, to tensors), then an exact top-k of the full cosine matrix."""
    from sentence_transformers import util

    c = model.encode(corpus, batch_size=128, convert_to_tensor=True, show_progress_bar=False)
    q = model.encode(queries, batch_size=128, convert_to_tensor=True, show_progress_bar=False)
    return torch.topk(util.cos_sim(q, c), k, dim=1).indices.cpu().numpy()


def ref_load_cross_encoder(path: str, device: str) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(path, device=device, max_length=MAX_SEQ, activation_fn=torch.nn.Identity())


def ref_label(model: Any, queries: list[str], positives: list[str], negatives: list[str]) -> np.ndarray:
    """Per batch of 32 triples, ``predict`` on both pairs of every triple (fp32); the margins."""
    margins = []
    for start in range(0, len(queries), BATCH):
        b = slice(start, start + BATCH)
        pairs = list(zip(queries[b], positives[b], strict=True)) + list(zip(queries[b], negatives[b], strict=True))
        scores = model.predict(pairs, batch_size=BATCH, show_progress_bar=False, activation_fn=torch.nn.Identity())
        margins.append(scores[: len(pairs) // 2] - scores[len(pairs) // 2 :])
    return np.concatenate(margins)


def ref_train(model: Any, rows: dict[str, list], steps: int, device: str, callbacks: list[Any]) -> None:
    """The sentence-transformers Trainer in fp32: MarginMSE (dot), batch 32, warm-up 1000, lr 2e-5."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=2e-5,
            warmup_steps=min(1000, steps), save_strategy="no", report_to="none", logging_steps=1, seed=0,
            use_cpu=device == "cpu", disable_tqdm=True)
        SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                   loss=losses.MarginMSELoss(model), callbacks=callbacks).train()


# --- generate ---------------------------------------------------------------------------------------------


def bench_generate(m: standins.StandIns, inputs: Inputs, n: int, rounds: int, device: str) -> StageResult:
    from gplflow.tasks import generate

    passages = [generate.Passage(i, f"d{i}", inputs.titles[i], inputs.texts[i]) for i in range(n)]
    cfg = generate.GenerateConfig(queries_per_passage=QPP)

    def reference(loaded: Any) -> tuple[float, float, Any]:
        secs, out = timed(device, lambda: ref_generate(*loaded, inputs.passages[:n], device))
        return secs, n, sum(len(q) for q in out) / n

    def project(gen: Any) -> tuple[float, float, Any]:
        secs, found = timed(device, lambda: generate.t5_queries(gen, cfg, QPP, passages, 0, lambda _n: None))
        return secs, n, sum(len(q or []) for q in found) / n

    result = measure("generate", "passages/s", {
        "reference": Variant(lambda: ref_load_generator(m.generator, device), reference),
        "gplflow": Variant(lambda: generate.load_t5(cfg, m.generator), project),
    }, rounds, device)
    per = {v: result.runs[v][-1].output for v in result.runs}
    result.check = f"queries per passage: gplflow {per['gplflow']:.2f}, reference {per['reference']:.2f}"
    return result


# --- mine -------------------------------------------------------------------------------------------------


def bench_mine(m: standins.StandIns, inputs: Inputs, n_passages: int, n_queries: int, rounds: int,
               device: str) -> StageResult:
    from gplflow.adapters.vector_index import VectorIndex

    corpus, queries = inputs.passages[:n_passages], inputs.queries[:n_queries]
    k = min(NEGATIVES + 1, n_passages)

    def reference(model: Any) -> tuple[float, float, Any]:
        secs, top = timed(device, lambda: ref_mine(model, corpus, queries, k))
        return secs, len(corpus) + len(queries), top

    def project(model: Any) -> tuple[float, float, Any]:
        def go() -> np.ndarray:
            c = encoding.encode(model, corpus, role="document", normalize=True, show_progress=False)
            q = encoding.encode(model, queries, role="query", normalize=True, show_progress=False)
            return VectorIndex(c, score="cos_sim", kind="auto", copy=False).search(q, k)[1]

        secs, top = timed(device, go)
        return secs, len(corpus) + len(queries), top

    result = measure("mine", "texts/s", {
        "reference": Variant(lambda: ref_load_encoder(m.retriever, device), reference),
        "gplflow": Variant(lambda: models.load_bi_encoder(m.retriever, max_seq_length=MAX_SEQ, inference=True),
                           project),
    }, rounds, device)
    a, b = result.runs["gplflow"][-1].output, result.runs["reference"][-1].output
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b, strict=True)])
    result.check = f"top-{k} overlap with the fp32 reference: {overlap:.4f}"
    return result


# --- label ------------------------------------------------------------------------------------------------


def bench_label(m: standins.StandIns, inputs: Inputs, n: int, rounds: int, device: str) -> StageResult:
    q, pos, neg = draw_triples(inputs, n)
    keys, inverse = np.unique(np.concatenate([q * len(inputs.passages) + pos, q * len(inputs.passages) + neg]),
                              return_inverse=True)
    pair_q, pair_p = keys // len(inputs.passages), keys % len(inputs.passages)

    def reference(model: Any) -> tuple[float, float, Any]:
        secs, margins = timed(device, lambda: ref_label(model, [inputs.queries[i] for i in q],
                                                        [inputs.passages[i] for i in pos],
                                                        [inputs.passages[i] for i in neg]))
        return secs, n, margins

    def project(scorer: Any) -> tuple[float, float, Any]:
        def go() -> np.ndarray:
            scores = scorer.score(inputs.queries, inputs.passages, pair_q, pair_p)[inverse]
            return scores[:n] - scores[n:]

        secs, margins = timed(device, go)
        return secs, n, margins

    result = measure("label", "triples/s", {
        "reference": Variant(lambda: ref_load_cross_encoder(m.cross_encoder, device), reference),
        "gplflow": Variant(lambda: scoring.load_scorer("cross_encoder", m.cross_encoder, max_seq_length=MAX_SEQ,
                                                       batch_size=BATCH), project),
    }, rounds, device)
    a, b = result.runs["gplflow"][-1].output, result.runs["reference"][-1].output
    span = float(b.max() - b.min()) or 1.0
    result.check = (f"margins: max |gplflow - fp32 reference| = {np.abs(a - b).max():.2e} = "
                    f"{np.abs(a - b).max() / span:.2%} of the reference's span {span:.3g}")
    result.extra = f"{n} triples over {len(np.unique(q))} queries: {2 * n} pairs scored by the reference, " \
                   f"{len(keys)} distinct pairs by gplflow"
    return result


# --- train ------------------------------------------------------------------------------------------------


class StepClock:
    """Times optimizer steps; the first one (setup, warm-up) is left out of the rate."""

    def __init__(self, device: str):
        self.device, self.stamps, self.losses = device, [], []

    def tick(self, loss: float | None = None) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        if loss is not None:
            self.losses.append(loss)

    def result(self) -> tuple[float, float]:
        return self.stamps[-1] - self.stamps[0], len(self.stamps) - 1


def train_rows(inputs: Inputs, steps: int) -> tuple[dict[str, list], Any]:
    """The rows both trainers train on (``(steps + 1) x 32`` triples with random margins), as the reference's
    columns and as gplflow's MarginMSE dataset."""
    import pyarrow as pa

    from gplflow.adapters import trainer

    n = (steps + 1) * BATCH
    q, pos, neg = draw_triples(inputs, n, seed=1)
    margins = np.random.default_rng(2).normal(0, 3, size=n).astype(np.float32)
    rows = {"query": [inputs.queries[i] for i in q], "positive": [inputs.passages[i] for i in pos],
            "negative": [inputs.passages[i] for i in neg], "label": margins.tolist()}
    ids = [f"d{i}" for i in range(len(inputs.passages))]
    corpus = pa.table({"doc_id": ids, "title": inputs.titles, "text": inputs.texts})
    qtable = trainer.query_texts(pa.table({"query_id": [f"q{i}" for i in range(len(inputs.queries))],
                                           "text": inputs.queries}))
    triples = pa.table({"query_id": [f"q{i}" for i in q], "pos_doc_id": [ids[i] for i in pos],
                        "neg_doc_id": [ids[i] for i in neg], "margin": margins})
    return rows, trainer.margin_mse_dataset(triples, qtable, trainer.passage_lookup(corpus))


def step_clock(device: str) -> Any:
    """A trainer callback timing steps 2.. (``.clock``) and keeping the logged losses."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.clock = StepClock(device)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 1:
                self.clock.tick()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step > 1:
                self.clock.tick()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.clock.losses.append(float(logs["loss"]))

    return Clock()


def train_settings(steps: int) -> Any:
    from gplflow.tasks.train import TrainConfig

    return TrainConfig(loss="margin_mse", steps=steps, batch_size=BATCH, learning_rate=2e-5, warmup_steps=1000,
                       checkpoint_every=10**9, seed=0)


def bench_train(m: standins.StandIns, inputs: Inputs, steps: int, rounds: int, device: str) -> StageResult:
    from gplflow.adapters import trainer

    rows, dataset = train_rows(inputs, steps)

    def reference(model: Any) -> tuple[float, float, Any]:
        clock = step_clock(device)
        ref_train(model, rows, steps, device, [clock])
        secs, done = clock.clock.result()
        return secs, done, clock.clock.losses

    def project(model: Any) -> tuple[float, float, Any]:
        clock = step_clock(device)
        with tempfile.TemporaryDirectory() as out:
            trainer.fit(model, dataset, train_settings(steps), Path(out) / "ckpt", device, [clock])
        secs, done = clock.clock.result()
        return secs, done, clock.clock.losses

    result = measure("train", "steps/s", {
        "reference": Variant(lambda: ref_load_encoder(m.student, device), reference),
        "gplflow": Variant(lambda: models.load_bi_encoder(m.student, max_seq_length=MAX_SEQ), project),
    }, rounds, device)
    a, b = result.runs["gplflow"][-1].output, result.runs["reference"][-1].output
    result.check = (f"MarginMSE loss, first -> last step: gplflow {a[0]:.4g} -> {a[-1]:.4g}, "
                    f"reference {b[0]:.4g} -> {b[-1]:.4g}")
    return result


# --- train on N devices ----------------------------------------------------------------------------------

PROBES = 64  # passages both models embed after training, for the equivalence check


def _train_result(model: Any, clock: Any, out: Path, device: str, peak: int) -> None:
    """What a variant leaves behind: its step timing, losses, peak memory and its embeddings of the probes."""
    secs, done = clock.clock.result()
    probes = load_inputs(PROBES).passages[:PROBES]
    vectors = model.encode(probes, batch_size=PROBES, convert_to_numpy=True, normalize_embeddings=True)
    np.save(out / "probes.npy", vectors)
    (out / "result.json").write_text(json.dumps({"secs": secs, "done": done, "losses": clock.clock.losses,
                                                 "peak": peak}))


def ddp_train_rank(payload: dict[str, Any]) -> None:
    """One process of either variant of ``bench_train_devices`` (a torchrun rank, or the one plain process):
    gplflow's trainer on the same rows and settings, ``batch_size`` the global batch; rank 0 writes what
    ``_train_result`` writes."""
    from gplflow.adapters import distributed, trainer

    device, out = payload["device"], Path(payload["out"])
    os.environ["GPLFLOW_DEVICE"] = device
    _, dataset = train_rows(load_inputs(payload["passages"]), payload["steps"])
    clock = step_clock(device)
    with PeakMemory(device) as mem:
        model = models.load_bi_encoder(payload["student"], max_seq_length=MAX_SEQ)
        trainer.fit(model, dataset, train_settings(payload["steps"]), out / "ckpt", device,
                    [clock] if distributed.is_main() else [], distributed.world_size())
    if distributed.is_main():
        import torch.distributed as dist

        info = {"process_group": dist.is_initialized(), "world_size": distributed.world_size(),
                "backend": dist.get_backend() if dist.is_initialized() else None}
        (out / "dist.json").write_text(json.dumps(info))
        _train_result(model, clock, out, device, mem.peak)


def bench_train_devices(m: standins.StandIns, inputs: Inputs, steps: int, rounds: int, device: str,
                        nproc: int) -> StageResult:
    """gplflow's trainer as one plain process against the same training as a torchrun job of ``nproc`` ranks
    (the path ``train.devices: N`` takes), at the same global batch: steps/s after the first step, wall time
    (start, imports and model loads included), and the embeddings both models give.

    Both variants start a fresh process each round (``python -m gplflow.adapters.distributed JOB`` alone, or
    under torchrun), as a stage does: a model trained a second time in one process runs warm (on an H200 the
    second and third runs in this process were 1.5-1.8x the first), which would flatter whichever variant ran in
    this process. The models agree up to floating-point noise and dropout: N ranks draw other dropout masks than
    one process (the stand-in student has dropout 0.1). With one rank, accelerate does not wrap the model in DDP
    (it does so from two processes on): N=1 measures the launch and the process group, not the all-reduce."""
    import subprocess

    from gplflow.adapters import distributed

    if BATCH % nproc:
        raise SystemExit(f"--train-devices {nproc}: the batch {BATCH} does not divide over {nproc} ranks")
    job_name = f"torchrun-{nproc}"
    walls: dict[str, list[float]] = {"one process": [], job_name: []}
    extras: dict[str, Any] = {"peak": {}}
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                        os.environ.get("PYTHONPATH")]))}

    def variant(label: str) -> Callable[[Any], tuple[float, float, Any]]:
        def run(_: Any) -> tuple[float, float, Any]:
            with tempfile.TemporaryDirectory() as tmp:
                payload = {"device": device, "out": tmp, "passages": len(inputs.passages), "steps": steps,
                           "student": m.student}
                started = time.perf_counter()
                if label == job_name:
                    distributed.launch(Path(tmp) / "job", nproc, "stages:ddp_train_rank", payload,
                                       what="benchmark", env=env)
                else:
                    job = Path(tmp) / "job.json"
                    job.write_text(json.dumps({"target": "stages:ddp_train_rank", "payload": payload}))
                    subprocess.run([sys.executable, "-m", "gplflow.adapters.distributed", str(job)], check=True,
                                   env={**os.environ, **env}, stdout=subprocess.DEVNULL)
                walls[label].append(time.perf_counter() - started)
                got = json.loads((Path(tmp) / "result.json").read_text())
                extras[label] = np.load(Path(tmp) / "probes.npy")
                if label == job_name:
                    extras["dist"] = json.loads((Path(tmp) / "dist.json").read_text())
                extras["peak"][label] = max(extras["peak"].get(label, 0), got["peak"])
            return got["secs"], got["done"], got["losses"]

        return run

    result = measure(f"train x{nproc}", "steps/s", {label: Variant(lambda: None, variant(label))
                                                    for label in walls}, rounds, device)
    a, b = result.runs["one process"][-1].output, result.runs[job_name][-1].output
    cosine = (extras["one process"] * extras[job_name]).sum(axis=1)
    one_wall, job_wall = statistics.median(walls["one process"]), statistics.median(walls[job_name])
    result.check = (f"MarginMSE loss, first -> last step: one process {a[0]:.4g} -> {a[-1]:.4g}, {nproc} ranks "
                    f"{b[0]:.4g} -> {b[-1]:.4g}; embeddings of {PROBES} passages, cosine one process vs {nproc} "
                    f"ranks: min {cosine.min():.5f}, mean {cosine.mean():.5f}")
    result.extra = (f"wall, start to end: one process {one_wall:.1f} s, torchrun {job_wall:.1f} s "
                    f"({job_wall - one_wall:+.1f} s); peak MiB one process {extras['peak']['one process'] / 2**20:.0f}"
                    f", rank 0 {extras['peak'][job_name] / 2**20:.0f}; rank 0 of torchrun saw {extras['dist']}")
    return result


def report_devices(r: StageResult, nproc: int) -> None:
    plain, job = r.rate("one process"), r.rate(f"torchrun-{nproc}")
    print(f"\ntrain on {nproc} device(s) as a torchrun job against one process, the same global batch {BATCH}:\n"
          f"  steps/s after the first step: one process {plain:.3f}, torchrun x{nproc} {job:.3f} "
          f"({job / plain:.3f}x; {(job / plain - 1) * 100:+.1f}%)\n  {r.check}\n  {r.extra}")


# --- pretrain ---------------------------------------------------------------------------------------------


def bench_pretrain(m: standins.StandIns, inputs: Inputs, steps: int, rounds: int, device: str) -> StageResult:
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    from gplflow.adapters import pretraining
    from gplflow.tasks.pretrain import PretrainConfig

    batch = 8  # the TSDAE / MLM recipes' batch
    settings = PretrainConfig(method="mlm", steps=steps, batch_size=batch, learning_rate=3e-5, warmup_steps=0,
                              max_seq_length=MAX_SEQ, checkpoint_every=10**9, seed=0, log_every=1)
    texts = inputs.passages[: (steps + 1) * batch]

    def reference(loaded: Any) -> tuple[float, float, Any]:
        tokenizer, model = loaded
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
        chunks = [tokenizer(t, truncation=True, max_length=MAX_SEQ) for t in texts]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5)
        clock = StepClock(device)
        model.train()
        for step in range(steps):
            features = {k: v.to(device) for k, v in collator(chunks[step * batch : (step + 1) * batch]).items()}
            loss = model(**features).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            clock.tick(loss.item())
        secs, done = clock.result()
        return secs, done, clock.losses

    def load_reference() -> Any:
        return AutoTokenizer.from_pretrained(m.student), AutoModelForMaskedLM.from_pretrained(m.student).to(device)

    def project(_: Any) -> tuple[float, float, Any]:
        clock = StepClock(device)
        with tempfile.TemporaryDirectory() as out:
            pretraining.pretrain(settings, m.student, texts, Path(out) / "ckpt", Path(out) / "model",
                                 on_progress=lambda _step, _total, loss: clock.tick(loss))
        secs, done = clock.result()
        return secs, done, clock.losses

    result = measure("pretrain", "steps/s", {
        "reference": Variant(load_reference, reference),
        "gplflow": Variant(lambda: None, project),  # pretraining.pretrain loads (and saves) the model itself
    }, rounds, device)
    a, b = result.runs["gplflow"][-1].output, result.runs["reference"][-1].output
    result.check = (f"MLM loss, first -> last step: gplflow {a[0]:.4g} -> {a[-1]:.4g}, "
                    f"reference {b[0]:.4g} -> {b[-1]:.4g}")
    return result


# --- end to end -------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the temporary Prefect server)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def end_to_end(m: standins.StandIns, inputs: Inputs, n: int, steps: int, device: str) -> None:
    """Wall and CPU seconds of ``gplflow run`` (the gpl-pipeline flow, its temporary Prefect API included) and
    of the reference stages back to back, on the same work: ``n`` passages x QPP, one miner, ``steps`` x 32
    triples, ``steps`` training steps. Both include model loading; gplflow also writes its artifacts. The two
    halves run one after the other, so on a shared machine the CPU seconds are the steadier figure."""
    import yaml

    from gplflow.flows.pipeline import gpl_pipeline

    started, cpu = time.perf_counter(), _cpu_seconds()
    tokenizer, generator = ref_load_generator(m.generator, device)
    queries = [q for found in ref_generate(tokenizer, generator, inputs.passages[:n], device) for q in found]
    del tokenizer, generator
    query_doc = np.repeat(np.arange(n), QPP)
    top = ref_mine(ref_load_encoder(m.retriever, device), inputs.passages[:n], queries, min(NEGATIVES + 1, n))
    negatives = [[d for d in row if d != query_doc[i]][:NEGATIVES] for i, row in enumerate(top)]
    rng = np.random.default_rng(0)
    tq = np.arange(steps * BATCH) % len(queries)
    tneg = [negatives[i][rng.integers(len(negatives[i]))] for i in tq]
    rows = {"query": [queries[i] for i in tq], "positive": [inputs.passages[query_doc[i]] for i in tq],
            "negative": [inputs.passages[j] for j in tneg]}
    rows["label"] = ref_label(ref_load_cross_encoder(m.cross_encoder, device), *rows.values()).tolist()
    ref_train(ref_load_encoder(m.student, device), rows, steps, device, [])
    reference, reference_cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    _release()

    with tempfile.TemporaryDirectory(prefix="gplflow-e2e-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": inputs.titles[i], "text": inputs.texts[i]})
                                  + "\n" for i in range(n)))
        config = Path(tmp) / "e2e.yaml"
        config.write_text(yaml.safe_dump({
            "name": "e2e", "corpus": {"path": str(corpus)},
            "models": {"generator": m.generator, "cross_encoder": m.cross_encoder, "base": m.student,
                       "retrievers": [{"name": m.retriever, "score": "cos_sim"}]},
            "generate": {"queries_per_passage": QPP}, "mine": {"negatives_per_query": NEGATIVES},
            "train": {"steps": steps, "batch_size": BATCH, "max_seq_length": MAX_SEQ},
        }))
        started, cpu = time.perf_counter(), _cpu_seconds()
        gpl_pipeline(config_path=str(config), run_dir=str(Path(tmp) / "run"))
        gplflow, gplflow_cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    print(f"\nend to end, {n} passages x {QPP} queries, {steps * BATCH} triples, {steps} steps:\n"
          f"  wall: gplflow run {gplflow:.1f} s, reference {reference:.1f} s ({reference / gplflow:.2f}x)\n"
          f"  CPU:  gplflow run {gplflow_cpu:.1f} s, reference {reference_cpu:.1f} s "
          f"({reference_cpu / gplflow_cpu:.2f}x)")


# --- report -----------------------------------------------------------------------------------------------


def report(results: list[StageResult], device: str) -> None:
    print(f"\n{'stage':<9} {'unit':<11} {'gplflow':>10} {'reference':>10} {'ratio':>7} {'peak MiB g/r':>15} "
          f"{'mem ratio':>9} {'load s g/r':>12}")
    for r in results:
        g, ref = r.rate("gplflow"), r.rate("reference")
        pg, pr = r.peak("gplflow"), r.peak("reference")
        print(f"{r.name:<9} {r.unit:<11} {g:>10.2f} {ref:>10.2f} {g / ref:>6.2f}x "
              f"{pg / 2**20:>7.0f}/{pr / 2**20:<7.0f} {pg / max(pr, 1):>8.2f}x "
              f"{r.load('gplflow'):>5.1f}/{r.load('reference'):<5.1f}")
    print()
    for r in results:
        print(f"{r.name}: {r.check}" + (f"; {r.extra}" if r.extra else ""))
    by = {r.name: r for r in results}
    seconds: dict[str, dict[str, float]] = {"gplflow": {}, "reference": {}}
    for v in seconds:
        if "generate" in by:
            seconds[v]["generate"] = PAPER["passages"] / by["generate"].rate(v)
        if "mine" in by:
            seconds[v]["mine"] = PAPER["miners"] * (PAPER["passages"] + PAPER["queries"]) / by["mine"].rate(v)
        if "label" in by:
            seconds[v]["label"] = PAPER["triples"] / by["label"].rate(v)
        if "train" in by:
            seconds[v]["train"] = PAPER["steps"] / by["train"].rate(v)
    if seconds["gplflow"]:
        print(f"\nthe paper's recipe on this device ({device}), extrapolated from these rates "
              "(both miners at the measured miner's rate):")
        for stage in seconds["gplflow"]:
            g, ref = seconds["gplflow"][stage], seconds["reference"][stage]
            print(f"  {stage:<9} gplflow {_hours(g):>10}   reference {_hours(ref):>10}")
        g, ref = sum(seconds["gplflow"].values()), sum(seconds["reference"].values())
        print(f"  {'total':<9} gplflow {_hours(g):>10}   reference {_hours(ref):>10}   ({ref / g:.2f}x)")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


STAGES = ("generate", "mine", "label", "train", "pretrain")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("tiny", "paper"), default="paper")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=models.device())
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per stage (default 2)")
    parser.add_argument("--work", type=float, default=1.0, help="multiply each stage's work (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per stage before the timed "
                        "ones (default 1 on CUDA, 0 on CPU)")
    parser.add_argument("--train-devices", type=int, default=0, metavar="N",
                        help="also train as a torchrun job of N ranks (train.devices: N) against one process, at "
                        "the same global batch: overhead and equivalence (N=1 on a one-GPU machine)")
    parser.add_argument("--end-to-end", action="store_true", help="also time `gplflow run` against the reference "
                        "stages back to back on the same work (CPU: ~6 min at --scale paper)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.warmup is not None:
        WARMUP[args.device] = args.warmup
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(STAGES)}")
    os.environ["GPLFLOW_DEVICE"] = args.device
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # new heads on random stand-ins are expected: no load reports
    work = {k: max(1, round(v * args.work)) for k, v in WORK[args.scale].items()}
    inputs = load_inputs(max(work["generate"], work["mine_passages"]))
    loading = time.perf_counter()
    m = standins.build(args.scale, inputs.texts)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"{time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"bf16 supported: {models.bf16_supported(args.device)}; scale {args.scale} "
          f"(stand-ins ready in {time.perf_counter() - loading:.0f} s); work {work}")
    runs: dict[str, Callable[[], StageResult]] = {
        "generate": lambda: bench_generate(m, inputs, work["generate"], args.rounds, args.device),
        "mine": lambda: bench_mine(m, inputs, work["mine_passages"], work["mine_queries"], args.rounds, args.device),
        "label": lambda: bench_label(m, inputs, work["label"], args.rounds, args.device),
        "train": lambda: bench_train(m, inputs, work["train"], args.rounds, args.device),
        "pretrain": lambda: bench_pretrain(m, inputs, work["pretrain"], args.rounds, args.device),
    }
    if stages:
        report([runs[s]() for s in stages], args.device)
    if args.train_devices:
        report_devices(bench_train_devices(m, inputs, work["train"], args.rounds, args.device, args.train_devices),
                       args.train_devices)
    if args.end_to_end:
        end_to_end(m, inputs, work["generate"], work["train"], args.device)


if __name__ == "__main__":
    main()
