"""How a corpus row reads as text: one rule for every stage that shows a passage to a model, and one sentence
splitter for every stage that cuts passages into sentences.

A passage is ``title + " " + text``, stripped (just the text when the title is empty), as the GPL paper and
the reference implementation (UKPLab gpl) give passages to the generator, the retrievers, the cross-encoder and
the student alike. Generation, mining, labelling, training, evaluation, MLM pretraining and the plan's
calibration all read passages through here, so the teacher scores the very text the student is trained on.
"""

from __future__ import annotations

import re

import pyarrow as pa

# Lower-cased tokens that end with a period without ending a sentence ("e.g. The" does not split).
ABBREVIATIONS = frozenset({
    "al.", "approx.", "ca.", "cf.", "co.", "corp.", "dept.", "dr.", "e.g.", "eq.", "est.", "fig.", "figs.",
    "i.e.", "inc.", "jr.", "ltd.", "mr.", "mrs.", "ms.", "mt.", "no.", "nos.", "p.", "pp.", "prof.", "ref.",
    "sec.", "sr.", "st.", "vol.", "vs.",
})
# Terminal punctuation, closing quotes or brackets, whitespace, and (captured) the first letter or digit after
# any opening quote or bracket; or a CJK full stop with its closing brackets.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*\s+(?=[\"'“‘(\[]?([^\W_]))|[。！？][」』”’）)]*\s*")
_PARAGRAPH = re.compile(r"\n\s*\n")
_INITIALS = re.compile(r"(?:[A-Za-z]\.){1,3}")  # "J.", "U.S.", "U.S.A.": initials and dotted acronyms


def passage_text(title: str | None, text: str | None) -> str:
    """``title + " " + text``, stripped: the text alone when there is no title."""
    return f"{title or ''} {text or ''}".strip()


def passage_texts(rows: pa.Table | pa.RecordBatch) -> list[str]:
    """``passage_text`` of every row of a table or batch with ``title`` and ``text`` columns."""
    titles, texts = rows.column("title").to_pylist(), rows.column("text").to_pylist()
    return [passage_text(title, text) for title, text in zip(titles, texts, strict=True)]


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, whitespace collapsed: the splitter of extractive generation and of the sentence
    pretraining methods (TSDAE, SimCSE, CT).

    A sentence ends at . ! ? or … (with any closing quotes or brackets) before whitespace and a capital, a digit
    or a letter of a script without case (after any opening quote or bracket); right after a CJK full stop
    (。！？); and at a blank line. Abbreviations ("e.g.", "Dr."), initials ("J. Smith") and decimals ("3.5") stay
    inside their sentence, and a lower-case word never starts one ("e.g. the"). Regular expressions rather than
    NLTK's punkt, which downloads its data at run time.
    """
    sentences: list[str] = []
    for paragraph in _PARAGRAPH.split(text):
        start = 0
        for match in _SENTENCE_END.finditer(paragraph):
            follower = match.group(1)  # None after a CJK full stop, which always ends a sentence
            if follower is not None and (follower.islower() or _is_abbreviation(paragraph, match.start())):
                continue
            sentences.append(paragraph[start : match.end()])
            start = match.end()
        sentences.append(paragraph[start:])
    return [" ".join(s.split()) for s in sentences if s.strip()]


def _is_abbreviation(text: str, period: int) -> bool:
    """Whether the period at ``period`` ends an abbreviation or initials rather than a sentence."""
    if text[period] != ".":
        return False
    word = text[: period + 1].rsplit(None, 1)[-1].lstrip("\"'“‘([")
    return word.lower() in ABBREVIATIONS or _INITIALS.fullmatch(word) is not None
