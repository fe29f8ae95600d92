"""Bad input and misuse through the CLI: each case is an input, the exit code, words the one-line message must
hold, and what must not be left half-written (issue 11)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gplflow.flows.cli import app

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # writes the input under tmp_path, returns the gplflow arguments
    exit_code: int
    words: tuple[str, ...]  # in the message ("{tmp}" is replaced by tmp_path)
    absent: tuple[str, ...] = field(default=())  # paths under tmp_path that must not exist afterwards


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _ingest(src: Path, tmp: Path) -> list[str]:
    return ["ingest", str(src), "--run-dir", str(tmp / "run")]


# --- 1. CSV: a quote left open is an error naming the line it was opened on -------------------------------

def _csv_unclosed(tmp: Path) -> list[str]:
    text = '_id,text\nd1,"fine, quoted"\nd2,"opened here\nd3,swallowed\nd4,swallowed too\n'
    return _ingest(_write(tmp / "docs.csv", text), tmp)


def _csv_unclosed_after_multiline(tmp: Path) -> list[str]:
    text = '_id,text\nd1,"two\nlines"\n\nd2,"a ""quote"" inside"\nd3,"never\nclosed\n'
    return _ingest(_write(tmp / "docs.csv", text), tmp)


def _csv_unclosed_header(tmp: Path) -> list[str]:
    return _ingest(_write(tmp / "docs.csv", '_id,"text\nd1,x\n'), tmp)


def _csv_text_after_quote(tmp: Path) -> list[str]:
    return _ingest(_write(tmp / "docs.csv", '_id,text\nd1,"x"y\n'), tmp)


CASES = [
    Case("csv-unclosed-quote", _csv_unclosed, 2, ("{tmp}/docs.csv line 3", "quoted field never closed"),
         ("run/corpus",)),
    Case("csv-unclosed-after-multiline", _csv_unclosed_after_multiline, 2,
         ("{tmp}/docs.csv line 6", "quoted field never closed"), ("run/corpus",)),
    Case("csv-unclosed-header", _csv_unclosed_header, 2, ("{tmp}/docs.csv line 1", "never closed"),
         ("run/corpus",)),
    Case("csv-text-after-quote", _csv_text_after_quote, 2, ("{tmp}/docs.csv line 2", "malformed"),
         ("run/corpus",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_case(case: Case, tmp_path: Path) -> None:
    args = case.setup(tmp_path)
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == case.exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    if case.exit_code == 2:
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in case.words:
        assert word.replace("{tmp}", str(tmp_path)) in result.output, (word, result.output)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
