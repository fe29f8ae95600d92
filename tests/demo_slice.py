"""A BEIR slice of the bundled demo data for flow tests: the first passages, the qrels judged on them, and the
queries those judge (``<root>/corpus/{corpus.jsonl,queries.jsonl,qrels/test.tsv}``)."""

from __future__ import annotations

import json
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def beir_slice(root: Path, n_docs: int) -> tuple[Path, int]:
    """Write the slice under ``root``; returns its corpus folder and how many judged queries it kept."""
    docs = [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text().splitlines()[:n_docs]]
    ids = {d["_id"] for d in docs}
    (root / "corpus" / "qrels").mkdir(parents=True)
    (root / "corpus" / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    lines = (DEMO / "qrels" / "test.tsv").read_text().splitlines()
    kept = [line for line in lines[1:] if line.split("\t")[1] in ids]
    qids = {line.split("\t")[0] for line in kept}
    (root / "corpus" / "qrels" / "test.tsv").write_text("\n".join([lines[0], *kept]) + "\n")
    queries = [line for line in (DEMO / "queries.jsonl").read_text().splitlines() if json.loads(line)["_id"] in qids]
    (root / "corpus" / "queries.jsonl").write_text("\n".join(queries) + "\n")
    return root / "corpus", len(qids)
