"""Shards on every visible device (``execution.devices``) against one device, and mine's corpus encoding against
sentence-transformers' multi-process encoding over the same devices: which pays, measured where it runs.

For generate, mine and label, over the demo corpus repeated to ``--passages`` with the stand-in models of
``benchmarks/standins.py``, each stage runs twice into fresh run directories: in this process (one device), and
with its shards spread one process per device (``flows/local_devices.spread``, as a local run does) before the
same publish. Reported: seconds of the shards and of the publish, the speed-up, and whether the rows are the
same (queries and mined ids exactly; the largest score difference). Then the corpus encoding alone: gplflow's
``encode`` in this process, against ``SentenceTransformer.encode`` with a pool from
``start_multi_process_pool`` over the devices (pool start-up reported apart).

    .venv/bin/python benchmarks/local_devices.py --scale paper --passages 20000   # a host with several GPUs
    GPLFLOW_FAKE_DEVICES=2 .venv/bin/python benchmarks/local_devices.py --scale tiny --passages 300   # CPU check

On a CPU with ``GPLFLOW_FAKE_DEVICES`` the stand-in processes share the cores: the figures show the start-up
cost and check the rows, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import standins
from stages import load_inputs

from gplflow.adapters import device_workers, encoding, models
from gplflow.adapters.store import Artifact
from gplflow.flows import local_devices
from gplflow.flows.stages import shard_stage
from gplflow.tasks import generate, ingest, label, mine


def corpus(run_dir: Path, titles: list[str], texts: list[str]) -> Artifact:
    path = run_dir.parent / "corpus.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"_id": f"d{i}", "title": t, "text": x}) + "\n"
                                for i, (t, x) in enumerate(zip(titles, texts, strict=True))), encoding="utf-8")
    return ingest.run_ingest(ingest.IngestInputs(run_dir=str(run_dir), cfg=ingest.IngestConfig(path=str(path))))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    found = fn()
    return time.perf_counter() - started, found


def run_stage(name: str, inputs: Any, devices: list[str]) -> tuple[float, float, Artifact]:
    """(seconds of the shards, seconds of the publish, artifact): spread over ``devices`` when several."""
    run = {"generate": generate.run_generate, "mine": mine.run_mine, "label": label.run_label}[name]
    if len(devices) < 2:
        seconds, artifact = timed(lambda: run(inputs))
        return seconds, 0.0, artifact
    spread, _ = timed(lambda: local_devices.spread(shard_stage(name), inputs, devices))
    publish, artifact = timed(lambda: run(inputs))
    return spread, publish, artifact


def pipeline(root: Path, m: standins.StandIns, data: Any, args: argparse.Namespace,
             devices: list[str]) -> dict[str, tuple[float, float, Artifact]]:
    run_dir = root / f"devices-{len(devices)}"
    found = corpus(run_dir, data.titles, data.texts).ref
    out: dict[str, tuple[float, float, Artifact]] = {}
    gen = generate.GenerateConfig(method="t5", queries_per_passage=args.qpp, seed=1)
    out["generate"] = run_stage("generate", generate.GenerateInputs(
        run_dir=str(run_dir), cfg=gen, corpus=found, generator=m.generator, shard_size=args.shard_size), devices)
    queries = out["generate"][2].ref
    out["mine"] = run_stage("mine", mine.MineInputs(
        run_dir=str(run_dir), cfg=mine.MineConfig(), corpus=found, queries=queries,
        retrievers=((m.retriever, "cos_sim"),), shard_size=args.shard_size), devices)
    out["label"] = run_stage("label", label.LabelInputs(
        run_dir=str(run_dir), cfg=label.LabelConfig(seed=1), triples=args.triples, corpus=found, queries=queries,
        negatives=out["mine"][2].ref, teacher=m.cross_encoder, shard_size=args.shard_size), devices)
    return out


def same_rows(a: Artifact, b: Artifact) -> str:
    x, y = a.read_pandas(), b.read_pandas()
    floats = [c for c in x.columns if x[c].dtype.kind == "f"]
    lists = [c for c in x.columns if c == "scores"]
    keys = [c for c in x.columns if c not in floats + lists]
    if x[keys].astype(str).values.tolist() != y[keys].astype(str).values.tolist():
        return "rows differ"
    diffs = [float(np.max(np.abs(x[c].to_numpy() - y[c].to_numpy()))) for c in floats if len(x)]
    diffs += [float(np.max(np.abs(np.concatenate(x[c].to_list()) - np.concatenate(y[c].to_list())))) for c in lists
              if len(x)]
    return f"same rows, scores within {max(diffs, default=0.0):.1e}"


def st_pool_encode(m: standins.StandIns, texts: list[str], devices: list[str], batch_size: int) -> tuple[float, float]:
    """(pool start-up seconds, encode seconds) of sentence-transformers' multi-process encoding."""
    model = models.load_bi_encoder(m.retriever, inference=True)
    targets = ["cpu" if d.startswith("cpu") else f"cuda:{i}" for i, d in enumerate(devices)]
    start, pool = timed(lambda: model.start_multi_process_pool(target_devices=targets))
    try:
        seconds, _ = timed(lambda: model.encode(texts, pool=pool, batch_size=batch_size, normalize_embeddings=True))
    finally:
        model.stop_multi_process_pool(pool)
    return start, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("tiny", "paper"), default="paper")
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--qpp", type=int, default=3, help="queries per passage (default 3)")
    parser.add_argument("--triples", type=int, default=20_000)
    parser.add_argument("--shard-size", type=int, default=500, help="rows per shard (default 500)")
    args = parser.parse_args(argv)

    devices = device_workers.visible_devices()
    print(f"devices: {', '.join(devices)}" + (" (stand-ins)" if device_workers.fake_devices() else ""))
    if len(devices) < 2:
        raise SystemExit("one device visible: nothing to spread (GPLFLOW_FAKE_DEVICES=2 tries the path on a CPU)")
    data = load_inputs(args.passages)
    m = standins.build(args.scale, data.passages[:200])
    with tempfile.TemporaryDirectory(prefix="gplflow-bench-devices-") as scratch:
        one = pipeline(Path(scratch), m, data, args, ["one"])
        many = pipeline(Path(scratch), m, data, args, devices)
        print(f"\n{'stage':<9} {'1 device s':>11} {f'{len(devices)} devices s':>12} {'(shards + publish)':>20} "
              f"{'speed-up':>9}  rows")
        for stage in ("generate", "mine", "label"):
            a, (shards, publish, b) = one[stage], many[stage]
            print(f"{stage:<9} {a[0]:>11.1f} {shards + publish:>12.1f} {f'{shards:.1f} + {publish:.1f}':>20} "
                  f"{a[0] / (shards + publish):>8.2f}x  {same_rows(a[2], b)}")

    model = models.load_bi_encoder(m.retriever, inference=True)
    batch = mine.MineConfig().batch_size
    alone, _ = timed(lambda: encoding.encode(model, data.passages, role="document", batch_size=batch, normalize=True,
                                             desc="encode"))
    start, pooled = st_pool_encode(m, data.passages, devices, batch)
    print(f"\ncorpus encoding of {len(data.passages)} passages: gplflow encode on one device {alone:.1f} s; "
          f"sentence-transformers pool over {len(devices)} devices {pooled:.1f} s (+ {start:.1f} s pool start-up); "
          f"mine's shards over {len(devices)} device processes above (start-up and model loading included)")


if __name__ == "__main__":
    main()
