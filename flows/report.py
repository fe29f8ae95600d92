"""The run report: a markdown artifact and a per-stage table artifact in the Prefect UI.

The report says what ran (a short config summary, the models as configured and what they resolved to), what
each stage produced and how long it took, the prompt of an LLM run, the filter's drops by reason with examples, a
sample of passages with every query generated from each (and what became of it: held out, dropped by the filter,
trained on), the retrieval metrics of the base, pretrained and adapted models on the judged (qrels) and the
held-out synthetic queries side by side, which model was promoted and why, and the teacher's label diagnostics.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gplflow.adapters.store import ArtifactStore
from gplflow.flows.stages import artifact_names, made_by, models_used, planned
from gplflow.tasks.evaluation_table import (
    SIGNIFICANCE_COLUMNS,
    judged_note,
    metrics_table,
    ordered_models,
    significance_rows,
)
from gplflow.tasks.filter import SECTION as FILTER
from gplflow.tasks.filter import active as filter_active
from gplflow.tasks.filter import report_lines as filter_report
from gplflow.tasks.generate import report_lines as generate_report
from gplflow.tasks.progress import artifact_key  # one rule for every key, in the tasks and the flows

if TYPE_CHECKING:  # the config imports every stage (torch); the report's stage rows need none of it
    from gplflow.flows.config import PipelineConfig

logger = logging.getLogger(__name__)

SAMPLE_PASSAGES = 4


def config_rows(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """The settings that shape a run: the flow, then one line per stage this run computes (each stage writes its
    own), then how it executes."""
    t = cfg.train
    rows = [("flow", f"{cfg.flow}, loss {t.loss}" + (f", profile {cfg.profile}" if cfg.profile != "default" else ""))]
    if cfg.import_.gpl_dir:
        rows.append(("import", f"UKPLab gpl folder `{cfg.import_.gpl_dir}`"))
    rows += [(stage.name, stage.settings(cfg)) for stage in planned(cfg) if stage.settings is not None
             and not (stage.name == "ingest" and cfg.corpus is None)]
    rows.append(("execution", f"{cfg.execution.mode}, shards of {cfg.execution.shard_size}"))
    return rows


def model_rows(cfg: PipelineConfig, resolved: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(role, as configured, what it resolved to) for each model this run uses."""
    return [(use.role, use.ref, use.resolved(resolved)) for use in models_used(cfg)]


def stage_rows(store: ArtifactStore, run_started: float | None = None) -> list[dict[str, Any]]:
    """One row per published stage: rows, seconds, whether this run made it, and what it counted.

    Seconds of a sharded stage are the shards' compute time (summed over workers) plus publishing. A stage
    published before ``run_started`` was reused from an earlier run. Model stages (pretrain, train) have no
    rows; they show their steps, examples and loss instead of counters.
    """
    rows = []
    for stage in artifact_names():
        manifest = store.read_manifest(stage)
        if manifest is None:
            continue
        timings = manifest.get("timings", {})
        seconds = timings.get("seconds")
        shard_seconds = [s.get("seconds") for s in manifest.get("shards", {}).get("shards", [])]
        if seconds is not None and shard_seconds and None not in shard_seconds:
            seconds += sum(shard_seconds)
        reused = run_started is not None and timings.get("started", run_started) < run_started
        training = manifest.get("train") or manifest.get("pretrain")
        rows.append({
            "stage": f"{made_by(stage)} → {stage}" if made_by(stage) != stage else stage,
            "rows": None if training else manifest.get("rows", 0),
            "seconds": round(seconds, 1) if seconds is not None else None,
            "this run": "reused" if reused else "computed",
            "counters": _training(training) if training else
            ", ".join(f"{k}={v}" for k, v in sorted(manifest.get("counters", {}).items())),
        })
    return rows


def _training(info: dict[str, Any]) -> str:
    """steps, examples and the first and last logged loss of a training stage's manifest."""
    parts = [f"steps={info.get('steps')}", f"examples={info.get('examples')}"]
    first, last = info.get("loss_first"), info.get("loss_last")
    if first is not None and last is not None:
        parts.append(f"loss {first:.4f} → {last:.4f}")
    if info.get("resumed_from_step"):
        parts.append(f"resumed at step {info['resumed_from_step']}")
    return ", ".join(parts)


