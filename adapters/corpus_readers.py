"""Corpus readers: a user's corpus files in, a stream of validated `Document`s out.

Formats (`FORMATS`): a BEIR folder or its `corpus.jsonl`; JSONL, CSV, TSV and Parquet with a `FieldMap` naming
the id/title/text fields; a folder of `.txt`/`.md` files (`textdir`); a folder written by Hugging Face
`datasets` `save_to_disk` (`hf`). Paths may be local or fsspec URLs; compressed JSONL/CSV/TSV (`.gz`, `.bz2`,
...) are decompressed on the fly.

Every problem in the input is a `CorpusError` whose message is one line naming the file, the line (JSONL:
the physical line) or row (CSV/TSV/Parquet/hf: the 1-based data row, header excluded) and what was expected.
Readers stream: memory holds one batch plus the ids seen so far, which duplicate detection needs; duplicates
are reported together at the end of the file.

Decisions:
- textdir: one document per file; id = the path relative to the folder with `/` separators (`sub/a.txt`),
  title = the file stem (`a`), text = the content. Files come in sorted relative-path order; hidden files and
  folders (a name starting with `.`) are skipped; the field mapping does not apply.
- TSV follows the IANA text/tab-separated-values convention: no quoting, a `"` is text like any other
  character, and fields cannot hold tabs or newlines. CSV uses the `csv` module's standard quoting, strictly:
  a quote left open is an error naming the line it was opened on, not a field that swallows the file.
- Ids are kept exactly as written (`"007"` stays `"007"`); integer ids (JSON numbers, integer Parquet
  columns) become their decimal string. Title and text are whitespace-normalised and otherwise untouched.
- A missing title is `""`. Empty text is yielded: whether it is an error is the ingest stage's decision.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from gplflow.adapters.errors import InputError

logger = logging.getLogger(__name__)

FORMATS = ("beir", "jsonl", "csv", "tsv", "parquet", "textdir", "hf")

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_FILE_FORMATS = frozenset({"jsonl", "csv", "tsv", "parquet"})
_FOLDER_FORMATS = frozenset({"textdir", "hf"})
_HF_MARKERS = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})
_HF_PREFERRED_SPLITS = ("corpus", "train")
_TEXT_SUFFIXES = (".txt", ".md")
_ACCEPTED = (
    "accepted: a .jsonl/.json, .csv, .tsv or .parquet file, or a folder (BEIR with corpus.jsonl, "
    f"datasets save_to_disk, or .txt/.md files); or name the format: {', '.join(FORMATS)}"
)
_BATCH_ROWS = 4096
_MAX_REPORTED = 5  # duplicate ids named in an error message
_CSV_FIELD_LIMIT = 2**31 - 1  # passages can exceed the csv module's 128 KiB default
RECORD_FORMATS = ("jsonl", "csv", "tsv", "parquet")  # the single-file tables `iter_records` reads

# (a file's column names, where for messages) -> the columns to read; raises CorpusError for a missing one
Select = Callable[[list[str], str], list[str]]


class CorpusError(InputError):
    """Bad corpus input; the message is one line naming the file, the line or row, and what was expected."""


@dataclass(frozen=True)
class FieldMap:
    """Which record fields (JSON keys, CSV/Parquet/hf columns) hold the id, title and text."""

    id: str = "_id"
    title: str | None = "title"
    text: str = "text"

    def __post_init__(self) -> None:
        if not self.id or not self.text or self.title == "":
            raise CorpusError(f"field names must be non-empty (title may be None), got {self}")


@dataclass(frozen=True)
class Document:
    """One corpus passage, the row the ingest stage writes (`doc_id`, `title`, `text`).

    `where` is where it was read (`corpus.jsonl line 7`, `docs.csv row 3`, a text file's path), for messages.
    """

    doc_id: str
    title: str
    text: str
    where: str = field(default="", compare=False, repr=False)


class _RecordError(Exception):
    """A problem in one record; `_validated` adds the file and line/row to make it a `CorpusError`."""


def normalize_whitespace(s: str) -> str:
    """Collapse each run of whitespace (newlines, tabs, NBSP, any Unicode space) to one space; strip ends."""
    return " ".join(s.split())


def detect_format(path: str | Path) -> str:
    """The format of `path`: from the extension for a file, from what the folder holds for a folder."""
    fs, fs_path = fsspec.core.url_to_fs(str(path))
    if fs.isdir(fs_path):
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(fs_path, detail=False)}
        if _beir_corpus_name(names) is not None:
            return "beir"
        return "hf" if names & _HF_MARKERS else "textdir"
    if not fs.exists(fs_path):
        raise CorpusError(f"{path}: no such file or folder")
    if infer_compression(fs_path) is not None:
        fs_path = posixpath.splitext(fs_path)[0]
    fmt = _SUFFIX_FORMATS.get(posixpath.splitext(fs_path)[1].lower())
    if fmt is None:
        raise CorpusError(f"{path}: cannot tell the corpus format from the file name; {_ACCEPTED}")
    return fmt


def iter_documents(
    path: str | Path, fmt: str | None = None, fields: FieldMap | None = None
) -> Iterator[Document]:
    """Stream the validated documents of the corpus at `path` (format detected when `fmt` is None).

    Path and format problems raise at the call; problems inside the data raise while iterating.
    """
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise CorpusError(f"unknown corpus format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    _check_path_kind(str(path), fmt)
    return _READERS[fmt](str(path), fields or FieldMap())


def iter_records(path: str | Path, fmt: str | None, select: Select) -> Iterator[tuple[int, dict[str, Any]]]:
    """Raw records of a JSONL, CSV, TSV or Parquet file as (line or row number, mapping), for tables other than
    a corpus (labelled pairs): the same decoding, quoting rules and one-line errors as the corpus readers.

    ``select`` checks a CSV/TSV header and picks the Parquet columns; JSONL records are checked by the caller
    (their keys may vary from line to line). Numbers are JSONL lines and CSV/TSV/Parquet data rows.
    """
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in RECORD_FORMATS:
        raise CorpusError(f"{path}: format {fmt!r} cannot be read here; expected a file: {', '.join(RECORD_FORMATS)}")
    path = str(path)
    _check_path_kind(path, fmt)
    if fmt == "jsonl":
        return _jsonl_records(path)
    if fmt == "parquet":
        return _parquet_records(path, select)
    dialect = {"delimiter": ","} if fmt == "csv" else {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return _delimited_records(path, select, dialect)


def _check_path_kind(path: str, fmt: str) -> None:
    fs, fs_path = fsspec.core.url_to_fs(path)
    is_dir = fs.isdir(fs_path)
    if not is_dir and not fs.exists(fs_path):
        raise CorpusError(f"{path}: no such file or folder")
    if is_dir and fmt in _FILE_FORMATS:
        raise CorpusError(f"{path}: is a folder, expected a {fmt} file")
    if not is_dir and fmt in _FOLDER_FORMATS:
        raise CorpusError(f"{path}: is a file, expected a folder for format {fmt!r}")


# --- one reader per format: (path, fields) -> Iterator[Document] -------------------------------------------


def _read_beir(path: str, fields: FieldMap) -> Iterator[Document]:
    """A BEIR folder, or its corpus.jsonl itself: JSONL with (by default) BEIR's `_id`/`title`/`text`.

    The folder's corpus may be compressed (`corpus.jsonl.gz`), as it may be when named directly.
    """
    fs, fs_path = fsspec.core.url_to_fs(path)
    if fs.isdir(fs_path):
        name = _beir_corpus_name({posixpath.basename(p.rstrip("/")) for p in fs.ls(fs_path, detail=False)})
        if name is None:
            raise CorpusError(f"{path}: not a BEIR folder, expected a corpus.jsonl in it (or corpus.jsonl.gz)")
        path = _join(path, name)
    return _read_jsonl(path, fields)


def _beir_corpus_name(names: set[str]) -> str | None:
    """`corpus.jsonl`, else the one compressed `corpus.jsonl.<gz|bz2|xz|...>` among a folder's file names."""
    if "corpus.jsonl" in names:
        return "corpus.jsonl"
    compressed = sorted(n for n in names if n.startswith("corpus.jsonl.") and infer_compression(n) is not None)
    return compressed[0] if compressed else None


def _read_jsonl(path: str, fields: FieldMap) -> Iterator[Document]:
    return _validated(_jsonl_records(path), path, "line", fields)


def _read_csv(path: str, fields: FieldMap) -> Iterator[Document]:
    return _validated(_delimited_records(path, _field_columns(fields), {"delimiter": ","}), path, "row", fields)


def _read_tsv(path: str, fields: FieldMap) -> Iterator[Document]:
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return _validated(_delimited_records(path, _field_columns(fields), dialect), path, "row", fields)


def _read_parquet(path: str, fields: FieldMap) -> Iterator[Document]:
    return _validated(_parquet_records(path, _field_columns(fields)), path, "row", fields)


def _read_hf(path: str, fields: FieldMap) -> Iterator[Document]:
    return _validated(_hf_records(path, fields), path, "row", fields)


def _read_textdir(path: str, fields: FieldMap) -> Iterator[Document]:
    """`fields` is unused: a text folder's id, title and text come from the files themselves."""
    fs, root = fsspec.core.url_to_fs(path)
    files = _text_files(fs, root)
    if not files:
        raise CorpusError(f"{path}: no .txt or .md files in this folder or below it")
    return _validated(_textdir_records(fs, path, files), path, "file", FieldMap())


_READERS: dict[str, Callable[[str, FieldMap], Iterator[Document]]] = {
    "beir": _read_beir,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "textdir": _read_textdir,
    "hf": _read_hf,
}


# --- raw records: (line or row number, mapping) ------------------------------------------------------------


def _jsonl_records(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with fsspec.open(path, "rb", compression="infer") as f:
        for lineno, line in enumerate(_decoded_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{path} line {lineno}: malformed JSON, expected one object per line "
                    f"({err.msg} at column {err.colno})"
                ) from err
            if not isinstance(record, dict):
                raise CorpusError(f"{path} line {lineno}: expected a JSON object, got {_type_name(record)}")
            yield lineno, record


def _delimited_records(
    path: str, select: Select, dialect: dict[str, Any]
) -> Iterator[tuple[int, dict[str, str]]]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with fsspec.open(path, "rb", compression="infer") as f:
        # strict: a quote left open must not swallow the rest of the file into one field
        reader = csv.reader(_decoded_lines(f, path), strict=True, **dialect)
        row_start = [1]  # the line where the row being read began
        try:
            yield from _delimited_rows(_tracked_rows(reader, row_start), path, select)
        except csv.Error as err:
            if reader.dialect.quoting != csv.QUOTE_NONE and "unexpected end of data" in str(err):
                line = _unclosed_quote_line(path, row_start[0], reader.dialect.delimiter)
                raise CorpusError(
                    f"{path} line {line}: quoted field never closed (its opening quote is on this line); "
                    'close it, or double a quote inside a quoted field ("")'
                ) from err
            raise CorpusError(f"{path} line {reader.line_num}: malformed delimited text ({err})") from err


def _tracked_rows(reader: Any, row_start: list[int]) -> Iterator[list[str]]:
    """The reader's rows; ``row_start[0]`` is kept at the line where the row being read begins."""
    while True:
        row_start[0] = reader.line_num + 1
        row = next(reader, None)
        if row is None:
            return
        yield row


def _unclosed_quote_line(path: str, start: int, delimiter: str) -> int:
    """The line of the quote that is still open at the end of the file (its row begins at line ``start``).

    Read again only on this error path: the csv module says the data ended, not where the field began.
    """
    opened, in_quote, field_start = start, False, True
    with fsspec.open(path, "rb", compression="infer") as f:
        for lineno, line in enumerate(_decoded_lines(f, path), 1):
            if lineno < start:
                continue
            i = 0
            while i < len(line):
                c = line[i]
                if in_quote:
                    if c == '"' and line[i + 1 : i + 2] == '"':
                        i += 1  # a doubled quote inside the field
                    elif c == '"':
                        in_quote = False
                elif c == '"' and field_start:
                    in_quote, opened = True, lineno
                field_start = not in_quote and c in (delimiter, "\r", "\n")
                i += 1
    return opened


def _delimited_rows(
    reader: Iterator[list[str]], path: str, select: Select
) -> Iterator[tuple[int, dict[str, str]]]:
    header = next(reader, None)
    if header is None:
        return
    select(header, f"{path} line 1")
    for row_no, row in enumerate(reader, 1):
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            raise CorpusError(
                f"{path} row {row_no}: expected {len(header)} fields as in the header, found {len(row)}"
            )
        yield row_no, dict(zip(header, row, strict=True))


def _parquet_records(path: str, select: Select) -> Iterator[tuple[int, dict[str, Any]]]:
    with fsspec.open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise CorpusError(f"{path}: not a readable Parquet file ({_first_line(err)})") from err
        columns = select(parquet.schema_arrow.names, path)
        batches = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns)
        yield from enumerate(itertools.chain.from_iterable(b.to_pylist() for b in batches), 1)


def _hf_records(path: str, fields: FieldMap) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets  # a heavy import, paid only when this format is used

    try:
        loaded = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise CorpusError(f"{path}: not a datasets save_to_disk folder ({_first_line(err)})") from err
    except (KeyError, TypeError) as err:  # a dataset_dict.json or dataset_info.json of the wrong shape
        detail = f"lacks the key {err}" if isinstance(err, KeyError) else f"has the wrong shape: {err}"
        raise CorpusError(f"{path}: not a datasets save_to_disk folder (its dataset_dict.json or "
                          f"dataset_info.json {detail})") from err
    dataset = _single_split(loaded, path)
    columns = _columns_to_read(dataset.column_names, fields, path)
    batches = dataset.select_columns(columns).with_format("arrow").iter(batch_size=_BATCH_ROWS)
    yield from enumerate(itertools.chain.from_iterable(b.to_pylist() for b in batches), 1)


def _single_split(loaded: Any, path: str) -> Any:
    """The one split of a DatasetDict (or the one named corpus/train among several); a Dataset as is."""
    if not isinstance(loaded, dict):
        return loaded
    splits = list(loaded)
    if len(splits) == 1:
        return loaded[splits[0]]
    preferred = [name for name in splits if name in _HF_PREFERRED_SPLITS]
    if len(preferred) == 1:
        logger.warning("%s: reading split %r, ignoring %s", path, preferred[0], _listing(splits))
        return loaded[preferred[0]]
    raise CorpusError(
        f"{path}: a DatasetDict with splits {_listing(splits)}; "
        f"expected one split, or exactly one named {' or '.join(map(repr, _HF_PREFERRED_SPLITS))}"
    )


def _text_files(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, str]]:
    """(relative posix path, filesystem path) of the .txt/.md files under `root`, sorted; hidden skipped."""
    found = []
    for file in fs.find(root):
        rel = posixpath.relpath(file, root)
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if not hidden and rel.lower().endswith(_TEXT_SUFFIXES):
            if fs.isdir(file):  # find() lists a link to a folder as a file
                raise CorpusError(f"{file}: a link to a folder, not a text file; links to folders are not "
                                  "followed: copy the folder in, or remove the link")
            found.append((rel, file))
    return sorted(found)


