"""Query generation with a seq2seq model (T5): tokenize and truncate, seeded nucleus sampling, decode.

The boundary to torch and transformers for the generate stage; the stage itself decides what to generate
for which passage, in which batches, with which seed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gplflow.adapters import models

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """Nucleus sampling as in the GPL paper (top-k 25, top-p 0.95); lengths are in tokens."""

    top_k: int
    top_p: float
    max_new_tokens: int
    max_input_length: int
    prefix: str = ""


class QueryGenerator:
    """Wraps a (tokenizer, model) pair from ``models.load_seq2seq``; holds no state between calls."""

    def __init__(self, tokenizer: Any, model: Any, params: SamplingParams):
        self.tokenizer = tokenizer
        self.model = model
        self.params = params
        self._special = set(tokenizer.all_special_ids)
        prefix_ids = tokenizer(params.prefix, add_special_tokens=False)["input_ids"] if params.prefix else []
        self._prefix_tokens = len(prefix_ids)

    def encode(self, passages: Sequence[str]) -> list[list[int] | None]:
        """Token ids (prefix + passage, truncated to ``max_input_length``).

        None for a blank passage, or one of which no token is left after the prefix and the truncation.
        """
        prefix = self.params.prefix.strip()
        texts = [f"{prefix} {p}" if prefix else p for p in passages]
        ids = self.tokenizer(texts, truncation=True, max_length=self.params.max_input_length)["input_ids"]
        return [seq if p.strip() and self._content_tokens(seq) > self._prefix_tokens else None
                for p, seq in zip(passages, ids, strict=True)]

    def _content_tokens(self, ids: list[int]) -> int:
        return sum(1 for i in ids if i not in self._special)

    def generate(self, batch: Sequence[list[int]], n: int, seed: int) -> list[list[str]]:
        """``n`` sampled queries for each encoded passage, reproducible for the same batch and seed.

        The seed is applied to a forked RNG, so the caller's torch random state is left as it was.
        """
        padded = self.tokenizer.pad({"input_ids": list(batch)}, return_tensors="pt")
        dev = self.model.device
        forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            with models.inference(dev.type, bf16=models.bf16_pays(self.model, dev.type)):
                out = self.model.generate(
                    input_ids=padded["input_ids"].to(dev),
                    attention_mask=padded["attention_mask"].to(dev),
                    do_sample=True,
                    top_k=self.params.top_k,
                    top_p=self.params.top_p,
                    max_new_tokens=self.params.max_new_tokens,
                    num_return_sequences=n,
                )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        # generate() repeats each input n times in a row: rows i*n … i*n+n-1 belong to input i.
        return [[t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(batch))]