class Sampled(NamedTuple):
    """A passage of the report's sample and the queries generated from it: (text, log-prob or None, fate)."""

    doc_id: str
    title: str
    text: str
    queries: list[tuple[str, float | None, str]]


def sample_passages(store: ArtifactStore, n: int = SAMPLE_PASSAGES, filtered: bool = False) -> list[Sampled]:
    """``n`` passages spread evenly over those the queries artifact has queries for, each with every query generated
    from it and that query's fate: ``held out`` (split off for evaluation), ``dropped by the filter`` (when
    ``filtered``: the run's filter published ``queries-filtered/``) or ``trained on``."""
    queries, corpus = store.load("queries"), store.load("corpus")
    if queries is None or corpus is None or queries.rows == 0:
        return []
    # the passages in the order their queries first appear (the doc ids only), then the picked ones' queries
    docs = list(dict.fromkeys(d for batch in queries.iter_batches(["doc_id"]) for d in batch.column(0).to_pylist()))
    picked = [docs[i] for i in sorted({round(i * len(docs) / n) for i in range(min(n, len(docs)))})]
    chosen = set(picked)
    columns = ["query_id", "doc_id", "text"] + (["logprob"] if _has_column(queries, "logprob") else [])
    by_doc: dict[str, list[dict[str, Any]]] = {d: [] for d in picked}
    for batch in queries.iter_batches(columns):
        for row in batch.to_pylist():
            if row["doc_id"] in chosen:
                by_doc[row["doc_id"]].append(row)
    ids = {row["query_id"] for rows in by_doc.values() for row in rows}
    heldout = _ids(store, "heldout", ids)
    kept = _ids(store, "queries-filtered", ids) if filtered else None
    passages: dict[str, tuple[str, str]] = {}
    for batch in corpus.iter_batches(["doc_id", "title", "text"]):
        for row in batch.to_pylist():
            if row["doc_id"] in chosen:
                passages[row["doc_id"]] = (row["title"] or "", row["text"] or "")

    def fate(query_id: str) -> str:
        if query_id in heldout:
            return "held out"
        return "dropped by the filter" if kept is not None and query_id not in kept else "trained on"

    return [Sampled(d, *passages.get(d, ("", "")), [(r["text"], r.get("logprob"), fate(r["query_id"]))
                                                   for r in by_doc[d]]) for d in picked]


def _has_column(artifact: Any, name: str) -> bool:
    import pyarrow.parquet as pq

    with artifact.store.fs.open(artifact.part_paths()[0], "rb") as fh:
        return name in pq.read_schema(fh).names


def _ids(store: ArtifactStore, stage: str, wanted: set[str]) -> set[str]:
    """The ids among ``wanted`` that artifact ``stage`` holds (none when the run has no such artifact)."""
    found = store.load(stage)
    if found is None:
        return set()
    return {i for batch in found.iter_batches(["query_id"]) for i in batch.column(0).to_pylist() if i in wanted}


def sample_markdown(samples: list[Sampled]) -> list[str]:
    """Each sampled passage, then its queries below it (with the generator's mean token log-prob when it gave one,
    and each query's fate)."""
    lines = []
    for i, s in enumerate(samples, 1):
        lines.append(f"{i}. {_passage(s.doc_id, s.title, s.text)}")
        lines += [f"   - **{_inline(q, 200)}**" + (f" (log-prob {lp:.3g})" if lp is not None else "") + f": {fate}"
                  for q, lp, fate in s.queries]
    return lines


