"""STS, clustering and the embedding map on hand-made embeddings whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from gplflow.adapters.embedding_eval import cluster_scores, embedding_map, sts_scores

LABELS = ["hives"] * 6 + ["mites"] * 6 + ["honey"] * 6


def _perfect(labels: list[str], seed: int = 0) -> np.ndarray:
    """One direction per label, a little noise: every clustering should recover the labels."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    return np.stack([np.eye(8)[names.index(x)] + 0.01 * rng.standard_normal(8) for x in labels])


def test_sts_of_embeddings_whose_cosine_follows_the_gold_order_is_one():
    gold = [0.0, 0.2, 0.5, 0.7, 1.0]
    angles = np.arccos(np.asarray(gold))  # cosine(angle) = gold: a perfect model
    left = np.tile([1.0, 0.0], (5, 1))
    right = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    found = sts_scores(left, right, gold)
    assert found["spearman"] == pytest.approx(1.0) and found["pearson"] == pytest.approx(1.0)
    reversed_found = sts_scores(left, right, gold[::-1])
    assert reversed_found["spearman"] == pytest.approx(-1.0)


def test_sts_of_a_constant_embedding_is_undefined_not_a_number():
    left = right = np.ones((4, 3))
    assert sts_scores(left, right, [0.1, 0.4, 0.6, 0.9]) == {"spearman": None, "pearson": None, "pairs": 4}


def test_clustering_recovers_the_labels_of_a_perfect_embedding():
    found = cluster_scores(_perfect(LABELS), LABELS, seed=0, min_cluster_size=3)
    assert found["kmeans"]["v_measure"] == pytest.approx(1.0) and found["kmeans"]["ari"] == pytest.approx(1.0)
    assert found["hdbscan"]["v_measure"] == pytest.approx(1.0) and found["hdbscan"]["noise"] == 0
    assert found["labels"] == 3 and found["items"] == 18


def test_clustering_a_constant_embedding_scores_zero():
    found = cluster_scores(np.ones((18, 4)), LABELS, seed=0)
    for method in ("kmeans", "hdbscan"):
        assert found[method]["v_measure"] == pytest.approx(0.0) and found[method]["ari"] == pytest.approx(0.0)


def test_clustering_a_random_embedding_is_far_from_perfect():
    random = np.random.default_rng(1).standard_normal((18, 8))
    assert cluster_scores(random, LABELS, seed=0)["kmeans"]["v_measure"] < 0.6


def test_the_embedding_map_is_a_png_with_one_panel_per_model(tmp_path):
    emb = _perfect(LABELS)
    path = embedding_map({"base": emb, "adapted": emb[::-1].copy()}, LABELS, tmp_path / "map.png", seed=0,
                         markers=[i % 6 == 0 for i in range(18)])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert width > height * 1.5  # two panels side by side


def test_hdbscan_clusters_a_projection_of_many_high_dimensional_points():
    """60 points per label in 64 dimensions: raw density is too thin for HDBSCAN, the 5-d projection is not."""
    rng = np.random.default_rng(0)
    labels = [name for name in ("a", "b", "c") for _ in range(60)]
    centres = {name: rng.standard_normal(64) * 3 for name in "abc"}
    emb = np.stack([centres[x] + rng.standard_normal(64) for x in labels])
    found = cluster_scores(emb, labels, seed=0)
    assert found["hdbscan"]["space"] == "umap-5d"
    assert found["hdbscan"]["v_measure"] > 0.9 and found["kmeans"]["v_measure"] > 0.9
