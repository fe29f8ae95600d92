"""Top-k inner-product search with FAISS: flat (exact), IVF or HNSW (approximate), CPU or GPU.

``index: auto`` picks by corpus size and device:

* fewer than ``FLAT_MAX`` (100k) vectors: flat, exact. A flat scan of 100k x 768 float32 vectors costs
  ~0.15 GFLOP per query, milliseconds on a CPU, and mined negatives are then exactly the top-k.
* up to ``IVF_MAX`` (2M) vectors, or any size on a GPU: IVF-Flat with ``nlist = 4 * sqrt(N)`` lists (FAISS's
  guideline for fewer than a few million vectors), trained on a seeded sample of ``50 * nlist`` vectors,
  searched with ``nprobe = max(32, nlist / 16)`` lists (a few percent of the data: recall@50 close to 1).
* above that on a CPU: HNSW (M=32, efConstruction=80, efSearch = max(128, 2k)); no training pass, and a
  query costs O(log N) instead of a scan. FAISS GPUs have no HNSW, so an explicit ``hnsw`` stays on the CPU.

With cos_sim the vectors (corpus and queries) are L2-normalised, so inner product is cosine similarity;
with dot they are used as they are.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np

try:
    import faiss
except ImportError as err:  # faiss-cpu and faiss-gpu are extras: exactly one of them must be installed
    raise ImportError("faiss is not installed: pip install 'gplflow[cpu]', or 'gplflow[gpu]' on CUDA hosts") from err

logger = logging.getLogger(__name__)

Score = Literal["cos_sim", "dot"]
IndexKind = Literal["auto", "flat", "ivf", "hnsw"]

FLAT_MAX = 100_000
IVF_MAX = 2_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_TRAIN_PER_LIST = 50
IVF_MIN_NPROBE = 32
IVF_MAX_NPROBE = 2048  # the FAISS GPU limit


def gpu_available() -> bool:
    """True when faiss was built with GPU support, sees a GPU, and torch sees CUDA (faiss-cpu: False)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None or get_num_gpus() <= 0:
        return False
    import torch

    return torch.cuda.is_available()


def choose_kind(n: int, kind: IndexKind = "auto", gpu: bool = False) -> str:
    """The index type for ``n`` vectors (see the module docstring for the thresholds)."""
    if kind not in ("auto", "flat", "ivf", "hnsw"):
        raise ValueError(f"index must be one of auto, flat, ivf, hnsw; got {kind!r}")
    if kind != "auto":
        return kind
    if n < FLAT_MAX:
        return "flat"
    return "ivf" if gpu or n <= IVF_MAX else "hnsw"


class VectorIndex:
    """An inner-product index over a fixed set of vectors; ``search`` returns positions into that set."""

    def __init__(self, vectors: np.ndarray, *, score: Score = "cos_sim", kind: IndexKind = "auto",
                 use_gpu: bool | None = None, seed: int = 0, copy: bool = True):
        if score not in ("cos_sim", "dot"):
            raise ValueError(f"score must be 'cos_sim' or 'dot', got {score!r}")
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"expected a non-empty 2-D array of vectors, got shape {vectors.shape}")
        self.score = score
        vectors = self._prepare(vectors, copy)
        gpu = gpu_available() if use_gpu is None else use_gpu and gpu_available()
        self.kind = choose_kind(len(vectors), kind, gpu)
        self.size = len(vectors)
        cpu_index = _build(self.kind, vectors, seed)
        self.on_gpu = gpu and self.kind != "hnsw"
        self.index = faiss.index_cpu_to_all_gpus(cpu_index) if self.on_gpu else cpu_index
        logger.info("vector index: %s over %d x %d (%s, %s)", self.kind, self.size, vectors.shape[1],
                    score, "GPU" if self.on_gpu else "CPU")

    def _prepare(self, vectors: np.ndarray, copy: bool = True) -> np.ndarray:
        """float32, C-contiguous, L2-normalised for cos_sim; ``copy=False`` may normalise the caller's array."""
        out = np.array(vectors, dtype=np.float32, order="C", copy=copy or None)
        if self.score == "cos_sim":
            faiss.normalize_L2(out)
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, positions int64), each (n_queries, min(k, size)), best first; -1 marks a miss."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, self.size)
        if len(queries) == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * k)
        scores, ids = self.index.search(self._prepare(queries), k)
        return scores.astype(np.float32, copy=False), ids


def _build(kind: str, vectors: np.ndarray, seed: int) -> faiss.Index:
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    else:
        index = _trained_ivf(vectors, seed)
    index.add(vectors)
    return index


def _trained_ivf(vectors: np.ndarray, seed: int) -> faiss.Index:
    n, dim = vectors.shape
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))  # FAISS warns below 39 training points per list
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = min(n, IVF_TRAIN_PER_LIST * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    index.train(vectors[rows])
    index.nprobe = min(nlist, IVF_MAX_NPROBE, max(IVF_MIN_NPROBE, nlist // 16))
    return index