def _textdir_records(
    fs: fsspec.AbstractFileSystem, path: str, files: list[tuple[str, str]]
) -> Iterator[tuple[int, dict[str, str]]]:
    for number, (rel, file) in enumerate(files, 1):
        text = _decode(fs.cat_file(file), _join(path, rel), 1)
        stem = posixpath.splitext(posixpath.basename(rel))[0]
        yield number, {"_id": rel, "title": stem, "text": text}


# --- validation --------------------------------------------------------------------------------------------


def _validated(
    records: Iterable[tuple[int, Mapping[str, Any]]], source: str, unit: str, fields: FieldMap
) -> Iterator[Document]:
    """Documents from raw records; duplicate ids are skipped, then reported together at the end."""
    first_seen: dict[str, int] = {}
    duplicates: dict[str, tuple[int, int]] = {}  # the first few duplicate ids: (first, second) position
    n_duplicates = 0
    for pos, record in records:
        where = f"{source} {unit} {pos}" if unit != "file" else _join(source, str(record.get("_id")))
        try:
            doc = _to_document(record, fields, where)
        except _RecordError as err:
            raise CorpusError(f"{where}: {err}") from err
        first = first_seen.setdefault(doc.doc_id, pos)
        if first == pos:
            yield doc
            continue
        n_duplicates += 1
        if len(duplicates) < _MAX_REPORTED:
            duplicates.setdefault(doc.doc_id, (first, pos))
    if duplicates:
        raise CorpusError(_duplicates_message(source, unit, duplicates, n_duplicates))
    if not first_seen:
        raise CorpusError(f"{source}: no documents found, expected at least one")


