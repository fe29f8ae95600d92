"""Dense encoding: texts -> a float32 numpy matrix, in length-sorted batches, under ``models.inference``.

Used by mine (corpus and queries) and evaluate. Sorting by length means a batch pads to its own longest
text, not to the longest text of the whole set; the rows come back in the caller's order.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from gplflow.adapters import models
from gplflow.adapters.errors import InputError
from gplflow.adapters.oom import halve_on_oom

logger = logging.getLogger(__name__)

Role = Literal["query", "document"]


def encode(
    model,
    texts: Sequence[str],
    *,
    role: Role = "document",
    batch_size: int = 64,
    normalize: bool = False,
    desc: str = "encoding",
    show_progress: bool = True,
    setting: str = "batch_size",
    on_progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Embed ``texts`` with a SentenceTransformer; row i is text i. L2-normalised when ``normalize``.

    ``role`` picks ``encode_query`` or ``encode_document``, so a model with query/document prompts gets them.
    A batch that runs out of GPU memory is retried in halves; ``setting`` names the config key to lower.
    ``on_progress(n)`` is told of each batch of ``n`` texts encoded.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out = np.empty((len(texts), embedding_dim(model)), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    fn = model.encode_query if role == "query" else model.encode_document

    def embed(idx: np.ndarray) -> np.ndarray:
        emb = fn([texts[i] for i in idx], batch_size=len(idx), convert_to_tensor=True, show_progress_bar=False)
        emb = emb.float()
        if normalize:
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb.cpu().numpy()

    # an explicit disable= overrides tqdm's TQDM_DISABLE, which the benchmarks and the device processes set
    quiet = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress or not len(texts) or quiet)
    with models.inference(bf16=models.bf16_pays(model)), bar:
        for start in range(0, len(texts), batch_size):
            for idx, emb in halve_on_oom(embed, order[start : start + batch_size], what=setting):
                out[idx] = emb
            done = min(batch_size, len(texts) - start)
            bar.update(done)
            if on_progress is not None:
                on_progress(done)
    return out


def embedding_dim(model) -> int:
    """The embedding width (sentence-transformers 5+ renamed the method; older releases have the old name)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if not dim:
        raise InputError(f"{type(model).__name__}: cannot tell the embedding dimension of this model")
    return int(dim)


def release_memory() -> None:
    """Give back memory held by a model that was just dropped (CPU garbage, and the CUDA cache on GPUs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