def metrics_markdown(metrics: dict[str, Any] | None) -> str:
    """The evaluations side by side (``tasks/evaluation_table.py``) as a markdown table; below it, what each
    evaluation was run on."""
    if not metrics or not metrics["evaluations"]:
        return "_No retrieval evaluation (set `evaluate.qrels` or `evaluate.heldout_fraction`)._"
    table = metrics_table(metrics)
    lines = ["| metric | " + " | ".join(c.title for c in table.columns) + " |",
             "|---" + "|--:" * len(table.columns) + "|",
             *(f"| {metric} | " + " | ".join(cells) + " |" for metric, cells in table.text_rows()),
             "",
             *(f"- {e.label}: {e.queries} {e.what} over {e.docs} passages" for e in table.evaluated)]
    if table.primary:
        lines.append(f"- primary: {table.primary}")
    if rows := significance_rows(metrics):
        lines += ["", "Each model against the base, per query (nDCG@10; paired bootstrap interval, sign-flip "
                  "permutation p-value; the verdict is better, worse or inconclusive, with the queries a resolving "
                  "test would need):", "",
                  "| " + " | ".join(SIGNIFICANCE_COLUMNS) + " |",
                  "|---|---" + "|--:" * (len(SIGNIFICANCE_COLUMNS) - 3) + "|---|",
                  *("| " + " | ".join(row) + " |" for row in rows)]
    if note := judged_note(metrics):
        lines += ["", f"- {note[0].upper()}{note[1:]}."]
    return "\n".join(lines)


def promotion_markdown(promotion: dict[str, Any] | None) -> str:
    """Which model the run promoted (``promoted/``) and why."""
    if not promotion:
        return "_No promotion record._"
    which = "the adapted model" if promotion["promoted"] == "adapted" else "the BASE model (not the adapted one)"
    return f"**Promoted: {which}** (`evaluate.promote: {promotion['rule']}`): {_inline(promotion['reason'], 400)}."


def diagnostics_markdown(diagnostics: dict[str, Any] | None) -> str:
    """The teacher's label diagnostics (``tasks/label_diagnostics.py``) as a short table and its warnings."""
    if not diagnostics:
        return "_No label diagnostics (no triples labelled by this run)._"
    m, sc = diagnostics["margin"], diagnostics["scores"]
    lines = [*(f"**Warning: {_inline(w, 400)}.**" for w in diagnostics.get("warnings", [])),
             "| margin min | p05 | p25 | p50 | p75 | p95 | max | negative | near zero | teacher agreement |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
             "| " + " | ".join(f"{m[k]:.4g}" for k in ("min", "p05", "p25", "p50", "p75", "p95", "max"))
             + f" | {diagnostics['negative_share']:.1%} | {diagnostics['near_zero_share']:.1%} | "
               f"{diagnostics['teacher_agreement']:.1%} |",
             "",
             *(f"- {kind} scores: {sc[kind]['min']:.4g} to {sc[kind]['max']:.4g} (mean {sc[kind]['mean']:.4g})"
               for kind in ("pos", "neg")),
             f"- teacher agreement: the share of the {diagnostics['queries']} training queries whose source passage "
             "the teacher scores above every one of their labelled negatives"]
    rank = diagnostics.get("positive_rank")
    if rank is not None and len(rank["shares"]) > 2:  # n negatives per example
        lines.append(f"- positive's rank among itself and the {len(rank['shares']) - 1} negatives of an example: "
                     f"first in {rank['shares'][0]:.1%} of examples, mean {rank['mean']:.2f}; a negative outscores "
                     f"it in {diagnostics['outscored_share']:.1%}")
    return "\n".join(lines)


def evaluators_markdown(metrics: dict[str, Any] | None, store: ArtifactStore | None = None) -> str:
    """STS and clustering beside retrieval (a table per evaluator, a column per model) and the embedding map."""
    if not metrics:
        return ""
    parts = []
    if agreement := metrics.get("teacher_agreement"):
        parts.append(f"- teacher agreement on the held-out queries: {agreement['share']:.1%} of {agreement['queries']}"
                     f" (the {agreement['teacher'].replace('_', '-')} teacher scores the source passage above all "
                     f"{agreement['candidates']} passages the base model retrieves for the query)")
    if sts := metrics.get("sts"):
        models = ordered_models(sts)
        parts += [f"### STS ({sts['pairs']} scored pairs; correlation of cosine similarity with the gold score)",
                  "| measure | " + " | ".join(models) + " |", "|---|" + "--:|" * len(models),
                  *(f"| {m} | " + " | ".join(_num(sts["models"][x].get(m)) for x in models) + " |"
                    for m in ("spearman", "pearson"))]
    if clustering := metrics.get("clustering"):
        models = ordered_models(clustering)
        parts += [f"### Clustering ({clustering['items']} labelled passages, {clustering['labels']} labels)",
                  "| method, measure | " + " | ".join(models) + " |", "|---|" + "--:|" * len(models),
                  *(f"| {method} {measure} | " + " | ".join(_num(clustering["models"][x][method][measure])
                                                             for x in models) + " |"
                    for method in ("kmeans", "hdbscan") for measure in ("v_measure", "ari"))]
    if found := metrics.get("mteb"):
        if "skipped" in found:
            parts.append(f"### MTEB\n_{found['skipped']}._")
        else:
            models = ordered_models(found)
            parts += [f"### MTEB (mteb {found['version']}; each task's main score)",
                      "| task | " + " | ".join(models) + " |", "|---|" + "--:|" * len(models),
                      *(f"| {t} | " + " | ".join(_num(found["models"][m].get(t)) for m in models) + " |"
                        for t in found["tasks"])]
    if (found := metrics.get("embedding_map")) and store is not None:
        image = embedded_png(store, found["file"])
        parts += [f"### Embedding map ({found['passages']} passages, {found['queries']} held-out queries, coloured "
                  f"by {found['coloured_by']})", f"![embedding map]({image})" if image else
                  f"`{store.url('evaluate')}/{found['file']}`"]
    return "\n".join(parts)


