"""Offline text tools for TSDAE: a word tokenizer and deletion noise (sentences: ``adapters/text.py``).

sentence-transformers' default TSDAE noise calls NLTK's punkt tokenizer, which downloads its data at run time
and so fails on a machine without the internet. These regular expressions do the same job well enough for
denoising pretraining: the noise only has to delete words, and the decoder learns from the original text.
"""

from __future__ import annotations

import random
import re

# Words (with inner apostrophes, hyphens, periods or commas: "don't", "well-known", "3.5", "10,000"),
# or any single other non-space character (punctuation).
_TOKEN = re.compile(r"\w+(?:['’.,\-]\w+)*|[^\w\s]")
_WORD = re.compile(r"\w")
# Detokenizing: no space before closing punctuation, none after opening brackets.
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}”’])")
_SPACE_AFTER = re.compile(r"([(\[{“‘$]) ")


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation marks, in order (a regex stand-in for NLTK's ``word_tokenize``)."""
    return _TOKEN.findall(text)


def is_word(token: str) -> bool:
    return _WORD.search(token) is not None


def detokenize(tokens: list[str]) -> str:
    """Join tokens with spaces, then remove the spaces around punctuation."""
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", " ".join(tokens)))


def delete_words(text: str, ratio: float, rng: random.Random) -> str:
    """TSDAE's deletion noise: drop each token with probability ``ratio``; always keep at least one word.

    Text without any token is returned unchanged, so a non-empty input never gives an empty output.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"noise ratio must be in [0, 1), got {ratio}")
    tokens = word_tokenize(text)
    if not tokens:
        return text
    keep = [rng.random() >= ratio for _ in tokens]
    if not any(k and is_word(t) for k, t in zip(keep, tokens, strict=True)):
        words = [i for i, t in enumerate(tokens) if is_word(t)] or list(range(len(tokens)))
        keep[rng.choice(words)] = True
    return detokenize([t for k, t in zip(keep, tokens, strict=True) if k])
