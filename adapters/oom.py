"""One batch, retried in two halves after a CUDA out-of-memory error.

Generation, encoding and scoring pick their batch size for typical inputs; one batch of unusually long
passages can still exhaust GPU memory. Rather than failing a shard that ran for an hour, the batch is run
again as two half batches; if a half does not fit either, the error says which setting to lower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from gplflow.adapters.errors import GplflowError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class OutOfMemoryError(GplflowError, RuntimeError):
    """A batch did not fit in GPU memory even at half its size."""


def halve_on_oom(fn: Callable[[Sequence[T]], R], batch: Sequence[T], *, what: str) -> list[tuple[Sequence[T], R]]:
    """``[(batch, fn(batch))]``, or after ``torch.cuda.OutOfMemoryError`` the same for each half of the batch.

    ``what`` names the setting to lower in the final error (for example ``"generate.batch_size"``).
    """
    try:
        return [(batch, fn(batch))]
    except torch.cuda.OutOfMemoryError:
        if len(batch) < 2:
            raise OutOfMemoryError(f"CUDA out of memory on a batch of 1; lower {what} or the maximum "
                                   "sequence length") from None
    # Retry outside the except block, so the failed attempt's tensors (held by the traceback) are freed.
    _release_cuda()
    half = (len(batch) + 1) // 2
    logger.warning("CUDA out of memory on a batch of %d; retrying as two batches of at most %d (%s)",
                   len(batch), half, what)
    parts = (batch[:half], batch[half:])
    try:
        return [(part, fn(part)) for part in parts]
    except torch.cuda.OutOfMemoryError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
    _release_cuda()
    raise OutOfMemoryError(f"CUDA out of memory on a batch of {len(batch)} and again at {half} ({reason}); "
                           f"lower {what}")


def _release_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