def embedded_png(store: ArtifactStore, name: str, limit: int = 600_000) -> str | None:
    """A PNG of the evaluate artifact as a data URI the UI's markdown shows inline (None when too large)."""
    import base64

    artifact = store.load("evaluate")
    if artifact is None:
        return None
    path = artifact.local_dir() / name
    if not path.is_file() or path.stat().st_size > limit:
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def silver_markdown(store: ArtifactStore) -> list[str]:
    """Augmented SBERT's silver pairs: how many, how each sampler's scores spread, and how well the cross-encoder
    that labelled them fits the gold pairs (none when the run has no ``silver/``)."""
    silver = store.read_manifest("silver")
    if silver is None:
        return []
    candidates = store.read_manifest("silver-candidates") or {}
    fit = (store.read_manifest("cross-encoder") or {}).get("train", {}).get("gold_fit", {})
    before, after = fit.get("before", {}), fit.get("after", {})
    columns = ("count", "min", "p05", "p25", "p50", "p75", "p95", "max", "mean")
    spreads = [("all", silver.get("scores", {})), *sorted(silver.get("by_sampler", {}).items())]

    from gplflow.tasks.augment import distribution_value

    def cell(found: dict[str, Any], column: str) -> str:
        value = distribution_value(found, column)
        return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    pool = candidates.get("pool", {})
    return ["## Silver pairs",
            f"{silver.get('rows')} pairs sampled (of {candidates.get('target')} asked for) from "
            f"{pool.get('texts')} texts ({pool.get('gold_sentences')} gold sentences, "
            f"{pool.get('corpus_passages')} corpus passages) and scored by the cross-encoder (sigmoid of its logit). "
            f"On the gold pairs it trained on: BCE {before.get('bce')} → {after.get('bce')}, Spearman "
            f"{before.get('spearman')} → {after.get('spearman')}.",
            "| sampler | " + " | ".join(columns) + " | histogram (fifths of [0, 1]) |",
            "|---" + "|--:" * len(columns) + "|---|",
            *(f"| {name} | " + " | ".join(cell(found, c) for c in columns)
              + f" | {'/'.join(map(str, found.get('histogram', [])))} |" for name, found in spreads)]


