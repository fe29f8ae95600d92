"""The evaluate stage's evaluators beside retrieval, each optional and configured under ``evaluate``:

- ``sts``: sentence pairs with gold scores (the STS benchmark format, read like ``pairs``) → Spearman and
  Pearson of each model's cosine similarity;
- ``clustering``: a file of document id → label → k-means and HDBSCAN clusterings of each model's passage
  embeddings, scored by V-measure and adjusted Rand index;
- ``embedding_map``: a seeded sample of passages (and the held-out queries made from them) projected to 2-D by
  UMAP, one panel per model, coloured by label (or by k-means cluster of the base when there are no labels),
  saved as ``embedding-map.png`` in ``evaluate/``;
- ``mteb``: named MTEB tasks (or local ones, ``module:Class``) run on each model when the ``mteb`` package is
  installed; without it the evaluation says it skipped them and why;
- teacher agreement on the held-out queries (GPL runs, not configured: the run's teacher): how often the teacher
  scores the passage a query was generated from above every candidate the base model retrieves for it. The
  label stage reports the same on the training queries; a teacher that is weak on the domain shows in both.

They run inside the evaluate stage on the corpus embeddings retrieval already computed (one encoding per model),
so they are cached with it: changing only an evaluator's settings recomputes only the evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from gplflow.adapters import embedding_eval
from gplflow.adapters.errors import InputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.pair_readers import iter_pairs, read_labels
from gplflow.adapters.store import content_signature
from gplflow.tasks.base import Seed, StageConfig
from gplflow.tasks.pairs import PairColumnsConfig

# torch, transformers, bm25s: loaded when a stage computes, not when a config is read
encoding = lazy("gplflow.adapters.encoding")

logger = logging.getLogger(__name__)

MAP_FILE = "embedding-map.png"
UNLABELLED = "(no label)"


class StsConfig(StageConfig):
    """Scored sentence pairs: (sentence1, sentence2, score in [0, score_max]), as ``pairs`` reads them."""

    path: str
    format: Literal["jsonl", "csv", "tsv", "parquet"] | None = None
    columns: PairColumnsConfig = PairColumnsConfig()
    score_max: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)  # STS-B: 5


class ClusteringConfig(StageConfig):
    """Gold topic labels of (some) passages: a JSONL/CSV/TSV/Parquet file of document id → label."""

    labels: str
    format: Literal["jsonl", "csv", "tsv", "parquet"] | None = None
    id_column: str = Field(default="doc_id", min_length=1)
    label_column: str = Field(default="label", min_length=1)
    max_docs: int = Field(default=5_000, gt=1)  # a seeded sample of the labelled passages beyond this
    min_cluster_size: int | None = Field(default=None, ge=2)  # HDBSCAN; None: items / (4 x labels), at least 2
    seed: Seed = 0


class EmbeddingMapConfig(StageConfig):
    sample: int = Field(default=400, ge=10)  # passages drawn (seeded); their held-out queries are drawn too
    queries: bool = True
    seed: Seed = 0


def signatures(sts: StsConfig | None, clustering: ClusteringConfig | None,
               mteb: MtebConfig | None = None) -> dict[str, str]:
    """What the evaluators read from outside the run, by content (for the evaluate stage's fingerprint); with
    ``mteb``, its version (installing or upgrading it recomputes the evaluation)."""
    found = {}
    if mteb is not None:
        found["mteb"] = mteb_version() or "not installed"
    if sts is not None:
        found["sts"] = content_signature(sts.path)
    if clustering is not None:
        found["labels"] = content_signature(clustering.labels)
    return found


class MtebConfig(StageConfig):
    """MTEB tasks by name (``mteb.get_tasks``) or a local task class as ``module:Class``."""

    tasks: tuple[str, ...] = Field(min_length=1)


def mteb_version() -> str | None:
    """The installed mteb version, or None when the package is absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mteb")
    except PackageNotFoundError:
        return None


def mteb_tasks(cfg: MtebConfig) -> list[Any]:
    """The task objects ``cfg`` names; an unknown name or class is an error naming ``evaluate.mteb.tasks``."""
    import importlib

    import mteb

    found, names = [], []
    for ref in cfg.tasks:
        if ":" in ref:
            module, _, name = ref.partition(":")
            try:
                found.append(getattr(importlib.import_module(module), name)())
            except (ImportError, AttributeError) as err:
                raise InputError(f"evaluate.mteb.tasks: {ref!r} is not an importable task class ({err})") from None
        else:
            names.append(ref)
    if names:
        try:
            found.extend(mteb.get_tasks(tasks=names))
        except (KeyError, ValueError) as err:
            raise InputError(f"evaluate.mteb.tasks: {str(err).splitlines()[0]}") from None
    return found


class Teacher(StageConfig):
    """The run's labelling model, for teacher agreement on the held-out queries (see ``label``)."""

    kind: Literal["cross_encoder", "bi_encoder"]
    ref: str
    max_seq_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    normalize: bool = False
    candidates: int = Field(default=20, gt=0)  # the base model's top passages each held-out query is ranked among


class Evaluators:
    """Collects each model's results for the configured evaluators; ``finish`` writes the map and sums up."""

    def __init__(self, sts: StsConfig | None, clustering: ClusteringConfig | None,
                 embedding_map: EmbeddingMapConfig | None, doc_ids: Sequence[str],
                 heldout: dict[str, list[str]] | None = None, batch_size: int = 64,
                 teacher: Teacher | None = None, passages: Sequence[str] = (), mteb: MtebConfig | None = None):
        self.batch_size = batch_size
        self.mteb, self.mteb_skipped = None, ""
        if mteb is not None and mteb_version() is None:
            self.mteb_skipped = "the mteb package is not installed (pip install mteb): MTEB tasks skipped"
            logger.warning("evaluate.mteb: %s", self.mteb_skipped)
        elif mteb is not None:
            self.mteb = mteb_tasks(mteb)
        self.teacher = teacher if teacher is not None and heldout and heldout["text"] else None
        self.heldout, self.passages = heldout, passages
        self.position = {doc_id: row for row, doc_id in enumerate(doc_ids)}
        self._candidates: np.ndarray | None = None
        self.sts = _read_sts(sts) if sts is not None else None
        self.clustering = clustering
        self.labelled = _labelled_rows(clustering, doc_ids) if clustering is not None else None
        self.map_cfg = embedding_map
        self.map_rows = _sample(len(doc_ids), embedding_map.sample, embedding_map.seed) if embedding_map else None
        self.map_queries: list[str] = []
        self.map_query_docs: list[int] = []
        if embedding_map is not None and embedding_map.queries and heldout:
            where = {int(r): k for k, r in enumerate(self.map_rows)}
            position = {doc_id: row for row, doc_id in enumerate(doc_ids)}
            for text, doc_id in zip(heldout["text"], heldout["doc_id"], strict=True):
                if position.get(doc_id) in where:
                    self.map_queries.append(text)
                    self.map_query_docs.append(where[position[doc_id]])
        self.doc_labels = ({int(r): lab for r, lab in zip(*self.labelled, strict=True)} if self.labelled else {})
        self.results: dict[str, dict[str, Any]] = {"sts": {}, "clustering": {}, "mteb": {}}
        self._map: dict[str, np.ndarray] = {}

    def add(self, label: str, model: Any, docs: np.ndarray) -> None:
        """Evaluate model ``label`` given its corpus embeddings ``docs`` (row i = document i)."""
        if self.sts is not None:
            left, right, gold = self.sts
            emb = encoding.encode(model, left + right, role="query", batch_size=self.batch_size,
                                  desc=f"{label}: encoding STS pairs")
            self.results["sts"][label] = embedding_eval.sts_scores(emb[: len(left)], emb[len(left):], gold)
        if self.labelled is not None:
            rows, labels = self.labelled
            self.results["clustering"][label] = embedding_eval.cluster_scores(
                docs[rows], labels, seed=self.clustering.seed, min_cluster_size=self.clustering.min_cluster_size)
        if self.mteb is not None:
            self.results["mteb"][label] = _run_mteb(model, self.mteb, self.batch_size)
        if self.teacher is not None and label == "base":
            self._candidates = self._retrieve(model, docs)
        if self.map_rows is not None:
            points = docs[self.map_rows]
            if self.map_queries:
                queries = encoding.encode(model, self.map_queries, role="query", batch_size=self.batch_size,
                                          desc=f"{label}: encoding map queries")
                points = np.concatenate([points, queries])
            self._map[label] = points

    def finish(self, folder: Path) -> dict[str, Any]:
        """The evaluators' summary for ``metrics.json``; the map is written into ``folder``."""
        summary: dict[str, Any] = {}
        if self.teacher is not None and self._candidates is not None:
            summary["teacher_agreement"] = self._agreement()
        if self.mteb is not None:
            summary["mteb"] = {"tasks": [t.metadata.name for t in self.mteb], "version": mteb_version(),
                               "models": self.results["mteb"]}
        elif self.mteb_skipped:
            summary["mteb"] = {"skipped": self.mteb_skipped}
        if self.sts is not None:
            summary["sts"] = {"pairs": len(self.sts[2]), "models": self.results["sts"]}
        if self.labelled is not None:
            summary["clustering"] = {"items": len(self.labelled[0]), "labels": len(set(self.labelled[1])),
                                     "models": self.results["clustering"]}
        if self.map_rows is not None and self._map:
            colours = self._colours()
            n_docs = len(self.map_rows)
            colours += [colours[k] for k in self.map_query_docs]
            crosses = [False] * n_docs + [True] * len(self.map_query_docs)
            embedding_eval.embedding_map(self._map, colours, folder / MAP_FILE, seed=self.map_cfg.seed,
                                         markers=crosses, title=f"{n_docs} passages (dots) and "
                                         f"{len(self.map_query_docs)} held-out queries (crosses), UMAP")
            summary["embedding_map"] = {"file": MAP_FILE, "passages": n_docs, "queries": len(self.map_query_docs),
                                        "coloured_by": "label" if self.doc_labels else "k-means cluster of base"}
        return summary

    def _retrieve(self, model: Any, docs: np.ndarray) -> np.ndarray:
        """Each held-out query's ``teacher.candidates`` best passages by the base model, its source left out."""
        from gplflow.adapters.vector_index import VectorIndex

        queries = encoding.encode(model, self.heldout["text"], role="query", batch_size=self.batch_size,
                                  desc="base: encoding held-out queries for the teacher")
        sources = np.asarray([self.position[d] for d in self.heldout["doc_id"]])
        k = min(self.teacher.candidates, docs.shape[0] - 1)
        if k <= 0:
            return np.empty((len(sources), 0), np.int64)
        _, found = VectorIndex(docs, score="cos_sim", kind="flat").search(queries, k + 1)  # one spare: the source
        return np.stack([row[row != source][:k] for row, source in zip(found, sources, strict=True)])

    def _agreement(self) -> dict[str, Any]:
        """The share of held-out queries whose source passage the teacher scores above all their candidates."""
        from gplflow.adapters.scoring import load_scorer

        t = self.teacher
        sources = np.asarray([self.position[d] for d in self.heldout["doc_id"]])
        rows = np.concatenate([sources[:, None], self._candidates], axis=1)  # column 0: the source
        scorer = load_scorer(t.kind, t.ref, max_seq_length=t.max_seq_length, batch_size=t.batch_size,
                             normalize=t.normalize)
        pair_q = np.repeat(np.arange(len(rows)), rows.shape[1])
        scores = scorer.score(self.heldout["text"], self.passages, pair_q, rows.reshape(-1)).reshape(rows.shape)
        first = scores[:, 0] > scores[:, 1:].max(axis=1) if rows.shape[1] > 1 else np.ones(len(rows), bool)
        return {"share": float(first.mean()), "queries": len(rows), "candidates": int(rows.shape[1] - 1),
                "teacher": t.kind}

    def _colours(self) -> list[str]:
        if self.doc_labels:
            return [self.doc_labels.get(int(r), UNLABELLED) for r in self.map_rows]
        from sklearn.cluster import KMeans

        first = next(iter(self._map.values()))[: len(self.map_rows)]
        k = max(2, min(8, len(first) // 25))
        found = KMeans(n_clusters=k, n_init=10, random_state=self.map_cfg.seed).fit_predict(first)
        return [f"cluster {c + 1}" for c in found]


def _run_mteb(model: Any, tasks: list[Any], batch_size: int) -> dict[str, float]:
    """Each task's main score for ``model`` (mteb's own evaluation; no result cache, nothing written)."""
    import mteb

    found = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False,
                          encode_kwargs={"batch_size": batch_size})
    return {result.task_name: float(result.get_score()) for result in found.task_results}


def _read_sts(cfg: StsConfig) -> tuple[list[str], list[str], list[float]]:
    rows = list(iter_pairs(cfg.path, "scored", cfg.format, cfg.columns.model_dump(), cfg.score_max))
    if len(rows) < 2:
        raise InputError(f"evaluate.sts.path {cfg.path}: {len(rows)} pair; a correlation needs at least 2")
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [r["score"] for r in rows]


def _labelled_rows(cfg: ClusteringConfig, doc_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The corpus rows that have a label (a seeded sample of ``max_docs`` beyond that), and their labels."""
    labels = read_labels(cfg.labels, cfg.id_column, cfg.label_column, cfg.format)
    rows = np.asarray([row for row, doc_id in enumerate(doc_ids) if doc_id in labels], dtype=np.int64)
    unknown = len(labels) - len(rows)
    if len(rows) < 2:
        raise InputError(f"evaluate.clustering.labels {cfg.labels}: {len(rows)} of its {len(labels)} document ids "
                         "are in the corpus; clustering needs at least 2")
    if unknown:
        logger.warning("%s: %d labelled documents are not in the corpus; they are left out", cfg.labels, unknown)
    if len(rows) > cfg.max_docs:
        rows = np.sort(rows[_sample(len(rows), cfg.max_docs, cfg.seed)])
    found = [labels[doc_ids[r]] for r in rows]
    if len(set(found)) < 2:
        raise InputError(f"evaluate.clustering.labels {cfg.labels}: the corpus's labelled documents have "
                         f"{len(set(found))} distinct label; clustering needs at least 2")
    return rows, found


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    """``min(n, k)`` sorted positions out of ``n``, drawn with ``seed``."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
