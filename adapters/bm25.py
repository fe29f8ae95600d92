"""BM25 in-process with the ``bm25s`` package: no Elasticsearch, nothing downloaded.

Tokenisation is bm25s's own offline tokenizer: lower-cased ``\\w\\w+`` words minus bm25s's bundled English
stopword list, no stemmer (a stemmer would need the optional PyStemmer package). Queries are tokenised
against the corpus vocabulary, so words the corpus never uses are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import bm25s
import numpy as np
from bm25s.tokenization import Tokenizer

logger = logging.getLogger(__name__)


class BM25Index:
    """A BM25 (Lucene variant, k1=1.5, b=0.75) index over passages; ``search`` returns corpus positions."""

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75, show_progress: bool = True):
        if not texts:
            raise ValueError("BM25 needs at least one passage")
        self.size = len(texts)
        self.show_progress = show_progress
        self.tokenizer = Tokenizer(lower=True, stopwords="en")
        tokens = self.tokenizer.tokenize(list(texts), update_vocab=True, return_as="ids",
                                         show_progress=show_progress)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(tokens, show_progress=show_progress)
        logger.info("BM25 index over %d passages (%d terms)", self.size, len(self.tokenizer.get_vocab_dict()))

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, positions int64), each (n_queries, min(k, size)), best first.

        A passage that shares no term with the query scores 0: the caller decides whether such a passage
        is worth keeping (for hard negatives it is not).
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, self.size)
        if not queries:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        tokens = self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids", show_progress=False)
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=self.show_progress, n_threads=0)
        return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)
