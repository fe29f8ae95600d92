"""BEIR evaluation files in, the evaluation's ``metrics.json`` out.

Qrels are BEIR TSV: ``query-id<TAB>corpus-id<TAB>score`` with an optional header line of exactly those
names (BEIR's own files have it; a first line that is not the header is read as data). Scores are integers
(graded relevance; 0 = judged not relevant). Queries are BEIR ``queries.jsonl``: one JSON object a line
with ``_id`` (string or integer) and ``text``. Paths may be local or fsspec URLs; ``.gz``/``.bz2`` files are
decompressed on the fly.

Every problem is a ``BeirFormatError`` whose one-line message names the file and the line. Decisions:
blank lines are skipped; a judgment repeated with the same score is counted and ignored, with a different
score it is an error; a qrels query id missing from the queries file is an error (its first qrels line is
named); ids are kept exactly as written.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from gplflow.adapters.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

QRELS_HEADER = ("query-id", "corpus-id", "score")
METRICS_FILE = "metrics.json"


class BeirFormatError(InputError):
    """A malformed BEIR file; the message names the file and the line."""


@dataclass
class Qrels:
    """Judgments ``{query_id: {doc_id: score}}`` in file order, and where each query first appears."""

    path: str
    judgments: dict[str, dict[str, int]] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)
    repeated: int = 0  # identical judgments written more than once (ignored)

    @property
    def count(self) -> int:
        return sum(len(docs) for docs in self.judgments.values())


@dataclass(frozen=True)
class EvalSet:
    """What an evaluation needs: the qrels and the text of every judged query."""

    qrels: Qrels
    queries: dict[str, str]
    queries_path: str


def default_queries_path(qrels_path: str) -> str:
    """BEIR layout: ``<dataset>/qrels/test.tsv`` goes with ``<dataset>/queries.jsonl``."""
    folder = posixpath.dirname(str(qrels_path).rstrip("/"))
    return posixpath.join(posixpath.dirname(folder), "queries.jsonl")


def iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line ending), blank lines skipped, UTF-8 checked per line."""
    try:
        handle = fsspec.open(str(path), "rb", compression="infer")
        with handle as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise BeirFormatError(f"{path} line {number}: not valid UTF-8 ({err.reason})") from err
                if line.strip():
                    yield number, line
    except FileNotFoundError as err:
        raise MissingInputError(f"{path}: no such file") from err


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) for each non-blank line; a line that is not a JSON object is an error."""
    for number, line in iter_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BeirFormatError(f"{path} line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise BeirFormatError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def id_field(record: dict[str, Any], key: str, where: str) -> str:
    """A non-empty string id; integers (``"_id": 7``) become their decimal string."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BeirFormatError(f"{where}: field {key!r} must be a string or integer id, got {value!r}")
    value = str(value)
    if not value:
        raise BeirFormatError(f"{where}: field {key!r} is empty")
    return value


def text_field(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise BeirFormatError(f"{where}: field {key!r} must be a string, got {value!r}")
    return value


def read_qrels(path: str) -> Qrels:
    """Parse a BEIR qrels TSV (see the module docstring for the accepted form)."""
    qrels = Qrels(path=str(path))
    for number, line in iter_lines(path):
        fields = line.split("\t")
        if number == 1 and tuple(f.strip().lower() for f in fields) == QRELS_HEADER:
            continue
        qid, did, score = _qrels_row(fields, f"{path} line {number}")
        docs = qrels.judgments.setdefault(qid, {})
        qrels.first_line.setdefault(qid, number)
        if did in docs:
            if docs[did] != score:
                raise BeirFormatError(f"{path} line {number}: ({qid}, {did}) judged again with score {score}, "
                                      f"earlier {docs[did]}")
            qrels.repeated += 1
        docs[did] = score
    if not qrels.judgments:
        raise BeirFormatError(f"{path}: no judgments (expected lines 'query-id<TAB>corpus-id<TAB>score')")
    return qrels


def _qrels_row(fields: list[str], where: str) -> tuple[str, str, int]:
    if len(fields) != 3:
        raise BeirFormatError(f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                              f"got {len(fields)}")
    qid, did, raw = fields
    if not qid or not did:
        raise BeirFormatError(f"{where}: empty {'query-id' if not qid else 'corpus-id'}")
    try:
        score = int(raw)
    except ValueError as err:
        raise BeirFormatError(f"{where}: score {raw!r} is not an integer") from err
    return qid, did, score


def read_queries(path: str, wanted: set[str] | None = None) -> dict[str, str]:
    """``{query_id: text}`` from a BEIR queries.jsonl, keeping only ``wanted`` ids when given."""
    queries: dict[str, str] = {}
    seen: dict[str, int] = {}
    for number, record in iter_jsonl(path):
        where = f"{path} line {number}"
        qid = id_field(record, "_id", where)
        if qid in seen:
            raise BeirFormatError(f"{where}: duplicate query id {qid!r} (first on line {seen[qid]})")
        seen[qid] = number
        text = text_field(record, "text", where)
        if wanted is None or qid in wanted:
            queries[qid] = text
    return queries


def load_eval_set(qrels_path: str, queries_path: str | None = None) -> EvalSet:
    """Qrels plus the text of every judged query; a judged query absent from the queries file is an error."""
    qrels = read_qrels(qrels_path)
    queries_path = queries_path or default_queries_path(qrels_path)
    queries = read_queries(queries_path, wanted=set(qrels.judgments))
    unknown = [qid for qid in qrels.judgments if qid not in queries]
    if unknown:
        first = unknown[0]
        more = f" (and {len(unknown) - 1} more unknown query ids)" if len(unknown) > 1 else ""
        raise BeirFormatError(f"{qrels_path} line {qrels.first_line[first]}: query id {first!r} is not in "
                              f"{queries_path}{more}")
    return EvalSet(qrels=qrels, queries=queries, queries_path=queries_path)


def save_metrics(folder: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` (sorted keys, indented) into a local folder."""
    path = Path(folder) / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_metrics(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / METRICS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise MissingInputError(f"{path}: no such file (is this an evaluate/ artifact?)") from err