def _duplicates_message(source: str, unit: str, duplicates: dict[str, tuple[int, int]], total: int) -> str:
    listed = ", ".join(f"{_short(i)} ({unit}s {a} and {b})" for i, (a, b) in duplicates.items())
    return f"{source}: duplicate doc ids: {listed}; {total} duplicate {unit}(s) in all, ids must be unique"


def _to_document(record: Mapping[str, Any], fields: FieldMap, where: str = "") -> Document:
    title = _string_field(record, fields.title, required=False) if fields.title is not None else ""
    text = _string_field(record, fields.text, required=True)
    return Document(_id_field(record, fields.id), normalize_whitespace(title), normalize_whitespace(text), where)


def _id_field(record: Mapping[str, Any], key: str) -> str:
    if key not in record or record[key] is None:
        raise _RecordError(f"missing field {key!r} (the doc id)")
    value = record[key]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _RecordError(f"field {key!r} (the doc id) must be a string or integer, got {_type_name(value)}")
    if not value.strip():
        raise _RecordError(f"empty doc id in field {key!r}")
    return value


def _string_field(record: Mapping[str, Any], key: str, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if not required:
            return ""
        raise _RecordError(f"missing field {key!r}" if key not in record else f"field {key!r} is null")
    if not isinstance(value, str):
        raise _RecordError(f"field {key!r} must be a string, got {_type_name(value)}")
    return value


def _field_columns(fields: FieldMap) -> Select:
    return lambda names, where: _columns_to_read(names, fields, where)


def _columns_to_read(names: list[str], fields: FieldMap, where: str) -> list[str]:
    """The id, text and (when present) title columns; a missing id or text column is an error."""
    for key, role in ((fields.id, "id"), (fields.text, "text")):
        if key not in names:
            raise CorpusError(f"{where}: no {role} column {key!r} (columns: {_listing(names)})")
    columns = [fields.id, fields.text]
    if fields.title is not None:
        if fields.title in names:
            columns.append(fields.title)
        else:
            logger.warning("%s: no title column %r, titles will be empty", where, fields.title)
    return columns


# --- small helpers -----------------------------------------------------------------------------------------


def _decoded_lines(lines: Iterable[bytes], source: str) -> Iterator[str]:
    for lineno, raw in enumerate(lines, 1):
        yield _decode(raw, source, lineno)


def _decode(raw: bytes, source: str, first_line: int) -> str:
    """UTF-8 text of `raw` (which starts at line `first_line`), without a leading BOM on the file's line 1."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - raw.rfind(b"\n", 0, err.start)
        raise CorpusError(
            f"{source} line {line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte column {column})"
        ) from err
    return text.removeprefix("\ufeff") if first_line == 1 else text


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def _type_name(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(_short(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
