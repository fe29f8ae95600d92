"""`gplflow ingest`: every format yields the same corpus/ rows; bad input exits non-zero and leaves nothing."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from gplflow.adapters.store import ArtifactStore
from gplflow.flows.cli import app

# ids equal the text folder's relative paths and titles its file stems, so every format can agree.
DOCS = [
    ("a.txt", "a", "Varroa mites feed on the fat body of developing bees."),
    ("b.txt", "b", "A queen   excluder keeps the queen\nout of the honey supers."),
    ("c.txt", "c", 'Oxalic acid, applied in winter, reaches mites on "broodless" colonies.'),
    ("d.txt", "d", "Swarm cells hang from the bottom edge of the frames."),
    ("e.txt", "e", "Café owners in cities sometimes keep hives on their roofs."),
]
EXPECTED = [(i, t, " ".join(x.split())) for i, t, x in DOCS]
runner = CliRunner()


def _write_all_formats(root: Path) -> dict[str, Path]:
    beir = root / "beir"
    beir.mkdir()
    with (beir / "corpus.jsonl").open("w") as fh:
        for doc_id, title, text in DOCS:
            fh.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    frame = pd.DataFrame(DOCS, columns=["id", "title", "body"])
    frame.to_csv(root / "c.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    tsv = frame.assign(body=frame.body.map(lambda s: " ".join(s.split())))  # TSV fields hold no newlines
    tsv.to_csv(root / "c.tsv", sep="\t", index=False, quoting=csv.QUOTE_NONE, escapechar=None)
    frame.to_parquet(root / "c.parquet")
    text_dir = root / "texts"
    text_dir.mkdir()
    for doc_id, _, text in DOCS:
        (text_dir / doc_id).write_text(text, encoding="utf-8")
    import datasets

    datasets.Dataset.from_pandas(frame).save_to_disk(str(root / "hf"))
    return {"beir": beir, "csv": root / "c.csv", "tsv": root / "c.tsv", "parquet": root / "c.parquet",
            "textdir": text_dir, "hf": root / "hf"}


def _ingest(src: Path, run_dir: Path, *extra: str):
    return runner.invoke(app, ["ingest", str(src), "--run-dir", str(run_dir), *extra])


def test_every_format_gives_the_same_rows(tmp_path: Path) -> None:
    sources = _write_all_formats(tmp_path)
    mapping = ["--id-field", "id", "--text-field", "body"]
    for fmt, src in sources.items():
        run_dir = tmp_path / f"run-{fmt}"
        result = _ingest(src, run_dir, *([] if fmt in ("beir", "textdir") else mapping))
        assert result.exit_code == 0, (fmt, result.output)
        assert "5 documents" in result.output
        artifact = ArtifactStore(run_dir).require("corpus")
        rows = [(r["doc_id"], r["title"], r["text"]) for r in artifact.read_table().to_pylist()]
        assert rows == EXPECTED, fmt
        manifest = json.loads((run_dir / "corpus" / "manifest.json").read_text())
        for name, meta in manifest["files"].items():
            assert hashlib.sha256((run_dir / "corpus" / name).read_bytes()).hexdigest() == meta["sha256"]
        assert manifest["rows"] == 5 and manifest["format"] == fmt


def test_jsonl_with_field_mapping(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"pid": i, "head": t, "body": x}) for i, t, x in DOCS) + "\n")
    result = _ingest(src, tmp_path / "run", "--id-field", "pid", "--title-field", "head", "--text-field", "body")
    assert result.exit_code == 0, result.output
    rows = ArtifactStore(tmp_path / "run").require("corpus").read_table().to_pylist()
    assert [(r["doc_id"], r["title"], r["text"]) for r in rows] == EXPECTED


BAD_INPUTS = {
    "malformed json": ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n', "docs.jsonl line 2"),
    "missing text": ('{"_id": "a", "text": "x"}\n{"_id": "b"}\n', "docs.jsonl line 2"),
    "empty id": ('{"_id": "a", "text": "x"}\n{"_id": "", "text": "y"}\n', "docs.jsonl line 2"),
    "duplicate ids": ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "y"}\n{"_id": "a", "text": "z"}\n',
                      "'a'"),
    "empty corpus": ("\n\n", "docs.jsonl"),
    "empty text": ('{"_id": "a", "text": "x"}\n{"_id": "b", "text": "   "}\n', "'b'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_cleanly(tmp_path: Path, case: str) -> None:
    content, expected = BAD_INPUTS[case]
    src = tmp_path / "docs.jsonl"
    src.write_text(content)
    result = _ingest(src, tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and expected in result.output
    assert len([line for line in result.output.strip().splitlines() if line.strip()]) <= 3
    assert not (tmp_path / "run" / "corpus").exists()
    assert not list((tmp_path / "run").glob(".corpus*"))  # no temporary folder left either


def test_undecodable_bytes(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "bad \xff byte"}\n')
    result = _ingest(src, tmp_path / "run")
    assert result.exit_code == 2 and "docs.jsonl line 2" in result.output
    assert not (tmp_path / "run" / "corpus").exists()


def test_missing_path_and_unknown_format(tmp_path: Path) -> None:
    result = _ingest(tmp_path / "nope.jsonl", tmp_path / "run")
    assert result.exit_code == 2 and "nope.jsonl" in result.output
    src = tmp_path / "docs.xml"
    src.write_text("<doc/>")
    result = _ingest(src, tmp_path / "run")
    assert result.exit_code == 2 and "docs.xml" in result.output
    result = _ingest(tmp_path, tmp_path / "run", "--format", "xml")
    assert result.exit_code == 2 and "xml" in result.output
    assert not (tmp_path / "run" / "corpus").exists()


def test_skip_empty_drops_and_counts(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": " \\t "}\n{"_id": "c", "text": "z"}\n')
    result = _ingest(src, tmp_path / "run", "--skip-empty")
    assert result.exit_code == 0, result.output
    artifact = ArtifactStore(tmp_path / "run").require("corpus")
    assert artifact.read_table().column("doc_id").to_pylist() == ["a", "c"]
    assert artifact.counters == {"empty_text": 1}


def test_reingest_same_content_is_reused(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text('{"_id": "a", "text": "x"}\n')
    assert _ingest(src, tmp_path / "run").exit_code == 0
    first = json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text())
    assert _ingest(src, tmp_path / "run").exit_code == 0
    again = json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text())
    assert again["timings"] == first["timings"]  # not rewritten
    src.write_text('{"_id": "a", "text": "y"}\n')
    assert _ingest(src, tmp_path / "run").exit_code == 0
    changed = ArtifactStore(tmp_path / "run").require("corpus")
    assert changed.fingerprint != first["fingerprint"]
    assert changed.read_table().column("text").to_pylist() == ["y"]


def test_cli_ingest_then_a_config_naming_the_same_folder_reuses_the_corpus(tmp_path: Path, monkeypatch) -> None:
    """The CLI takes the path as typed ('docs'), a config makes it absolute: the same corpus all the same."""
    from gplflow.flows.config import PipelineConfig
    from gplflow.tasks.base import reuse
    from gplflow.tasks.ingest import IngestInputs, ingest_fingerprint, run_ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, _, text in DOCS:
        (docs / name).write_text(text, encoding="utf-8")
    (tmp_path / "my.yaml").write_text("name: mine\ncorpus:\n  path: docs\n")
    monkeypatch.chdir(tmp_path)
    assert _ingest(Path("docs"), Path("runs/mine")).exit_code == 0
    store = ArtifactStore("runs/mine")
    published = store.read_manifest("corpus")
    cfg = PipelineConfig.load(tmp_path / "my.yaml").corpus
    assert cfg.path == str(docs)  # absolute, unlike the CLI's
    assert reuse(store, "corpus", ingest_fingerprint(cfg)) is not None
    again = run_ingest(IngestInputs(run_dir="runs/mine", cfg=cfg))
    assert again.manifest["timings"] == published["timings"]  # not ingested again
    assert published["config"]["format"] == "textdir"  # what was detected is what the fingerprint holds


def test_a_settings_change_is_logged_once_in_words(tmp_path: Path, caplog) -> None:
    from gplflow.tasks.ingest import IngestConfig, IngestInputs, run_ingest

    src = tmp_path / "docs.jsonl"
    src.write_text('{"_id": "a", "text": "bees", "body": "wax"}\n')
    run_dir = str(tmp_path / "run")
    run_ingest(IngestInputs(run_dir=run_dir, cfg=IngestConfig(path=str(src))))
    with caplog.at_level("INFO", logger="gplflow"):
        again = run_ingest(IngestInputs(run_dir=run_dir, cfg=IngestConfig(path=str(src), text_field="body")))
    assert again.read_table().column("text").to_pylist() == ["wax"]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert [m for m in lines if m.startswith("corpus: ")] == ["corpus: settings changed (text_field), recomputing"]
    assert not [m for m in lines if "fingerprint" in m and "!=" in m]  # no raw fingerprint mismatch dump
