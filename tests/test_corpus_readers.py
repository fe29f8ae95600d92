"""Corpus readers: the same documents in every format, detection, and one-line errors for bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gplflow.adapters.corpus_readers import (
    FORMATS,
    CorpusError,
    Document,
    FieldMap,
    detect_format,
    iter_documents,
    normalize_whitespace,
)

# Ids and titles are what a text folder yields (relative path, file stem), so every format can match it.
RAW = [
    ("a.txt", "a", "Café  au lait,\u00a0served hot. "),
    ("b.md", "b", '"Quoted" start, then a comma'),
    ("notes/c.txt", "c", 'He said "hi", then left'),
    ("notes/deep/d.md", "d", "Ünïcödé — ok 東京"),
    ("z.txt", "z", "  leading and   trailing  "),
]
EXPECTED = [
    Document("a.txt", "a", "Café au lait, served hot."),
    Document("b.md", "b", '"Quoted" start, then a comma'),
    Document("notes/c.txt", "c", 'He said "hi", then left'),
    Document("notes/deep/d.md", "d", "Ünïcödé — ok 東京"),
    Document("z.txt", "z", "leading and trailing"),
]
CUSTOM = FieldMap(id="id", title="headline", text="body")


def write_jsonl(path: Path, records: list[dict], blank_line_after: int | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if blank_line_after is not None:
        lines.insert(blank_line_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_beir(tmp: Path) -> Path:
    folder = tmp / "scifact"
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", [{"_id": i, "title": t, "text": x} for i, t, x in RAW])
    write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "a query"}])
    return folder


def make_jsonl(tmp: Path) -> Path:
    records = [{"id": i, "headline": t, "body": x, "extra": 1} for i, t, x in RAW]
    return write_jsonl(tmp / "docs.jsonl", records, blank_line_after=2)


def make_csv(tmp: Path) -> Path:
    path = tmp / "docs.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["_id", "title", "text"])
        writer.writerows(RAW)
    return path


def make_tsv(tmp: Path) -> Path:
    # Written by hand, unquoted: a TSV's quotes and commas are plain text.
    rows = ["id\theadline\tbody", *("\t".join(r) for r in RAW)]
    path = tmp / "docs.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def make_parquet(tmp: Path) -> Path:
    path = tmp / "docs.parquet"
    table = pa.table({k: [r[n] for r in RAW] for n, k in enumerate(["_id", "title", "text"])})
    pq.write_table(table, path, row_group_size=2)
    return path


def make_textdir(tmp: Path) -> Path:
    folder = tmp / "texts"
    for rel, _, text in RAW:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text.replace("  ", "\n\t") + "\n", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "skip.txt").write_text("not a document", encoding="utf-8")
    return folder


def make_hf(tmp: Path) -> Path:
    folder = tmp / "hf"
    columns = {k: [r[n] for r in RAW] for n, k in enumerate(["id", "headline", "body"])}
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder


CASES = [
    (make_beir, "beir", None),
    (make_jsonl, "jsonl", CUSTOM),
    (make_csv, "csv", None),
    (make_tsv, "tsv", CUSTOM),
    (make_parquet, "parquet", None),
    (make_textdir, "textdir", None),
    (make_hf, "hf", CUSTOM),
]


@pytest.mark.parametrize(("make", "fmt", "fields"), CASES, ids=[c[1] for c in CASES])
def test_every_format_yields_the_same_documents(tmp_path, make, fmt, fields):
    path = make(tmp_path)
    assert detect_format(path) == fmt
    assert list(iter_documents(path, fields=fields)) == EXPECTED
    assert list(iter_documents(str(path), fmt=fmt, fields=fields)) == EXPECTED


def test_all_formats_are_covered():
    assert sorted(c[1] for c in CASES) == sorted(FORMATS)


def test_beir_corpus_file_itself_and_gzip(tmp_path):
    corpus = make_beir(tmp_path) / "corpus.jsonl"
    assert detect_format(corpus) == "jsonl"
    assert list(iter_documents(corpus, fmt="beir")) == EXPECTED
    packed = tmp_path / "corpus.jsonl.gz"
    packed.write_bytes(gzip.compress(corpus.read_bytes()))
    assert detect_format(packed) == "jsonl"
    assert list(iter_documents(packed)) == EXPECTED


def test_file_url(tmp_path):
    path = make_csv(tmp_path)
    assert list(iter_documents(f"file://{path}")) == EXPECTED


def test_hf_dataset_dict_splits(tmp_path):
    ds = datasets.Dataset.from_dict({"_id": ["d1"], "text": ["t"]})
    datasets.DatasetDict({"only": ds}).save_to_disk(str(tmp_path / "one"))
    assert [d.doc_id for d in iter_documents(tmp_path / "one")] == ["d1"]
    queries = datasets.Dataset.from_dict({"_id": ["q1"], "text": ["q"]})
    datasets.DatasetDict({"corpus": ds, "queries": queries}).save_to_disk(str(tmp_path / "beir"))
    assert [d.doc_id for d in iter_documents(tmp_path / "beir")] == ["d1"]
    datasets.DatasetDict({"a": ds, "b": queries}).save_to_disk(str(tmp_path / "two"))
    message = error_of(tmp_path / "two")
    assert "two" in message and "'a', 'b'" in message


def test_normalize_whitespace():
    assert normalize_whitespace("  a\n\nb\t\tc   d\u00a0e\r\n") == "a b c d e"
    assert normalize_whitespace("café – naïve 東京") == "café – naïve 東京"
    assert normalize_whitespace(" \n\t ") == ""


def test_ids_stay_strings_exactly(tmp_path):
    (tmp_path / "ids.csv").write_text("_id,text\n007,x\n7,y\n", encoding="utf-8")
    assert [d.doc_id for d in iter_documents(tmp_path / "ids.csv")] == ["007", "7"]
    write_jsonl(tmp_path / "ids.jsonl", [{"_id": "007", "text": "x"}, {"_id": 8, "text": "y"}])
    assert [d.doc_id for d in iter_documents(tmp_path / "ids.jsonl")] == ["007", "8"]
    pq.write_table(pa.table({"_id": [7, 8], "text": ["x", "y"]}), tmp_path / "ids.parquet")
    assert [d.doc_id for d in iter_documents(tmp_path / "ids.parquet")] == ["7", "8"]


def test_missing_title_empty_text_and_bom_are_accepted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"_id": "a", "text": "  \\n "}\n{"_id": "b", "title": null, "text": "x"}\n'
    )
    assert list(iter_documents(path)) == [Document("a", "", ""), Document("b", "", "x")]
    (tmp_path / "notitle.csv").write_text("_id,text\nd1,hello\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "notitle.csv")) == [Document("d1", "", "hello")]


def test_csv_quoted_newlines_and_long_fields(tmp_path):
    long_text = "word " * 40_000  # 200k characters: beyond the csv module's default field limit
    path = tmp_path / "long.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["_id", "text"], ["d1", "two\nlines"], ["d2", long_text]])
    docs = list(iter_documents(path))
    assert docs[0].text == "two lines"
    assert docs[1].text == long_text.strip()


# --- errors: one line, naming the file and the exact line or row -------------------------------------------


def error_of(path, **kwargs) -> str:
    with pytest.raises(CorpusError) as info:
        list(iter_documents(path, **kwargs))
    message = str(info.value)
    assert "\n" not in message
    return message


# (file content, the message after the file name: exact up to its end)
JSONL_ERRORS = [
    ('{"_id": "a", "text": "x"}\n\n{"_id": "b", "text": \n', " line 3: malformed JSON, expected one object"),
    ('{"_id": "a", "text": "x"}\n[1, 2]\n', " line 2: expected a JSON object, got array"),
    ('{"_id": "a", "text": "x"}\n"just a string"\n', " line 2: expected a JSON object, got string"),
    ('{"_id": "a", "text": "x"}\n{"text": "y"}\n', " line 2: missing field '_id' (the doc id)"),
    ('{"_id": "a", "text": "x"}\n{"_id": " ", "text": "y"}\n', " line 2: empty doc id in field '_id'"),
    ('{"_id": "a", "text": "x"}\n\n\n{"_id": "b"}\n', " line 4: missing field 'text'"),
    (
        '{"_id": "a", "text": "x"}\n{"_id": "b", "text": 5}\n',
        " line 2: field 'text' must be a string, got number",
    ),
    ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": null}\n', " line 2: field 'text' is null"),
    (
        '{"_id": 1.5, "text": "x"}\n',
        " line 1: field '_id' (the doc id) must be a string or integer, got number",
    ),
    ('{"_id": "a", "title": ["t"], "text": "x"}\n', " line 1: field 'title' must be a string, got array"),
    (
        '{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n{"_id": "a", "text": "z"}\n',
        ": duplicate doc ids: 'a' (lines 1 and 3); 1 duplicate line(s) in all, ids must be unique",
    ),
    ("", ": no documents found, expected at least one"),
    ("\n\n", ": no documents found, expected at least one"),
]


@pytest.mark.parametrize(("content", "expected"), JSONL_ERRORS)
def test_jsonl_errors(tmp_path, content, expected):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content, encoding="utf-8")
    message = error_of(path)
    assert message.startswith(f"{path}{expected}")
    if "malformed" not in expected:
        assert message == f"{path}{expected}"


def test_invalid_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "caf\xe9"}\n')
    assert error_of(path) == f"{path} line 2: not valid UTF-8 (byte 0xe9 at byte column 26)"
    bad_csv = tmp_path / "docs.csv"
    bad_csv.write_bytes(b"_id,text\nd1,ok\nd2,ok\nd3,\xff\n")
    assert error_of(bad_csv) == f"{bad_csv} line 4: not valid UTF-8 (byte 0xff at byte column 4)"
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"fine\nstill fine\nbad \xc3(\n")
    assert error_of(folder) == f"{folder}/a.txt line 3: not valid UTF-8 (byte 0xc3 at byte column 5)"


def test_duplicate_ids_are_all_reported_at_the_end(tmp_path):
    ids = ["d1", "d2", "d3", "d4", "d5", "d6", "d3", "d8", "d9", "d10", "d11", "d9", "d3"]
    path = tmp_path / "corpus.csv"
    path.write_text("_id,text\n" + "".join(f"{i},text {n}\n" for n, i in enumerate(ids)), encoding="utf-8")
    assert error_of(path) == (
        f"{path}: duplicate doc ids: 'd3' (rows 3 and 7), 'd9' (rows 9 and 12); "
        "3 duplicate row(s) in all, ids must be unique"
    )


def test_delimited_errors(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("_id,body\nd1,x\n", encoding="utf-8")
    assert error_of(path) == f"{path} line 1: no text column 'text' (columns: '_id', 'body')"
    path.write_text("_id,text\nd1,x\nd2,y,extra\n", encoding="utf-8")
    assert error_of(path) == f"{path} row 2: expected 2 fields as in the header, found 3"
    path.write_text("_id,text\nd1,x\n,y\n", encoding="utf-8")
    assert error_of(path) == f"{path} row 2: empty doc id in field '_id'"
    path.write_text("_id,text\n", encoding="utf-8")
    assert error_of(path) == f"{path}: no documents found, expected at least one"
    tsv = tmp_path / "docs.tsv"
    tsv.write_text("_id\ttext\nd1\tone\nd2\ttwo\twith a tab\n", encoding="utf-8")
    assert error_of(tsv) == f"{tsv} row 2: expected 2 fields as in the header, found 3"


def test_parquet_errors(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"_id": ["a", "b", "c", "d", "e"], "text": ["1", "2", "3", None, "5"]})
    pq.write_table(table, path, row_group_size=2)
    assert error_of(path) == f"{path} row 4: field 'text' is null"
    pq.write_table(pa.table({"_id": ["a"], "body": ["x"]}), path)
    assert error_of(path) == f"{path}: no text column 'text' (columns: '_id', 'body')"
    pq.write_table(pa.table({"_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), path)
    assert error_of(path) == f"{path}: no documents found, expected at least one"
    path.write_bytes(b"not parquet at all")
    assert error_of(path).startswith(f"{path}: not a readable Parquet file")


def test_hf_errors(tmp_path):
    folder = tmp_path / "hf"
    datasets.Dataset.from_dict({"_id": ["a", "b", "a"], "text": ["x", "y", "z"]}).save_to_disk(str(folder))
    assert error_of(folder).endswith(
        "duplicate doc ids: 'a' (rows 1 and 3); 1 duplicate row(s) in all, ids must be unique"
    )
    assert error_of(folder, fields=CUSTOM) == f"{folder}: no id column 'id' (columns: '_id', 'text')"


def test_path_and_format_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CorpusError, match=r"nope\.jsonl: no such file or folder"):
        iter_documents(missing)  # raised at the call, before iterating
    with pytest.raises(CorpusError, match=r"nope\.jsonl: no such file or folder"):
        detect_format(missing)
    odd = tmp_path / "corpus.xml"
    odd.write_text("<docs/>", encoding="utf-8")
    with pytest.raises(
        CorpusError,
        match=r"corpus\.xml: cannot tell the corpus format from the file name; accepted: .*textdir, hf$",
    ):
        detect_format(odd)
    with pytest.raises(CorpusError, match=r"unknown corpus format 'xml'; expected one of: beir, jsonl"):
        iter_documents(odd, fmt="xml")
    with pytest.raises(CorpusError, match="is a folder, expected a csv file"):
        iter_documents(tmp_path, fmt="csv")
    with pytest.raises(CorpusError, match="is a file, expected a folder for format 'textdir'"):
        iter_documents(odd, fmt="textdir")
    with pytest.raises(CorpusError, match=r"not a BEIR folder, expected a corpus\.jsonl in it"):
        iter_documents(tmp_path, fmt="beir")
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") == "textdir"
    with pytest.raises(CorpusError, match=r"empty: no \.txt or \.md files"):
        iter_documents(tmp_path / "empty")


def test_field_map_rejects_empty_names():
    with pytest.raises(ValueError, match="non-empty"):
        FieldMap(text="")
    assert FieldMap(title=None).title is None
