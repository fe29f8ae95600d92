"""Teachers that score (query, passage) pairs: a cross-encoder's raw logit, or a bi-encoder's dot product.

Both take the distinct pairs as two index arrays into a list of query texts and a list of passage texts, so a
caller that deduplicates pairs pays for each one once, and the texts themselves are held once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from gplflow.adapters import models
from gplflow.adapters.oom import halve_on_oom

logger = logging.getLogger(__name__)

TeacherKind = Literal["cross_encoder", "bi_encoder"]
_DOT_CHUNK = 65_536  # pairs per gathered chunk in the bi-encoder dot product (bounds the gathered copy)


class PairScorer(Protocol):
    def score(
        self, queries: Sequence[str], passages: Sequence[str], pair_q: np.ndarray, pair_p: np.ndarray
    ) -> np.ndarray:
        """float32 score of each pair (queries[pair_q[i]], passages[pair_p[i]])."""
        ...


def load_scorer(
    kind: TeacherKind, ref: str, *, max_seq_length: int, batch_size: int, normalize: bool = False
) -> PairScorer:
    """The teacher of `kind` loaded from `ref` (a local folder or a hub name)."""
    if kind == "cross_encoder":
        return CrossEncoderScorer(models.load_cross_encoder(ref, max_length=max_seq_length), batch_size)
    if kind == "bi_encoder":
        model = models.load_bi_encoder(ref, max_seq_length=max_seq_length, inference=True)
        return BiEncoderScorer(model, batch_size, normalize)
    raise ValueError(f"unknown teacher {kind!r}; expected 'cross_encoder' or 'bi_encoder'")


def _lengths(texts: Sequence[str]) -> np.ndarray:
    """Character lengths: a cheap stand-in for token lengths when ordering batches."""
    return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))


@dataclass
class CrossEncoderScorer:
    """Raw logits of a sentence-transformers CrossEncoder (never a sigmoid: GPL margins need logits)."""

    model: Any  # sentence_transformers.CrossEncoder
    batch_size: int

    def score(
        self, queries: Sequence[str], passages: Sequence[str], pair_q: np.ndarray, pair_p: np.ndarray
    ) -> np.ndarray:
        def predict(idx: np.ndarray) -> np.ndarray:
            batch = [(queries[q], passages[p]) for q, p in zip(pair_q[idx], pair_p[idx], strict=True)]
            # activation_fn passed explicitly: a model saved without one would otherwise get a Sigmoid.
            return self.model.predict(batch, batch_size=len(batch), show_progress_bar=False,
                                      activation_fn=torch.nn.Identity(), convert_to_numpy=True)

        lengths = _lengths(queries)[pair_q] + _lengths(passages)[pair_p]
        order = np.argsort(-lengths, kind="stable")  # longest first: an out-of-memory shows up at once
        scores = np.empty(len(order), dtype=np.float32)
        with models.inference(bf16=models.bf16_pays(self.model)), \
                tqdm(total=len(order), desc="scoring pairs", unit="pair") as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for part, found in halve_on_oom(predict, idx, what="label.batch_size"):
                    scores[part] = found
                bar.update(len(idx))
        return scores


@dataclass
class BiEncoderScorer:
    """Dot product of SentenceTransformer embeddings; each distinct text is encoded once.

    With ``normalize`` the embeddings are unit length first (cosine). A model that ends in a Normalize
    module (all-MiniLM-L6-v2 does) gives cosine scores either way.
    """

    model: Any  # sentence_transformers.SentenceTransformer
    batch_size: int
    normalize: bool = False

    def score(
        self, queries: Sequence[str], passages: Sequence[str], pair_q: np.ndarray, pair_p: np.ndarray
    ) -> np.ndarray:
        used_q, used_p = np.unique(pair_q), np.unique(pair_p)
        q_emb = self.encode([queries[i] for i in used_q], "encoding queries")
        p_emb = self.encode([passages[i] for i in used_p], "encoding passages")
        q_row, p_row = np.searchsorted(used_q, pair_q), np.searchsorted(used_p, pair_p)
        scores = np.empty(len(pair_q), dtype=np.float32)
        for start in range(0, len(scores), _DOT_CHUNK):
            end = start + _DOT_CHUNK
            scores[start:end] = np.einsum("ij,ij->i", q_emb[q_row[start:end]], p_emb[p_row[start:end]])
        return scores

    def encode(self, texts: list[str], desc: str) -> np.ndarray:
        """float32 embeddings of `texts`, computed in length-sorted batches."""
        def embed(idx: np.ndarray) -> np.ndarray:
            return self.model.encode([texts[i] for i in idx], batch_size=len(idx), convert_to_numpy=True,
                                     normalize_embeddings=self.normalize, show_progress_bar=False)

        order = np.argsort(-_lengths(texts), kind="stable")
        out: np.ndarray | None = None
        with models.inference(bf16=models.bf16_pays(self.model)), tqdm(total=len(texts), desc=desc, unit="text") as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for part, emb in halve_on_oom(embed, idx, what="label.batch_size"):
                    if out is None:
                        out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
                    out[part] = emb
                bar.update(len(idx))
        return out if out is not None else np.empty((0, 0), dtype=np.float32)
