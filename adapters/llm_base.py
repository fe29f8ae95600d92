"""The one interface of LLM query generators: a local causal LM (``llm_generation``) or an OpenAI-compatible server
(``llm_endpoint``). Both take passages and give back, per passage, its completions and the tokens it cost, so the
generate stage parses, counts and checkpoints them the same way whatever produced them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gplflow.adapters.llm_prompts import Prompt


@dataclass(frozen=True)
class Sampling:
    """How each completion is sampled; ``n`` completions per passage (the queries per passage)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    logprob: float | None  # mean log-probability of its tokens; None when the server gave none


@dataclass
class PassageResult:
    """A passage's completions and the tokens its request(s) cost."""

    completions: list[Completion]
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Usage:
    """What a call to ``generate`` cost, added into the shard's counters."""

    counters: Counter = field(default_factory=Counter)

    def add(self, **values: int) -> None:
        self.counters.update({k: v for k, v in values.items() if v})


class LLMGenerator(Protocol):
    prompt: Prompt
    sampling: Sampling

    def generate(self, passages: Sequence[str], keys: Sequence[str], seed: int,
                 progress: Callable[[int], Any]) -> tuple[list[PassageResult | None], Usage]:
        """Completions for each passage (None for a passage with nothing left to show), seeded by ``seed`` and,
        per passage, its key (the doc id); ``progress(n)`` is told of passages done."""
        ...


def key_seed(seed: int, key: str) -> int:
    """A 31-bit seed for one passage from the stage seed and its key (servers take a signed 32-bit seed)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31


def mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None