def report_markdown(cfg: PipelineConfig, store: ArtifactStore, summary: dict[str, Any]) -> str:
    stages = stage_rows(store, _run_started(summary))
    parts = [
        f"# gplflow run `{cfg.name}`",
        f"{_headline(cfg)}. Finished in {_duration(summary.get('seconds'))}; run directory `{summary['run_dir']}`.",
        _verdict(summary.get("metrics")),
        promotion_markdown(_promotion(store, summary.get("metrics"))),
        "## Metrics",
        metrics_markdown(summary.get("metrics")),
        evaluators_markdown(summary.get("metrics"), store),
        "## Label diagnostics",
        diagnostics_markdown((store.read_manifest("triples") or {}).get("diagnostics")),
        *silver_markdown(store),
        *generate_report(store.read_manifest("queries"), lambda text: _inline(text, 200)),
        *filter_report(cfg, store.read_manifest("queries-filtered"), lambda text: _inline(text, 120)),
        "## Sample of generated queries",
        "Passages spread over the corpus, each with every query generated from it (its positive) and what became "
        "of the query.",
        *sample_markdown(sample_passages(store, filtered=filter_active(cfg.section(FILTER)))),
        "## Stages",
        "| stage | rows | seconds | this run |",
        "|---|--:|--:|---|",
        *(f"| {r['stage']} | {_num(r['rows'])} | {_num(r['seconds'])} | {r['this run']} |" for r in stages),
        "",
        *(f"- {r['stage']}: {_inline(r['counters'], 400)}" for r in stages if r["counters"]),
        "## Models",
        *(f"- **{role}**: `{ref}`" + ("" if path == ref else f" → `{path}`")
          for role, ref, path in model_rows(cfg, summary.get("models", {}))),
        "## Configuration",
        "| stage | settings |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in config_rows(cfg)),
    ]
    return "\n".join(parts)


def _headline(cfg: PipelineConfig) -> str:
    """One line: the method, what the queries are, and how long training is."""
    per = cfg.label.negatives_per_example
    labelled = "pseudo-labelled triples" if per == 1 else f"pseudo-labelled examples of {per} negatives"
    method = {"margin_mse": f"GPL (MarginMSE on {labelled})", "kl": f"GPL (KL on {labelled})",
              "kl+margin_mse": f"GPL (KL + MarginMSE on {labelled})"}.get(cfg.train.loss, "GenQ (MNRL)")
    pretrain = f", after {cfg.pretrain.method.upper()} pretraining" if cfg.pretrain.method != "none" else ""
    if cfg.flow == "supervised" and cfg.pairs is not None:
        return (f"Supervised fine-tuning ({cfg.train.loss}) on {cfg.pairs.kind} labelled pairs{pretrain}: "
                f"{cfg.train.steps} training steps of batch {cfg.train.batch_size}")
    if cfg.flow == "augmented_sbert":
        return (f"Augmented SBERT ({cfg.train.loss}) on gold pairs and silver pairs a cross-encoder labelled "
                f"({cfg.augment.sampling} sampling){pretrain}: {cfg.train.steps} training steps of batch "
                f"{cfg.train.batch_size}")
    return (f"{method}{pretrain}: {cfg.generate.method} queries, {cfg.train.steps} training steps of batch "
            f"{cfg.train.batch_size}")


def _verdict(metrics: dict[str, Any] | None) -> str:
    from gplflow.tasks.promote import verdict_lines

    if not metrics or metrics.get("primary_evaluation") is None:  # None: only STS or clustering ran
        return "_Not evaluated._" if not metrics else "_No retrieval evaluation (no qrels, no held-out queries)._"
    lines = verdict_lines(metrics)
    return "\n\n".join(f"**{line}**" for _, line in lines) if lines else "_Not evaluated._"


def _promotion(store: ArtifactStore, metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The run's promotion record: ``promoted/``'s, else the evaluation's decision."""
    manifest = store.read_manifest("promoted")
    return (manifest or {}).get("promotion") or (metrics or {}).get("promotion")


def _run_started(summary: dict[str, Any]) -> float:
    return summary.get("started") or time.time() - (summary.get("seconds") or 0)


def _passage(doc_id: str, title: str, text: str) -> str:
    title = f"**{_inline(title, 80)}** · " if title else ""
    return f"{title}{_inline(text, 300)} (`{doc_id.replace('`', '')}`)"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _inline(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters, with markdown's special characters escaped."""
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", text)


def publish_report(cfg: PipelineConfig, store: ArtifactStore, summary: dict[str, Any]) -> None:
    """Publish the report (key ``gplflow-report-<run name>``) and the stage table (``gplflow-stages-<run name>``)."""
    create_markdown_artifact(markdown=report_markdown(cfg, store, summary),
                             key=artifact_key("gplflow-report", cfg.name),
                             description=f"gplflow run {cfg.name}: metrics, sample queries, stages, models, config")
    create_table_artifact(table=stage_rows(store, _run_started(summary)),
                          key=artifact_key("gplflow-stages", cfg.name),
                          description=f"gplflow run {cfg.name}: rows, seconds and counters of each stage")
