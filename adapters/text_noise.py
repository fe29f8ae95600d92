"""Offline text tools for TSDAE: a sentence splitter, a word tokenizer and deletion noise.

sentence-transformers' default TSDAE noise calls NLTK's punkt tokenizer, which downloads its data at run time
and so fails on a machine without the internet. These regular expressions do the same job well enough for
denoising pretraining: the noise only has to delete words, and the decoder learns from the original text.
"""

from __future__ import annotations

import random
import re

# Lower-cased tokens that end with a period without ending a sentence ("e.g. The" does not split).
ABBREVIATIONS = frozenset({
    "al.", "approx.", "ca.", "cf.", "co.", "corp.", "dept.", "dr.", "e.g.", "eq.", "est.", "fig.", "figs.",
    "i.e.", "inc.", "jr.", "ltd.", "mr.", "mrs.", "ms.", "mt.", "no.", "nos.", "p.", "pp.", "prof.", "ref.",
    "sec.", "sr.", "st.", "vol.", "vs.",
})
# A sentence end: terminal punctuation (with closing quotes or brackets), whitespace, then something that
# starts a sentence (a capital or a digit, possibly after an opening quote or bracket).
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_PARAGRAPH = re.compile(r"\n\s*\n")
_INITIALS = re.compile(r"(?:[A-Za-z]\.){1,3}")  # "J.", "U.S.", "U.S.A.": initials and dotted acronyms
# Words (with inner apostrophes, hyphens, periods or commas: "don't", "well-known", "3.5", "10,000"),
# or any single other non-space character (punctuation).
_TOKEN = re.compile(r"\w+(?:['’.,\-]\w+)*|[^\w\s]")
_WORD = re.compile(r"\w")
# Detokenizing: no space before closing punctuation, none after opening brackets.
_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}”’])")
_SPACE_AFTER = re.compile(r"([(\[{“‘$]) ")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: split at . ! ? before a space and a capital or a digit, and at blank lines.

    Abbreviations ("e.g.", "Dr."), initials ("J. Smith") and decimals ("3.5") stay inside their sentence.
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        start = 0
        for match in _BOUNDARY.finditer(paragraph):
            if _is_abbreviation(paragraph, match.start()):
                continue
            sentences.append(paragraph[start:match.end()].strip())
            start = match.end()
        sentences.append(paragraph[start:].strip())
    return [" ".join(s.split()) for s in sentences if s]


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the period at ``period`` ends an abbreviation rather than a sentence."""
    if text[period] != ".":
        return False
    word = text[: period + 1].rsplit(None, 1)[-1].lstrip("\"'“‘([")
    return word.lower() in ABBREVIATIONS or _INITIALS.fullmatch(word) is not None


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
