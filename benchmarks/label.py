"""Pseudo-labelling triples: the project's scorer (each distinct pair once, length-sorted) against the reference's way.

``tasks/label.py`` scores every distinct (query, passage) pair of the drawn triples once, in length-sorted
batches under ``models.inference()`` (bf16 autocast where supported). UKPLab gpl's labeler (gpl/toolkit/pl.py)
takes the triples in its (shuffled) loader's order, ``batch_size`` at a time, and scores both pairs of each one,
so a query's positive pair is scored again in every triple it recurs in. This script times, in one process:

- ``project``: ``gplflow.adapters.scoring`` (``CrossEncoderScorer`` / ``BiEncoderScorer``, as ``load_scorer``
  builds them) over the distinct pairs, the deduplication included;
- ``project fp32``: the same with bf16 autocast off (GPLFLOW_NO_BF16=1): dedup + sorting without bf16;
- ``reference``: the triples in a seeded shuffled order, ``batch_size`` triples at a time, fp32. Cross-encoder:
  one ``CrossEncoder.predict`` of the batch's 2 x batch_size pairs (as pl.py calls it; sentence-transformers
  sorts those 2 x batch_size pairs by length inside the call). Bi-encoder teacher (pl.py has none; the same
  pattern): ``model.encode`` of the batch's queries, positives and negatives, then dot products. pl.py's
  re-tokenisation of every text before scoring is left out, which only flatters the reference.

Teachers: the tiny random-weight cross-encoder (``build_tiny_models(...).cross_encoder``: fine for timing,
the scores mean nothing) and the real all-MiniLM-L6-v2 as the bi-encoder teacher (the demo's route). The tiny
cross-encoder (64 wide, 2 layers) is too small for bf16 to matter; ``--cross-encoder minilm`` swaps in one of
the paper's size (MiniLM-L6's 6 x 384 body with a random one-logit head, the shape of
cross-encoder/ms-marco-MiniLM-L6-v2; built offline), and ``--cross-encoder PATH`` takes any saved one.
Triples: the demo's route, built offline in a temporary run folder (ingest data/demo, extractive queries
with 3 per passage, MiniLM-mined negatives, 20 per query) unless ``--run-dir`` names a run whose corpus,
queries and negatives artifacts to use; then drawn with the label stage's own ``draw_triples``. The demo
labels 6400 triples over 1011 queries; the default here is a quarter of that (1600 triples over a seeded
sample of 253 queries: the same ~6.3 triples per query), because the reference's bi-encoder path alone
takes ~3 minutes per repeat on the full set (``--triples 6400 --queries 0`` runs it).

"model inputs" are what the model runs on: pairs for the cross-encoder, texts encoded for the bi-encoder
(each distinct query and passage once in the project; a query, a positive and a negative per triple in the
reference). Each variant runs once on a few batches to warm up, then ``--repeats`` times, interleaved;
medians are shown, and the ratio is reference time / variant time (>1: faster than the reference).
Agreement: every reference score is compared with the project's score of the same pair: ``project fp32``
must match within 1e-4, ``project`` (bf16) within 2.5% of the span of the reference's scores. The machine is
shared and noisy: read the ratios, not the seconds.

    .venv/bin/python benchmarks/label.py --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the scorers' progress bars would drown the table

import numpy as np
import torch

from gplflow.adapters import models
from gplflow.adapters.scoring import BiEncoderScorer, CrossEncoderScorer, load_scorer
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.text import passage_texts
from gplflow.adapters.tiny_models import build_tiny_models, default_cache_dir
from gplflow.tasks.generate import GenerateConfig, GenerateInputs, run_generate
from gplflow.tasks.ingest import IngestConfig, IngestInputs, run_ingest
from gplflow.tasks.label import LabelConfig, draw_triples, load_pool
from gplflow.tasks.mine import MineConfig, MineInputs, run_mine

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
FP32_TOL = 1e-4  # absolute: the same fp32 forward pass, only the batch (and so the padding) differs
BF16_TOL = 0.025  # relative to the span of the reference's scores: bf16 keeps 8 bits of mantissa per matmul


@dataclass(frozen=True)
class Triples:
    queries: list[str]  # query texts, by query index
    passages: list[str]  # passage texts, by corpus row
    tq: np.ndarray  # query index of each triple
    pos: np.ndarray  # corpus row of each triple's positive
    neg: np.ndarray  # corpus row of each triple's negative

    def head(self, n: int) -> Triples:
        return Triples(self.queries, self.passages, self.tq[:n], self.pos[:n], self.neg[:n])


def build_triples(run_dir: Path | None, n: int, n_queries: int | None, seed: int) -> Triples:
    """The demo's corpus, queries and negatives (built offline unless ``run_dir`` has them); n drawn triples.

    With ``n_queries``, the triples are spread over a seeded sample of that many queries only.
    """
    with tempfile.TemporaryDirectory(prefix="gplflow-bench-label-") as tmp, \
            contextlib.redirect_stderr(io.StringIO()):  # the stages' own progress bars
        store = ArtifactStore(run_dir or tmp)
        if run_dir is not None:
            corpus, queries, negatives = (store.require(s) for s in ("corpus", "queries", "negatives"))
        else:
            minilm = str(models.packaged_minilm_path())
            run = store.root_url
            corpus = run_ingest(IngestInputs(run_dir=run, cfg=IngestConfig(path=str(DEMO))))
            queries = run_generate(GenerateInputs(run_dir=run, corpus=corpus.ref, cfg=GenerateConfig(
                method="extractive", queries_per_passage=3, seed=7)))
            negatives = run_mine(MineInputs(run_dir=run, cfg=MineConfig(negatives_per_query=20, max_seq_length=256),
                                            corpus=corpus.ref, queries=queries.ref,
                                            retrievers=((minilm, "cos_sim"),)))
        pool = load_pool(corpus, queries, negatives)
        passages = passage_texts(corpus.read_table(["title", "text"]))
    sizes = np.diff(pool.offsets)
    if n_queries is not None and n_queries < np.count_nonzero(sizes):
        keep = np.random.default_rng(seed).choice(np.flatnonzero(sizes), size=n_queries, replace=False)
        sizes = np.where(np.isin(np.arange(len(sizes)), keep), sizes, 0)
    tq, slot = draw_triples(sizes, n, seed)
    return Triples(pool.query_texts, passages, tq, pool.positives[tq], pool.negatives[pool.offsets[tq] + slot])


def no_bf16():
    """Switch the project's bf16 autocast off (``models.bf16_supported`` reads GPLFLOW_NO_BF16 per call)."""
    return mock.patch.dict(os.environ, {"GPLFLOW_NO_BF16": "1"})


