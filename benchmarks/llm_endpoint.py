"""Queries per second of the OpenAI-compatible endpoint client at 1, 8 and 32 requests in flight.

The server is tests/llm_server.py on loopback with a fixed simulated latency per chat completion (a model that
takes that long to answer, whatever the load), so the figure is the client's: how well it keeps requests in
flight, and what it costs per request (JSON, HTTP, parsing). With latency L and concurrency c, the ceiling is
c / L requests per second, times the queries per request (``n``).

    .venv/bin/python benchmarks/llm_endpoint.py [--latency-ms 100] [--qpp 3] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from llm_server import FakeLLMServer  # the tests' loopback server

from gplflow.adapters.llm_base import Sampling
from gplflow.adapters.llm_endpoint import EndpointGenerator, EndpointSettings
from gplflow.adapters.llm_prompts import build_prompt, parse_completions

PASSAGE = ("Glaciers store most of the fresh water on Earth and move slowly under their own weight, carving "
           "valleys and leaving moraines behind when they retreat.")


def measure(concurrency: int, latency_s: float, qpp: int, passages: int) -> dict[str, float]:
    with FakeLLMServer(latency_s=latency_s) as server:
        settings = EndpointSettings(server.base_url, "tiny-chat", max_concurrency=concurrency, timeout_s=30)
        gen = EndpointGenerator(settings, build_prompt("few_shot"), Sampling(qpp, 1.0, 0.95, 64), 350)
        texts = [f"{PASSAGE} ({i})" for i in range(passages)]
        started = time.perf_counter()
        results, usage = gen.generate(texts, [f"d{i}" for i in range(passages)], 42, lambda _n: None)
        queries = sum(len(parse_completions(((c.text, c.logprob) for c in r.completions), t, 32).queries)
                      for t, r in zip(texts, results, strict=True))
        seconds = time.perf_counter() - started
        return {"concurrency": concurrency, "passages": passages, "queries": queries, "seconds": round(seconds, 3),
                "queries_per_s": round(queries / seconds, 1), "requests_per_s": round(passages / seconds, 1),
                "ceiling_queries_per_s": round(concurrency / latency_s * qpp, 1),
                "max_in_flight": server.max_in_flight, "requests": usage.counters["requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--qpp", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-slot", type=int, default=16, help="passages = this x concurrency (min 32)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for c in args.concurrency:
        row = measure(c, args.latency_ms / 1000, args.qpp, max(32, args.requests_per_slot * c))
        print(json.dumps(row))


if __name__ == "__main__":
    main()
