"""The run report: a markdown artifact in the Prefect UI and the same summary for the terminal."""

from __future__ import annotations

import logging
from typing import Any

from prefect.artifacts import create_markdown_artifact

from gplflow.adapters.store import ArtifactStore
from gplflow.flows.config import PipelineConfig

logger = logging.getLogger(__name__)

STAGES = ("corpus", "pretrain", "queries", "negatives", "triples", "model", "evaluate")
METRICS = ("ndcg@10", "map@100", "recall@100", "mrr@10")


def stage_rows(store: ArtifactStore) -> list[dict[str, Any]]:
    """One row per published stage: rows, seconds and what it counted (dropped duplicates, …)."""
    rows = []
    for stage in STAGES:
        manifest = store.read_manifest(stage)
        if manifest is None:
            continue
        rows.append({
            "stage": stage,
            "rows": manifest.get("rows", 0),
            "seconds": manifest.get("timings", {}).get("seconds"),
            "counters": ", ".join(f"{k}={v}" for k, v in sorted(manifest.get("counters", {}).items())),
        })
    return rows


def sample_queries(store: ArtifactStore, n: int = 5) -> list[tuple[str, str]]:
    """A few generated queries beside the passage they came from."""
    queries, corpus = store.load("queries"), store.load("corpus")
    if queries is None or corpus is None:
        return []
    picked = queries.read_table(["doc_id", "text"]).slice(0, 200).to_pylist()[:: max(1, 200 // n)][:n]
    wanted = {q["doc_id"] for q in picked}
    texts: dict[str, str] = {}
    for batch in corpus.iter_batches(["doc_id", "text"]):
        for row in batch.to_pylist():
            if row["doc_id"] in wanted:
                texts[row["doc_id"]] = row["text"]
    return [(q["text"], texts.get(q["doc_id"], "")) for q in picked]


def metrics_markdown(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "_No evaluation (set `evaluate.qrels`)._"
    models = [m for m in metrics.get("models", {})]
    lines = ["| metric | " + " | ".join(models) + " | adapted − base |", "|---" * (len(models) + 2) + "|"]
    for metric in METRICS:
        values = [metrics["models"][m].get(metric) for m in models]
        delta = metrics.get("delta", {}).get(metric)
        cells = " | ".join(f"{v:.4f}" if v is not None else "–" for v in values)
        lines.append(f"| {metric} | {cells} | {delta:+.4f} |" if delta is not None else f"| {metric} | {cells} | – |")
    return "\n".join(lines)


def report_markdown(cfg: PipelineConfig, store: ArtifactStore, summary: dict[str, Any]) -> str:
    models = summary.get("models", {})
    parts = [
        f"# gplflow run `{cfg.name}` ({cfg.flow}, loss {cfg.train.loss})",
        f"Run directory: `{summary['run_dir']}` · {summary.get('seconds', '?')} s",
        "## Models",
        *(f"- **{k}**: `{v}`" for k, v in models.items() if k != "retrievers"),
        *(f"- **retriever**: `{n}` ({s})" for n, s in models.get("retrievers", [])),
        "## Stages",
        "| stage | rows | seconds | counters |",
        "|---|---|---|---|",
        *(f"| {r['stage']} | {r['rows']} | {r['seconds']} | {r['counters']} |" for r in stage_rows(store)),
        "## Metrics",
        metrics_markdown(summary.get("metrics")),
        "## Sample of generated queries",
        "| query | passage |",
        "|---|---|",
        *(f"| {_cell(q)} | {_cell(p, 240)} |" for q, p in sample_queries(store)),
    ]
    return "\n".join(parts)


def _cell(text: str, limit: int = 120) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def publish_report(cfg: PipelineConfig, store: ArtifactStore, summary: dict[str, Any]) -> None:
    """Publish the markdown report artifact for the Prefect UI (key: gplflow-report-<run name>)."""
    key = "gplflow-report-" + "".join(c if c.isalnum() else "-" for c in cfg.name.lower())
    create_markdown_artifact(markdown=report_markdown(cfg, store, summary), key=key,
                             description=f"gplflow run {cfg.name}")
