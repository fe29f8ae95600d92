"""Prompts for LLM query generation, and the parsing of what the model answers.

A prompt is a system line plus a user message rendered from a template with two placeholders: ``{passage}``
(the passage, title first) and ``{examples}`` (the few-shot examples, rendered as "Document / Good question"
blocks). The two built-in templates are written by this project: ``zero_shot`` asks for one search query;
``few_shot`` shows examples, each with a good question and (for the built-in ones) a bad question, in the style
of InPars's good/bad-question prompt. A user template file replaces the built-in text; a ``generate.examples``
file of (passage, query) pairs from the user's own domain replaces the built-in examples (Promptagator-style).

Parsing keeps one query per completion: its first non-empty line, with list numbering, a "Query:" echo and
enclosing quotes stripped. Empty queries, copies of the passage and over-long ones are dropped, each counted
under its reason (``DROP_REASONS``).
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from gplflow.adapters.corpus_readers import (
    CorpusError,
    _listing,
    _short,
    _type_name,
    detect_format,
    iter_records,
    normalize_whitespace,
)
from gplflow.adapters.errors import InputError, MissingInputError

PLACEHOLDERS = ("passage", "examples")
BUILTIN = ("zero_shot", "few_shot")
MAX_EXAMPLES = 8  # Promptagator's most; more only lengthens every prompt
# The parse layer's drop reasons, as counters of the generate manifest.
EMPTY, COPY, TOO_LONG = "empty_queries", "copied_passage", "too_long_queries"
DROP_REASONS = (EMPTY, COPY, TOO_LONG)

SYSTEM = "You write the search queries that people type into a search engine. Answer with one query only."
_ZERO_SHOT = ("Write one search query that a person could type to find the following document. The document "
              "should answer the query. Do not copy sentences from the document.\n\n"
              "Document: {passage}\nQuery:")
_FEW_SHOT = ("Below are documents, each with a good question, one the document answers and that a person would "
             "search for, and where given a bad question, which copies the document or which it does not answer. "
             "Write a good question for the last document.\n\n{examples}"
             "Document: {passage}\nGood question:")


@dataclass(frozen=True)
class Example:
    passage: str
    query: str
    bad: str = ""  # a bad question, shown by the built-in few-shot examples only


# Written for this project: short passages from everyday domains, each with a good and a bad question.
BUILTIN_EXAMPLES = (
    Example("The kettle switches itself off when the water boils: a bimetallic strip near the spout bends in "
            "the steam and breaks the circuit.",
            "why does an electric kettle turn off by itself",
            "The kettle switches itself off when the water boils."),
    Example("Sourdough bread rises because wild yeasts and lactic acid bacteria in the starter ferment the flour, "
            "releasing carbon dioxide and the acids that give the bread its sour taste.",
            "what makes sourdough bread taste sour",
            "what is the best bakery in town"),
    Example("A library card lets members borrow up to twenty items at a time for three weeks; renewals can be "
            "made online unless another member has reserved the item.",
            "how long can I keep books borrowed from the library",
            "library card"),
)


@dataclass(frozen=True)
class Prompt:
    """A rendered-ready prompt: the system line, the user template and its examples."""

    name: str  # zero_shot, few_shot, or the template file
    system: str
    template: str
    examples: tuple[Example, ...] = ()

    def user_message(self, passage: str) -> str:
        return self.template.format(passage=passage, examples=render_examples(self.examples))

    def messages(self, passage: str) -> list[dict[str, str]]:
        """Chat messages (system, user) for one passage."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user_message(passage)}]

    def plain(self, passage: str) -> str:
        """The prompt as one text, for a model without a chat template."""
        return f"{self.system}\n\n{self.user_message(passage)}"

    def record(self) -> dict[str, Any]:
        """What the manifest keeps of the prompt: its text, and the examples by count and digest."""
        shown = render_examples(self.examples)
        return {"name": self.name, "system": self.system, "template": self.template, "examples": len(self.examples),
                "examples_sha256": hashlib.sha256(shown.encode()).hexdigest(), "example_text": shown}


def render_examples(examples: Sequence[Example]) -> str:
    blocks = []
    for ex in examples:
        block = f"Document: {ex.passage}\nGood question: {ex.query}\n"
        blocks.append(block + (f"Bad question: {ex.bad}\n" if ex.bad else ""))
    return "".join(f"{b}\n" for b in blocks)


def build_prompt(builtin: str, template_path: str = "", examples_path: str = "") -> Prompt:
    """The prompt a config names: a built-in template or a template file, with the built-in or the user's examples.

    A template with no ``{examples}`` placeholder is zero-shot whatever examples are given.
    """
    if builtin not in BUILTIN:
        raise InputError(f"generate.prompt: unknown built-in prompt {builtin!r}; expected one of {', '.join(BUILTIN)}")
    if template_path:
        name, template = template_path, read_template(template_path)
    else:
        name, template = builtin, _ZERO_SHOT if builtin == "zero_shot" else _FEW_SHOT
    examples: tuple[Example, ...] = ()
    if "{examples}" in template:
        examples = read_examples(examples_path) if examples_path else BUILTIN_EXAMPLES
    return Prompt(name, SYSTEM, template, examples)