def project(scorer: CrossEncoderScorer | BiEncoderScorer, t: Triples) -> tuple[np.ndarray, np.ndarray]:
    """(distinct pair keys, their scores), the way ``LabelJob`` deduplicates and scores them."""
    n_docs = len(t.passages)
    keys = np.unique(np.concatenate([t.tq * n_docs + t.pos, t.tq * n_docs + t.neg]))
    pair_q, pair_d = keys // n_docs, keys % n_docs
    used = np.unique(pair_d)
    scores = scorer.score(t.queries, [t.passages[i] for i in used], pair_q, np.searchsorted(used, pair_d))
    return keys, scores


def reference(kind: str, model, t: Triples, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(pair keys, scores) for every triple's (q, pos) and (q, neg) pair, in triple order, fp32."""
    n_docs = len(t.passages)
    keys, scores = [], []
    for start in range(0, len(t.tq), batch):
        idx = np.arange(start, min(start + batch, len(t.tq)))
        q = [t.queries[i] for i in t.tq[idx]]
        pos, neg = [t.passages[i] for i in t.pos[idx]], [t.passages[i] for i in t.neg[idx]]
        if kind == "cross_encoder":
            s = model.predict(list(zip(q, pos, strict=True)) + list(zip(q, neg, strict=True)), batch_size=batch,
                              show_progress_bar=False, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
        else:
            qe, pe, ne = (model.encode(x, batch_size=batch, show_progress_bar=False) for x in (q, pos, neg))
            s = np.concatenate([np.sum(qe * pe, axis=1), np.sum(qe * ne, axis=1)])
        keys.append(np.concatenate([t.tq[idx] * n_docs + t.pos[idx], t.tq[idx] * n_docs + t.neg[idx]]))
        scores.append(s)
    return np.concatenate(keys), np.concatenate(scores).astype(np.float32)


def max_diff(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest |score difference| over the reference's pairs, each looked up among the project's pairs."""
    ref_keys, ref_scores = ref
    keys, scores = got
    at = np.searchsorted(keys, ref_keys)
    if not np.array_equal(keys[at], ref_keys):
        raise RuntimeError("the project and the reference scored different pairs")
    return float(np.max(np.abs(scores[at] - ref_scores)))


def bench(kind: str, model_ref: str, t: Triples, batch: int, repeats: int, seed: int) -> dict:
    scorer = load_scorer(kind, model_ref, max_seq_length=LabelConfig().max_seq_length, batch_size=batch)
    order = np.random.default_rng(seed).permutation(len(t.tq))  # pl.py's loader shuffles

    def fp32_project(t: Triples) -> tuple[np.ndarray, np.ndarray]:
        with no_bf16():
            return project(scorer, t)

    runs: dict[str, Callable[[Triples], tuple[np.ndarray, np.ndarray]]] = {
        "project": lambda t: project(scorer, t),
        "project fp32": fp32_project,
        "reference": lambda t: reference(kind, scorer.model, t, batch),
    }
    for fn in runs.values():  # warm-up on a few batches, not timed
        fn(t.head(4 * batch))
    t = Triples(t.queries, t.passages, t.tq[order], t.pos[order], t.neg[order])  # the reference's loader order
    times: dict[str, list[float]] = {name: [] for name in runs}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            out[name] = fn(t)
            times[name].append(time.perf_counter() - start)
    n_docs = len(t.passages)
    keys = out["project"][0]
    distinct_texts = len(np.unique(keys // n_docs)) + len(np.unique(keys % n_docs))
    return {
        "pairs": {name: len(out[name][0]) for name in runs},
        "inputs": {name: len(out[name][0]) if kind == "cross_encoder" else
                   3 * len(t.tq) if name == "reference" else distinct_texts for name in runs},
        "median": {name: statistics.median(v) for name, v in times.items()},
        "diff_fp32": max_diff(out["reference"], out["project fp32"]),
        "diff_bf16": max_diff(out["reference"], out["project"]),
        "score_range": float(np.ptp(out["reference"][1])),
    }


def cross_encoder(ref: str, t: Triples, scratch: Path) -> str:
    """A cross-encoder folder: the tiny one, MiniLM-L6 with a random one-logit head, or ``ref`` itself."""
    if ref == "tiny":
        return str(build_tiny_models(t.passages + t.queries, default_cache_dir(), seed=0).cross_encoder)
    if ref != "minilm":
        return ref
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the head is meant to be new: no "newly initialized" report
    torch.manual_seed(0)
    src = str(models.packaged_minilm_path())
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=1).save_pretrained(scratch)
    AutoTokenizer.from_pretrained(src).save_pretrained(scratch)
    return str(scratch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after one warm-up (default 2)")
    parser.add_argument("--triples", type=int, default=1600,
                        help="triples to label (default 1600; the demo labels 6400)")
    parser.add_argument("--queries", type=int, default=253,
                        help="spread the triples over a seeded sample of this many queries, 0 = all (default "
                             "253: a quarter of the demo's 1011, so ~6.3 triples per query as in the demo)")
    parser.add_argument("--batch-size", type=int, default=LabelConfig().batch_size, help="label.batch_size")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="a run folder with corpus/, queries/ and negatives/ (default: build the demo's)")
    parser.add_argument("--teacher", choices=["cross_encoder", "bi_encoder", "both"], default="both")
    parser.add_argument("--cross-encoder", default="tiny",
                        help="tiny (default), minilm (MiniLM-L6 body, random head) or a cross-encoder folder")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gplflow-bench-ce-") as scratch:
        run(args, Path(scratch))


def run(args: argparse.Namespace, scratch: Path) -> None:
    t = build_triples(args.run_dir, args.triples, args.queries or None, args.seed)
    n_distinct = len(np.unique(np.concatenate([t.tq * len(t.passages) + t.pos, t.tq * len(t.passages) + t.neg])))
    print(f"{len(t.tq)} triples over {len(np.unique(t.tq))} queries and {len(t.passages)} passages: "
          f"{2 * len(t.tq)} pair scorings in the reference, {n_distinct} distinct pairs; batch {args.batch_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 autocast: {models.bf16_supported()}")
    teachers = {
        "cross_encoder": lambda: cross_encoder(args.cross_encoder, t, scratch),
        "bi_encoder": lambda: str(models.packaged_minilm_path()),
    }
    kinds = list(teachers) if args.teacher == "both" else [args.teacher]
    ok = True
    print(f"\n{'teacher':<14} {'variant':<13} {'pairs scored':>12} {'model inputs':>12} {'median s':>9} "
          f"{'ref / variant':>14}")
    results = {}
    for kind in kinds:
        r = results[kind] = bench(kind, teachers[kind](), t, args.batch_size, args.repeats, args.seed)
        for name, secs in r["median"].items():
            ratio = r["median"]["reference"] / secs
            print(f"{kind:<14} {name:<13} {r['pairs'][name]:>12} {r['inputs'][name]:>12} {secs:>9.2f} "
                  f"{ratio:>13.2f}x")
    print("\nagreement with the reference's scores of the same pairs (max |diff|):")
    for kind, r in results.items():
        tol16 = BF16_TOL * r["score_range"]
        good32, good16 = r["diff_fp32"] <= FP32_TOL, r["diff_bf16"] <= tol16
        ok = ok and good32 and good16
        print(f"{kind:<14} project fp32 {r['diff_fp32']:.2e} (tol {FP32_TOL:g}: {'ok' if good32 else 'FAIL'}), "
              f"project (bf16) {r['diff_bf16']:.2e} (tol {tol16:.2e} = {BF16_TOL:g} x the reference scores' "
              f"span {r['score_range']:.2f}: {'ok' if good16 else 'FAIL'})")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
