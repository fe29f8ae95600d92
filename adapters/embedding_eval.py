"""Evaluations of embeddings beyond retrieval, at the third-party boundary (scipy, scikit-learn, UMAP, matplotlib).

- ``sts_scores``: Spearman and Pearson correlation between the cosine similarity of sentence pairs and their gold
  scores (the STS benchmark's measure). A model whose similarities are all equal has no ranking to correlate:
  both are undefined and reported as None.
- ``cluster_scores``: k-means (k = the number of gold labels) and HDBSCAN clusterings of the embeddings, each
  compared with the gold labels by V-measure and adjusted Rand index. HDBSCAN's noise points count as one more
  cluster, so a model that leaves everything as noise scores 0, not a perfect score on what is left. Beyond
  ``REDUCE_ABOVE`` items HDBSCAN runs on a seeded 5-d UMAP projection of the embeddings (BERTopic's recipe):
  in 384 raw dimensions density is too thin for it (on the demo it called all 337 passages noise).
- ``embedding_map``: a 2-D UMAP projection per model, drawn side by side and coloured by label, as a PNG.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REDUCE_ABOVE = 50  # items; HDBSCAN clusters a UMAP projection beyond this
REDUCED_DIMS = 5


def _unit(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1.0)


def cosine_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``left`` with the same row of ``right``."""
    return np.sum(_unit(left) * _unit(right), axis=1)


def sts_scores(left: np.ndarray, right: np.ndarray, gold: Sequence[float]) -> dict[str, float | None]:
    """Spearman and Pearson correlation of the pairs' cosine similarities with their gold scores."""
    from scipy.stats import pearsonr, spearmanr

    predicted, gold = cosine_pairs(left, right), np.asarray(gold, dtype=np.float64)
    if len(gold) < 2 or np.ptp(predicted) <= 1e-12 or np.ptp(gold) == 0:
        return {"spearman": None, "pearson": None, "pairs": len(gold)}  # a constant has no correlation
    return {"spearman": _finite(spearmanr(predicted, gold).statistic),
            "pearson": _finite(pearsonr(predicted, gold).statistic), "pairs": len(gold)}


def cluster_scores(emb: np.ndarray, labels: Sequence[str], seed: int = 0,
                   min_cluster_size: int | None = None) -> dict[str, Any]:
    """V-measure and adjusted Rand index of k-means and HDBSCAN clusterings of ``emb`` against ``labels``."""
    from sklearn.cluster import HDBSCAN, KMeans
    from sklearn.metrics import adjusted_rand_score, v_measure_score

    gold = np.asarray(labels)
    k = len(set(labels))
    if k < 2:
        raise ValueError(f"clustering needs at least 2 distinct labels, got {k}")
    points = _unit(emb)
    distinct = len(np.unique(np.round(points, 9), axis=0))
    kmeans = (KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points) if distinct >= k
              else _first_distinct(points))  # fewer distinct points than clusters: k-means cannot place k
    size = min_cluster_size or max(2, len(gold) // (4 * k))
    reduced = _reduce(points, seed) if len(gold) > REDUCE_ABOVE and distinct > REDUCED_DIMS + 1 else points
    hdbscan = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(reduced) if distinct > 1 \
        else np.full(len(gold), -1)
    noise = int(np.sum(hdbscan == -1))

    def scores(found: np.ndarray) -> dict[str, float]:
        return {"v_measure": float(v_measure_score(gold, found)), "ari": float(adjusted_rand_score(gold, found)),
                "clusters": len(set(found.tolist()))}

    return {"kmeans": scores(kmeans), "hdbscan": {**scores(hdbscan), "noise": noise, "min_cluster_size": size,
                                                  "space": f"umap-{REDUCED_DIMS}d" if reduced is not points else "raw"},
            "labels": k, "items": len(gold)}


def _reduce(points: np.ndarray, seed: int) -> np.ndarray:
    """A seeded UMAP projection to ``REDUCED_DIMS`` dimensions, for density-based clustering."""
    import umap

    return umap.UMAP(n_components=REDUCED_DIMS, n_neighbors=min(15, len(points) - 1), min_dist=0.0, metric="cosine",
                     random_state=seed, n_jobs=1).fit_transform(points.astype(np.float32))


def _first_distinct(points: np.ndarray) -> np.ndarray:
    """One cluster per distinct point (what any clustering of identical points amounts to)."""
    _, inverse = np.unique(np.round(points, 9), axis=0, return_inverse=True)
    return inverse.reshape(-1)


def embedding_map(embeddings: Mapping[str, np.ndarray], colours: Sequence[str], path: str | Path, seed: int = 0,
                  title: str = "", markers: Sequence[bool] | None = None) -> Path:
    """Draw each model's embeddings (same items, same order) as a 2-D UMAP map side by side; save a PNG.

    ``colours`` gives each item's label (the legend); ``markers`` marks the items drawn as crosses (queries)
    rather than dots (passages).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers
    import matplotlib.pyplot as plt
    import umap

    names = list(embeddings)
    labels = sorted(set(colours))
    palette = plt.get_cmap("tab20" if len(labels) > 10 else "tab10")
    crosses = np.asarray(markers if markers is not None else [False] * len(colours))
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 5.0), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        emb = np.asarray(embeddings[name], dtype=np.float32)
        neighbours = max(2, min(15, len(emb) - 1))
        xy = umap.UMAP(n_neighbors=neighbours, min_dist=0.1, metric="cosine", random_state=seed, n_jobs=1,
                       init="random" if len(emb) < 20 else "spectral").fit_transform(emb)
        for i, label in enumerate(labels):
            chosen = np.asarray([c == label for c in colours])
            for cross in (False, True):
                sel = chosen & (crosses == cross)
                if sel.any():
                    ax.scatter(xy[sel, 0], xy[sel, 1], s=26 if cross else 12, marker="x" if cross else "o",
                               color=palette(i % palette.N), label=None if cross else label, alpha=0.85,
                               linewidths=1.0 if cross else 0)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, legend = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, legend, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08 if len(labels) <= 7 else 0.14, 1, 0.95))
    out = Path(path)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
