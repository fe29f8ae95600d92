"""The FAISS adapter on hand-made vectors: exact top-k, cos_sim vs dot, size-based index choice, k clamping."""

from __future__ import annotations

import numpy as np
import pytest

from gplflow.adapters.vector_index import FLAT_MAX, IVF_MAX, VectorIndex, choose_kind, gpu_available


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)


def _exact(docs: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ docs.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_dot_search_is_exact_top_k(vectors, kind):
    queries = vectors[:5] + 0.1
    index = VectorIndex(vectors, score="dot", kind=kind)
    scores, ids = index.search(queries, 10)
    want_scores, want_ids = _exact(vectors, queries, 10)
    assert index.kind == kind
    np.testing.assert_array_equal(ids, want_ids)  # tiny IVF probes every list, so it is exact too
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_cos_sim_search_matches_normalised_dot_and_leaves_input_alone(vectors):
    original = vectors.copy()
    index = VectorIndex(vectors, score="cos_sim", kind="flat")
    scores, ids = index.search(vectors[:3] * 7.0, 4)  # the query's scale must not matter for cos_sim
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    want_scores, want_ids = _exact(unit, unit[:3], 4)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])  # each vector is its own nearest neighbour
    np.testing.assert_array_equal(vectors, original)


def test_dot_ranks_by_unnormalised_inner_product_cos_sim_by_angle():
    docs = np.array([[10.0, 0.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)
    query = np.array([[0.6, 0.8]], dtype=np.float32)
    dot_scores, dot_ids = VectorIndex(docs, score="dot").search(query, 3)
    cos_scores, cos_ids = VectorIndex(docs, score="cos_sim").search(query, 3)
    assert dot_ids.tolist() == [[0, 1, 2]]  # the long vector wins on inner product (6.0 > 1.0)
    np.testing.assert_allclose(dot_scores, [[6.0, 1.0, -0.6]], atol=1e-6)
    assert cos_ids.tolist() == [[1, 0, 2]]  # the parallel vector wins on angle (1.0 > 0.6)
    np.testing.assert_allclose(cos_scores, [[1.0, 0.6, -0.6]], atol=1e-6)


def test_k_larger_than_the_index_is_clamped(vectors):
    scores, ids = VectorIndex(vectors[:7], score="dot").search(vectors[:2], 50)
    assert ids.shape == scores.shape == (2, 7)
    assert sorted(ids[0].tolist()) == list(range(7))
    assert (np.diff(scores, axis=1) <= 0).all()


def test_hnsw_finds_the_true_neighbours_on_a_small_set(vectors):
    index = VectorIndex(vectors, score="cos_sim", kind="hnsw")
    _, ids = index.search(vectors[:10], 1)
    assert ids[:, 0].tolist() == list(range(10))


def test_auto_choice_by_size_and_device():
    assert choose_kind(FLAT_MAX - 1) == "flat"
    assert choose_kind(FLAT_MAX) == "ivf"
    assert choose_kind(IVF_MAX) == "ivf"
    assert choose_kind(IVF_MAX + 1) == "hnsw"
    assert choose_kind(IVF_MAX + 1, gpu=True) == "ivf"  # FAISS GPUs have no HNSW
    assert choose_kind(10, "hnsw") == "hnsw"
    with pytest.raises(ValueError, match="index must be one of"):
        choose_kind(10, "lsh")  # type: ignore[arg-type]


def test_gpu_is_used_only_when_faiss_and_torch_see_one(vectors):
    index = VectorIndex(vectors, score="dot", use_gpu=True)  # with faiss-cpu: falls back to the CPU
    assert index.on_gpu == gpu_available()
    assert not VectorIndex(vectors, score="dot", use_gpu=False).on_gpu
    _, ids = index.search(vectors[:2], 1)
    assert ids[:, 0].tolist() == [int(np.argmax(vectors @ vectors[0])), int(np.argmax(vectors @ vectors[1]))]


def test_bad_input_is_a_clear_error(vectors):
    with pytest.raises(ValueError, match="score must be"):
        VectorIndex(vectors, score="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty 2-D"):
        VectorIndex(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="k must be positive"):
        VectorIndex(vectors).search(vectors[:1], 0)
