"""Labelled pairs a user supplies (flow ``supervised``): a JSONL, CSV, TSV or Parquet file in, validated rows out.

Two kinds (`KINDS`), each a fixed set of roles (`ROLES`) read from the columns a mapping names (a role's
column is the role's own name unless mapped):
- ``scored``: (sentence1, sentence2, score), an STS-style similarity with ``score`` in [0, ``score_max``],
  returned divided by ``score_max`` (so in [0, 1]: what the cosine, CoSENT and AnglE losses take);
- ``ranking``: (anchor, positive[, negative]), for MultipleNegativesRankingLoss; the negative is read when the
  file has that column (JSONL: when the first record has that key), else in-batch negatives are the only ones.

The file is read with the corpus readers' record layer (``corpus_readers.iter_records``): the same UTF-8
decoding, IANA TSV (no quoting), strict CSV quoting, and one-line `CorpusError`s naming the file and the line
(JSONL) or data row (CSV/TSV/Parquet, header excluded). Texts are whitespace-normalised; an empty text, a
missing field and a score that is not a number in range are errors, never skipped rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gplflow.adapters.corpus_readers import (
    CorpusError,
    _listing,
    _type_name,
    detect_format,
    iter_records,
    normalize_whitespace,
)

KINDS = ("scored", "ranking")
ROLES = {"scored": ("sentence1", "sentence2", "score"), "ranking": ("anchor", "positive", "negative")}
OPTIONAL_ROLES = frozenset({"negative"})


class _RowError(Exception):
    """A problem in one record; the reader adds the file and line/row."""


def iter_pairs(path: str | Path, kind: str, fmt: str | None = None, columns: Mapping[str, str] | None = None,
               score_max: float = 1.0) -> Iterator[dict[str, Any]]:
    """Stream the validated rows of the pairs file at ``path``: dicts keyed by role (``negative`` only when the
    file has it). Path and format problems raise at the call; header and data problems while iterating."""
    if kind not in KINDS:
        raise CorpusError(f"unknown kind of pairs {kind!r}; expected one of: {', '.join(KINDS)}")
    if not score_max > 0 or not math.isfinite(score_max):
        raise CorpusError(f"score_max must be a positive number, got {score_max!r}")
    columns = columns or {}
    fmt = fmt or detect_format(path)
    wanted = {role: columns.get(role) or role for role in ROLES[kind]}
    found_optional: set[str] = set()

    def select(names: list[str], where: str) -> list[str]:
        missing = [f"{role} column {col!r}" for role, col in wanted.items()
                   if col not in names and role not in OPTIONAL_ROLES]
        if missing:
            raise CorpusError(f"{where}: no {' and no '.join(missing)} for {kind} pairs (columns: {_listing(names)})")
        found_optional.update(role for role in OPTIONAL_ROLES & wanted.keys() if wanted[role] in names)
        return [col for role, col in wanted.items() if role not in OPTIONAL_ROLES or role in found_optional]

    records = iter_records(path, fmt, select)
    return _validated(records, str(path), "line" if fmt == "jsonl" else "row", wanted, found_optional, score_max,
                      header_checked=fmt != "jsonl")


def _validated(records: Iterator[tuple[int, Mapping[str, Any]]], source: str, unit: str, wanted: dict[str, str],
               found_optional: set[str], score_max: float, header_checked: bool) -> Iterator[dict[str, Any]]:
    n = 0
    for pos, record in records:
        if not header_checked:  # JSONL: the first record decides whether the optional roles are read
            found_optional.update(r for r in OPTIONAL_ROLES & wanted.keys() if record.get(wanted[r]) is not None)
            header_checked = True
        try:
            row = {role: _value(record, role, col, score_max) for role, col in wanted.items()
                   if role not in OPTIONAL_ROLES or role in found_optional}
        except _RowError as err:
            raise CorpusError(f"{source} {unit} {pos}: {err}") from err
        n += 1
        yield row
    if n == 0:
        raise CorpusError(f"{source}: no pairs found, expected at least one")


def _value(record: Mapping[str, Any], role: str, column: str, score_max: float) -> str | float:
    value = record.get(column)
    if value is None:
        raise _RowError(f"missing field {column!r} (the {role})" if column not in record
                        else f"field {column!r} (the {role}) is null")
    if role == "score":
        return _score(value, column, score_max)
    if not isinstance(value, str):
        raise _RowError(f"field {column!r} (the {role}) must be a string, got {_type_name(value)}")
    text = normalize_whitespace(value)
    if not text:
        raise _RowError(f"field {column!r} (the {role}) is empty")
    return text


def _score(value: Any, column: str, score_max: float) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _RowError(f"field {column!r} (the score) must be a number, got {_type_name(value)}")
    try:
        score = float(value)
    except ValueError:
        raise _RowError(f"field {column!r} (the score) must be a number, got {value!r}") from None
    if not 0.0 <= score <= score_max:  # NaN fails this too
        raise _RowError(f"score {value!r} is outside [0, {score_max:g}] (pairs.score_max sets the top of the scale)")
    return score / score_max


def read_labels(path: str | Path, id_column: str = "doc_id", label_column: str = "label",
                fmt: str | None = None) -> dict[str, str]:
    """A file of (document id, label) rows, for the clustering evaluation: ``{doc_id: label}``.

    The same record layer and one-line errors as the pairs; a document labelled twice is an error naming both
    lines, an empty label too.
    """
    fmt = fmt or detect_format(path)
    wanted = [id_column, label_column]

    def select(names: list[str], where: str) -> list[str]:
        missing = [repr(col) for col in wanted if col not in names]
        if missing:
            raise CorpusError(f"{where}: no {' and no '.join(missing)} column for labels (columns: {_listing(names)})")
        return wanted

    unit = "line" if fmt == "jsonl" else "row"
    labels: dict[str, str] = {}
    first: dict[str, int] = {}
    for pos, record in iter_records(path, fmt, select):
        values = []
        for col in wanted:
            value = record.get(col)
            if isinstance(value, int) and not isinstance(value, bool) and col == id_column:
                value = str(value)
            if not isinstance(value, str) or not normalize_whitespace(value):
                raise CorpusError(f"{path} {unit} {pos}: field {col!r} must be a non-empty string, got "
                                  f"{_type_name(value) if value is not None else 'nothing'}")
            values.append(normalize_whitespace(value))
        doc_id, label = values
        if doc_id in labels:
            raise CorpusError(f"{path} {unit} {pos}: document {doc_id!r} is labelled again (first at {unit} "
                              f"{first[doc_id]})")
        labels[doc_id], first[doc_id] = label, pos
    if not labels:
        raise CorpusError(f"{path}: no labels found, expected at least one")
    return labels
