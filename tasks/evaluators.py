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
- teacher-judged evaluation on the held-out queries (GPL runs, or any run with ``evaluate.judge``): TREC-style
  pooling. The top ``judge_depth`` passages of every compared model, plus the query's source passage, are pooled
  per query; the judge (the run's teacher, or the cross-encoder ``evaluate.judge`` names) scores each pooled
  (query, passage) pair once, and each model's ranking gets nDCG@10 with the judge's scores as graded relevance,
  min-max normalised per query to [0, 1] (the pool's lowest-scored passage grades 0, its best 1; a passage
  outside the pool, below ``judge_depth`` < 10, grades 0 as unjudged documents do in TREC; a query whose pool
  the judge scores all alike is left out). Pairs already scored are not scored again: those the label stage
  scored (``triples/``, when the judge is the teacher) and those the agreement measure needs are scored in the
  same call. Its bias: the adapted model was trained to imitate the teacher, so this measures fidelity to the
  teacher, not truth.

They run inside the evaluate stage on the corpus embeddings retrieval already computed (one encoding per model),
so they are cached with it: changing only an evaluator's settings recomputes only the evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from gplflow.tasks.label import TeacherModel
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


class Teacher(TeacherModel):
    """The run's labelling model, for teacher agreement on the held-out queries (see ``label``)."""

    candidates: int = Field(default=20, gt=0)  # the base model's top passages each held-out query is ranked among


@dataclass(frozen=True)
class Judging:
    """The teacher-based measures on the held-out queries: ``teacher`` (the run's labelling model) for its
    agreement, ``judge`` (the teacher, or ``evaluate.judge``) for the pooled graded evaluation of ``depth``,
    and the scores ``known`` already ((query id, doc id) -> score by that judge, from ``triples/``)."""

    teacher: Teacher | None = None
    judge: Teacher | None = None
    depth: int = 10
    known: Mapping[tuple[str, str], float] = field(default_factory=dict)


JUDGED_METRIC = "ndcg@10"
JUDGED_CUT = 10


class Evaluators:
    """Collects each model's results for the configured evaluators; ``finish`` writes the map and sums up."""

    def __init__(self, sts: StsConfig | None, clustering: ClusteringConfig | None,
                 embedding_map: EmbeddingMapConfig | None, doc_ids: Sequence[str],
                 heldout: dict[str, list[str]] | None = None, batch_size: int = 64,
                 judging: Judging | None = None, passages: Sequence[str] = (), mteb: MtebConfig | None = None):
        self.batch_size = batch_size
        self.mteb, self.mteb_skipped = None, ""
        if mteb is not None and mteb_version() is None:
            self.mteb_skipped = "the mteb package is not installed (pip install mteb): MTEB tasks skipped"
            logger.warning("evaluate.mteb: %s", self.mteb_skipped)
        elif mteb is not None:
            self.mteb = mteb_tasks(mteb)
        judging = judging if judging is not None and heldout and heldout["text"] else Judging()
        self.teacher, self.judging = judging.teacher, judging
        self.heldout, self.passages = heldout, passages
        self.position = {doc_id: row for row, doc_id in enumerate(doc_ids)}
        self.doc_ids = doc_ids
        self._ranked: dict[str, np.ndarray] = {}  # model -> corpus rows each held-out query retrieves, best first
        self.judged: dict[str, dict[str, dict[str, float]]] = {}  # model -> query id -> {ndcg@10}: after finish
        self.judged_counts: dict[str, Any] = {}
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

    def add(self, label: str, model: Any, docs: np.ndarray, heldout_ranked: np.ndarray | None = None) -> None:
        """Evaluate model ``label`` given its corpus embeddings ``docs`` (row i = document i) and the corpus rows
        it retrieves for each held-out query, best first (-1: none; the teacher measures pool them)."""
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
        if heldout_ranked is not None and (self.teacher is not None or self.judging.judge is not None):
            self._ranked[label] = heldout_ranked
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
        if self._ranked:
            summary.update(self._teacher_measures())
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

    def _teacher_measures(self) -> dict[str, Any]:
        """Teacher agreement (with a teacher and the base's ranking) and the judged pool, their pairs scored in one
        call per scoring model; the judged per-query nDCG@10 is left in ``self.judged``."""
        sources = [self.position[d] for d in self.heldout["doc_id"]]
        agree = self._agreement_rows(sources) if self.teacher is not None and "base" in self._ranked else None
        pools = self._pools(sources) if self.judging.judge is not None else None
        same = self.judging.judge == self.teacher
        found: dict[str, Any] = {}
        if agree is not None:
            wanted = [[*a, *p] for a, p in zip(agree, pools, strict=True)] if same and pools else agree
            scores = self._score(self.teacher, wanted, self.judging.known if same else {})
            first = [all(scores[i, s] > scores[i, c] for c in rows[1:]) for i, (s, rows) in
                     enumerate(zip(sources, agree, strict=True))]
            width = max((len(rows) - 1 for rows in agree), default=0)
            found["teacher_agreement"] = {"share": float(np.mean(first)), "queries": len(agree),
                                          "candidates": width, "teacher": self.teacher.kind}
        if pools is not None:
            if agree is None or not same:
                scores = self._score(self.judging.judge, pools, self.judging.known if same else {})
            self.judged = self._judge(pools, scores)
            self.judged_counts.update(self._counts_of(pools))
        return found

    def _agreement_rows(self, sources: list[int]) -> list[list[int]]:
        """Per held-out query: its source, then the base model's ``teacher.candidates`` best other passages."""
        k = self.teacher.candidates
        return [[source, *[int(r) for r in ranked if r >= 0 and r != source][:k]]
                for source, ranked in zip(sources, self._ranked["base"], strict=True)]

    def _pools(self, sources: list[int]) -> list[list[int]]:
        """Per held-out query: its source and the top ``judging.depth`` passages of every model, each once."""
        depth = self.judging.depth
        return [list(dict.fromkeys([source, *(int(r) for ranked in self._ranked.values() for r in ranked[i][:depth]
                                              if r >= 0)]))
                for i, source in enumerate(sources)]

    def _score(self, who: Teacher, rows: list[list[int]], known: Mapping[tuple[str, str], float],
               ) -> dict[tuple[int, int], float]:
        """(held-out query index, corpus row) -> score for every pair of ``rows``: each distinct pair not in
        ``known`` scored once, in one call; the count of pairs scored goes to ``judged_counts``."""
        from gplflow.adapters.scoring import load_scorer

        qids = self.heldout["query_id"]
        pairs = list(dict.fromkeys((i, r) for i, found in enumerate(rows) for r in found))
        scores = {(i, r): float(known[qids[i], self.doc_ids[r]]) for i, r in pairs
                  if (qids[i], self.doc_ids[r]) in known}
        todo = [pair for pair in pairs if pair not in scores]
        if todo:
            scorer = load_scorer(who.kind, who.ref, max_seq_length=who.max_seq_length, batch_size=who.batch_size,
                                 normalize=who.normalize)
            got = scorer.score(self.heldout["text"], self.passages, np.asarray([i for i, _ in todo]),
                               np.asarray([r for _, r in todo]))
            scores.update(zip(todo, got.tolist(), strict=True))
        self.judged_counts.update(pairs_scored=self.judged_counts.get("pairs_scored", 0) + len(todo),
                                  reused_from_triples=self.judged_counts.get("reused_from_triples", 0)
                                  + len(pairs) - len(todo))
        return scores

    def _judge(self, pools: list[list[int]], scores: Mapping[tuple[int, int], float]) -> dict[str, dict[str, Any]]:
        """Each model's nDCG@10 per held-out query against the judge's min-max normalised scores of its pool."""
        qids = self.heldout["query_id"]
        judged: dict[str, dict[str, dict[str, float]]] = {label: {} for label in self._ranked}
        flat = 0
        for i, pool in enumerate(pools):
            raw = np.asarray([scores[i, r] for r in pool])
            spread = float(raw.max() - raw.min())
            if spread <= 0:
                flat += 1
                continue
            grade = dict(zip(pool, ((raw - raw.min()) / spread).tolist(), strict=True))
            for label, ranked in self._ranked.items():
                top = [int(r) for r in ranked[i] if r >= 0][:JUDGED_CUT]
                judged[label][qids[i]] = {JUDGED_METRIC: graded_ndcg([grade.get(r, 0.0) for r in top],
                                                                    list(grade.values()))}
        self.judged_counts["queries_without_spread"] = flat
        return judged

    def _counts_of(self, pools: list[list[int]]) -> dict[str, Any]:
        judge = self.judging.judge
        return {"queries": len(pools) - self.judged_counts.get("queries_without_spread", 0),
                "heldout_queries": len(pools), "pooled_pairs": sum(map(len, pools)), "depth": self.judging.depth,
                "docs": len(self.doc_ids), "judge": judge.ref, "judge_kind": judge.kind,
                "judge_is_teacher": judge == self.teacher}

    def _colours(self) -> list[str]:
        if self.doc_labels:
            return [self.doc_labels.get(int(r), UNLABELLED) for r in self.map_rows]
        from sklearn.cluster import KMeans

        first = next(iter(self._map.values()))[: len(self.map_rows)]
        k = max(2, min(8, len(first) // 25))
        found = KMeans(n_clusters=k, n_init=10, random_state=self.map_cfg.seed).fit_predict(first)
        return [f"cluster {c + 1}" for c in found]


def graded_ndcg(gains: Sequence[float], pool: Sequence[float], k: int = JUDGED_CUT) -> float:
    """nDCG@k of a ranking whose documents have graded relevance ``gains`` (linear gain, log2 discount, as
    trec_eval), against the ideal ordering of the judged ``pool``'s grades."""
    def dcg(values: Sequence[float]) -> float:
        return sum(g / math.log2(rank + 2) for rank, g in enumerate(values[:k]))

    ideal = dcg(sorted(pool, reverse=True))
    return dcg(list(gains)) / ideal if ideal > 0 else 0.0


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