def read_template(path: str) -> str:
    """A user template: UTF-8 text with ``{passage}`` (required) and ``{examples}``; ``{{``/``}}`` are braces."""
    text = _read_text(path, "generate.template")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]
    except ValueError as err:
        raise InputError(f"{path}: not a valid template ({err}); write a literal brace as '{{{{' or '}}}}'") from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        raise InputError(f"{path}: unknown placeholder {{{unknown[0]}}}; a template may use only "
                         f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write a literal brace as '{{{{')")
    if "passage" not in fields:
        raise InputError(f"{path}: the template has no {{passage}} placeholder; the passage must go somewhere")
    return text


def read_examples(path: str, limit: int = MAX_EXAMPLES) -> tuple[Example, ...]:
    """(passage, query) pairs from a JSONL, CSV, TSV or Parquet file with ``passage`` and ``query`` columns.

    Errors name the file and the line (JSONL) or data row; at most ``limit`` pairs, more is an error.
    """
    wanted = ("passage", "query")

    def select(names: list[str], where: str) -> list[str]:
        missing = [c for c in wanted if c not in names]
        if missing:
            raise CorpusError(f"{where}: no {' and no '.join(repr(c) for c in missing)} column "
                              f"(columns: {_listing(names)})")
        return list(wanted)

    try:
        fmt = detect_format(path)
        found = tuple(_examples(iter_records(path, fmt, select), path, "line" if fmt == "jsonl" else "row", limit))
    except CorpusError as err:
        raise InputError(f"generate.examples: {err}") from None
    if not found:
        raise InputError(f"generate.examples: {path}: no examples, expected 1 to {limit} (passage, query) pairs")
    return found


def _examples(records: Iterator[tuple[int, Mapping[str, Any]]], path: str, unit: str,
              limit: int) -> Iterator[Example]:
    for n, (pos, record) in enumerate(records, start=1):
        if n > limit:
            raise CorpusError(f"{path} {unit} {pos}: more than {limit} examples; a prompt shows at most {limit}")
        values = []
        for field in ("passage", "query"):
            value = record.get(field)
            if not isinstance(value, str) or not normalize_whitespace(value):
                got = "nothing (no such field)" if field not in record else f"{_type_name(value)} {_short(value)}"
                raise CorpusError(f"{path} {unit} {pos}: field {field!r} must be a non-empty string, got {got}")
            values.append(normalize_whitespace(value))
        yield Example(*values)


def _read_text(path: str, key: str) -> str:
    try:
        with fsspec.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise MissingInputError(f"{key}: {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{key}: {path}: is a folder, expected a text file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"{path} line {line}: bytes that are not UTF-8") from None


# --- parsing ----------------------------------------------------------------------------------------------

_NUMBERING = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*•#]+)\s+")
_ECHO = re.compile(r"^\s*(?:\*\*)?(?:good\s+)?(?:search\s+)?(?:query|question)(?:\s*\d+)?\s*(?:\*\*)?\s*[:：]\s*",
                   re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "`": "`"}
_WORD = re.compile(r"\w+")


def clean_query(answer: str, stop: Sequence[str] = ()) -> str:
    """The query in one completion: cut at the first stop string, its first non-empty line, numbering, a
    "Query:" echo and enclosing quotes removed, whitespace collapsed ("" when nothing is left)."""
    for s in stop:
        if s and s in answer:
            answer = answer[: answer.index(s)]
    line = next((ln for ln in answer.splitlines() if ln.strip()), "")
    for _ in range(3):  # "1. Query: \"...\"" takes more than one pass
        before = line
        line = _ECHO.sub("", _NUMBERING.sub("", line)).strip()
        if len(line) >= 2 and _QUOTES.get(line[0]) == line[-1]:
            line = line[1:-1].strip()
        if line == before:
            break
    return normalize_whitespace(line)


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


@dataclass
class Parsed:
    """The queries kept from a passage's completions, their log-probs, and the drops by reason."""

    queries: list[str]
    logprobs: list[float | None]
    drops: Counter


def parse_completions(completions: Iterable[tuple[str, float | None]], passage: str, max_words: int,
                      stop: Sequence[str] = ()) -> Parsed:
    """Clean each (answer, mean log-prob) and drop what is no query: empty, a copy of the passage (the query's
    words are a run of the passage's words at least half its length, or the whole passage), or longer than
    ``max_words`` words."""
    body = _norm(passage)
    out = Parsed([], [], Counter())
    for answer, logprob in completions:
        query = clean_query(answer, stop)
        words = _norm(query)
        if not words:
            out.drops[EMPTY] += 1
        elif words == body or (f" {words} " in f" {body} " and 2 * len(words) >= len(body)):
            out.drops[COPY] += 1
        elif len(query.split()) > max_words:
            out.drops[TOO_LONG] += 1
        else:
            out.queries.append(query)
            out.logprobs.append(logprob)
    return out
