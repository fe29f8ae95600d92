"""Bad input and misuse through the CLI: each case is an input, the exit code, words the one-line message must
hold, and what must not be left half-written (issue 11)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest
from artifact_rows import write_artifact
from typer.testing import CliRunner

from gplflow.adapters import gpl_format
from gplflow.adapters.store import ArtifactStore
from gplflow.flows.cli import app

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # writes the input under tmp_path, returns the gplflow arguments
    exit_code: int
    words: tuple[str, ...]  # in the message ("{tmp}" is replaced by tmp_path)
    absent: tuple[str, ...] = field(default=())  # paths under tmp_path that must not exist afterwards
    check: Callable[[Path], None] | None = None  # anything else that must hold afterwards


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _ingest(src: Path, tmp: Path) -> list[str]:
    # no title field: a CSV without one would log a warning line beside the one error line this module checks
    return ["ingest", str(src), "--run-dir", str(tmp / "run"), "--title-field", ""]


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


# --- 2. export: never over a user's files, never half-written ------------------------------------------------

def _run_with(tmp: Path, query_id: str = "q1") -> Path:
    """A run directory with a corpus and queries (the artifacts export reads)."""
    store = ArtifactStore(tmp / "run")
    write_artifact(store, "corpus", [("d1", "", "bees"), ("d2", "", "wasps")])
    write_artifact(store, "queries", [(query_id, "d1", "what are bees")])
    return tmp / "run"


def _export(tmp: Path, *extra: str, query_id: str = "q1") -> list[str]:
    return ["export", str(_run_with(tmp, query_id)), "--out", str(tmp / "out"), *extra]


def _export_into_users_folder(tmp: Path) -> list[str]:
    _write(tmp / "out" / "notes.txt", "mine")
    return _export(tmp)


def _export_force_over_old_export(tmp: Path) -> list[str]:
    _write(tmp / "out" / "stale-queries.jsonl", "{}")
    _write(tmp / "out" / "corpus.jsonl", "old")
    return _export(tmp, "--force")


def _export_into_empty_folder(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    return _export(tmp)


def _export_onto_file(tmp: Path) -> list[str]:
    _write(tmp / "out", "a file")
    return _export(tmp, "--force")


def _export_tab_in_id(tmp: Path) -> list[str]:
    return _export(tmp, query_id="q\t1")


def _users_file_kept(tmp: Path) -> None:
    assert [p.name for p in (tmp / "out").iterdir()] == ["notes.txt"]
    assert (tmp / "out" / "notes.txt").read_text() == "mine"


def _only_the_new_export(tmp: Path) -> None:
    assert {p.name for p in (tmp / "out").iterdir()} == {"corpus.jsonl", "qgen-queries.jsonl", "qgen-qrels"}
    assert (tmp / "out" / "corpus.jsonl").read_text().count("\n") == 2
    assert sorted(p.name for p in tmp.iterdir()) == ["out", "run"]  # no temporary folder left beside it


def _file_kept(tmp: Path) -> None:
    assert (tmp / "out").read_text() == "a file"
    assert sorted(p.name for p in tmp.iterdir()) == ["out", "run"]


def _nothing_beside_run(tmp: Path) -> None:
    assert sorted(p.name for p in tmp.iterdir()) == ["run"]


# --- 3. one run per run directory ------------------------------------------------------------------------------

def _run_on_locked_dir(tmp: Path) -> list[str]:
    _write(tmp / "docs.jsonl", '{"_id": "a", "text": "bees"}\n')
    config = _write(tmp / "c.yaml", "name: t\nprofile: tiny\ncorpus:\n  path: docs.jsonl\n")
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": STARTED, "token": "x"}  # alive
    _write(tmp / "run" / ".lock", json.dumps(holder))
    return ["run", str(config), "--run-dir", str(tmp / "run")]


STARTED = time.time()


def _lock_kept(tmp: Path) -> None:
    assert [p.name for p in (tmp / "run").iterdir()] == [".lock"]
    assert json.loads((tmp / "run" / ".lock").read_text())["token"] == "x"


# --- 5. garbage in the run directory: status says corrupted, a rerun recomputes -----------------------------

def _status_with(rel: str, text: str, plan: str | None = None) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        _run_with(tmp)
        if plan is not None:
            _write(tmp / "run" / ".triples.shards-ab12" / "plan.json", plan)
        _write(tmp / "run" / rel, text)
        return ["status", str(tmp / "run")]
    return setup


GOOD_PLAN = '{"n_shards": 2, "shard_size": 1, "stage": "triples", "fingerprint": "ab12"}'

# --- 6. messages that say what is wrong ---------------------------------------------------------------------

def _status_of_missing_folder(tmp: Path) -> list[str]:
    return ["status", str(tmp / "nope")]


def _status_of_a_file(tmp: Path) -> list[str]:
    return ["status", str(_write(tmp / "run.txt", "x"))]


def _beir_gz_only(tmp: Path) -> list[str]:
    (tmp / "beir").mkdir()
    with gzip.open(tmp / "beir" / "corpus.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write('{"_id": "a", "title": "", "text": "bees"}\n{"_id": "b", "title": "", "text": "wasps"}\n')
    return _ingest(tmp / "beir", tmp)


def _empty_text_after_blank_lines(tmp: Path) -> list[str]:
    text = '\n\n{"_id": "a", "text": "bees"}\n\n{"_id": "b", "text": "  "}\n'
    return _ingest(_write(tmp / "docs.jsonl", text), tmp)


def _empty_text_in_a_text_folder(tmp: Path) -> list[str]:
    _write(tmp / "texts" / "a.txt", "bees")
    _write(tmp / "texts" / "sub" / "b.txt", "\n \n")
    return _ingest(tmp / "texts", tmp)


# --- 7. the whole run validated before its first stage (and before Prefect starts) --------------------------

def _run_config(text: str = "", *extra: str) -> Callable[[Path], list[str]]:
    """``gplflow run`` of a tiny config (plus ``text``) with ``extra`` arguments ("{tmp}" is tmp_path)."""
    def setup(tmp: Path) -> list[str]:
        _write(tmp / "docs.jsonl", '{"_id": "a", "text": "bees"}\n{"_id": "b", "text": "wasps"}\n')
        config = _write(tmp / "c.yaml", "name: t\nprofile: tiny\ncorpus:\n  path: docs.jsonl\n"
                        + text.replace("{tmp}", str(tmp)))
        return ["run", str(config), "--run-dir", str(tmp / "run"), *(e.replace("{tmp}", str(tmp)) for e in extra)]
    return setup


def _with_files(files: dict[str, str], setup: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    """Write ``files`` (relative path -> text; a text of None makes a folder) first."""
    def with_files(tmp: Path) -> list[str]:
        for rel, text in files.items():
            (tmp / rel).mkdir(parents=True) if text is None else _write(tmp / rel, text)
        return setup(tmp)
    return with_files


QRELS = "query-id\tcorpus-id\tscore\nq1\ta\t1\n"
QUERIES = '{"_id": "q1", "text": "what are bees"}\n'
EVAL = "evaluate: {qrels: data/qrels/test.tsv}\n"


def _run_dir_kept_as_file(tmp: Path) -> None:
    assert (tmp / "run").read_text() == "a file"


# --- 8. paths that cannot be used: one line naming the path ------------------------------------------------

def _textdir_with_link(name: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        _write(tmp / "texts" / "a.txt", "bees")
        _write(tmp / "elsewhere" / "b.txt", "wasps")
        (tmp / "texts" / name).symlink_to(tmp / "elsewhere", target_is_directory=True)
        return _ingest(tmp / "texts", tmp)
    return setup


def _datasets_dict(text: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        _write(tmp / "hf" / "dataset_dict.json", text)
        return [*_ingest(tmp / "hf", tmp), "--format", "hf"]
    return setup


def _ingest_into(rel: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        _write(tmp / "run", "a file")
        return ["ingest", str(_write(tmp / "docs.jsonl", '{"_id": "a", "text": "bees"}\n')), "--run-dir",
                str(tmp / rel)]
    return setup


CASES = [
    Case("csv-unclosed-quote", _csv_unclosed, 2, ("{tmp}/docs.csv line 3", "quoted field never closed"),
         ("run/corpus",)),
    Case("csv-unclosed-after-multiline", _csv_unclosed_after_multiline, 2,
         ("{tmp}/docs.csv line 6", "quoted field never closed"), ("run/corpus",)),
    Case("csv-unclosed-header", _csv_unclosed_header, 2, ("{tmp}/docs.csv line 1", "never closed"),
         ("run/corpus",)),
    Case("csv-text-after-quote", _csv_text_after_quote, 2, ("{tmp}/docs.csv line 2", "malformed"),
         ("run/corpus",)),
    Case("export-into-users-folder", _export_into_users_folder, 2, ("{tmp}/out", "not empty", "--force"),
         check=_users_file_kept),
    Case("export-force-replaces-old-export", _export_force_over_old_export, 0, ("corpus.jsonl: 2",),
         check=_only_the_new_export),
    Case("export-into-empty-folder", _export_into_empty_folder, 0, ("qgen-queries.jsonl: 1",),
         check=_only_the_new_export),
    Case("export-onto-a-file", _export_onto_file, 2, ("{tmp}/out", "is a file"), check=_file_kept),
    Case("export-tab-in-id", _export_tab_in_id, 2, ("query_id 'q\\t1'", "tab or line break"), ("out",),
         check=_nothing_beside_run),
    Case("run-on-a-locked-run-dir", _run_on_locked_dir, 2,
         ("another run holds this run directory", f"host {socket.gethostname()}", f"pid {os.getpid()}",
          f"started {datetime.fromtimestamp(STARTED).isoformat(' ', 'seconds')}", "{tmp}/run/.lock"),
         check=_lock_kept),
    Case("status-manifest-is-a-list", _status_with("corpus/manifest.json", "[]"), 0,
         ("corpus corrupted", "holds list, expected an object")),
    Case("status-manifest-is-a-number", _status_with("queries/manifest.json", "3"), 0,
         ("queries corrupted", "holds int")),
    Case("status-manifest-files-wrong-type", _status_with("corpus/manifest.json", '{"fingerprint": "f", "files": []}'),
         0, ("corpus corrupted", "'files' is not an object")),
    Case("status-manifest-size-wrong-type", _status_with(
        "corpus/manifest.json", '{"fingerprint": "f", "files": {"part-00000.parquet": {"size": "9", "sha256": "x"}}}'),
         0, ("corpus corrupted", "is not {size: integer")),
    Case("status-manifest-not-json", _status_with("corpus/manifest.json", "{oops"), 0,
         ("corpus corrupted", "unreadable manifest.json")),
    Case("status-plan-wrong-type", _status_with(".triples.shards-ab12/plan.json", '{"n_shards": "2"}'), 0,
         ("triples corrupted", "recompute, discarding the staged shards", "integer n_shards")),
    Case("status-plan-is-a-list", _status_with(".triples.shards-ab12/plan.json", "[]"), 0, ("triples corrupted",)),
    Case("status-record-wrong-types", _status_with(".triples.shards-ab12/part-00000.done.json",
                                                   '{"file": 3, "rows": "x"}', plan=GOOD_PLAN), 0,
         ("triples partial", "0 of 2")),
    Case("status-record-is-a-list", _status_with(".triples.shards-ab12/part-00001.done.json", "[1]",
                                                 plan=GOOD_PLAN), 0, ("triples partial", "0 of 2")),
    Case("status-of-a-missing-folder", _status_of_missing_folder, 2, ("{tmp}/nope: no such run folder",),
         ("nope",)),
    Case("status-of-a-file", _status_of_a_file, 2, ("{tmp}/run.txt: is a file, not a run folder",)),
    Case("beir-folder-with-only-corpus-jsonl-gz", _beir_gz_only, 0, ("corpus: 2 documents",)),
    Case("empty-text-after-blank-lines", _empty_text_after_blank_lines, 2,
         ("{tmp}/docs.jsonl line 5: document 'b' has empty text", "--skip-empty"), ("run/corpus",)),
    Case("empty-text-in-a-text-folder", _empty_text_in_a_text_folder, 2,
         ("{tmp}/texts/sub/b.txt: document 'sub/b.txt' has empty text",), ("run/corpus",)),
    Case("run-base-folder-missing", _run_config("", "--set", "models.base={tmp}/nope"), 2,
         ("--set models.base={tmp}/nope: 'models.base': model folder '{tmp}/nope' does not exist",), ("run",)),
    Case("run-base-folder-without-config", _with_files({"model": None}, _run_config("models: {base: {tmp}/model}\n")),
         2, ("{tmp}/c.yaml: 'models.base': {tmp}/model: no config.json or modules.json",), ("run",)),
    Case("run-base-model-config-not-json", _with_files({"model/config.json": "{oops"},
                                                        _run_config("models: {base: {tmp}/model}\n")),
         2, ("'models.base': {tmp}/model/config.json: unreadable model config",), ("run",)),
    Case("run-hub-model-not-cached-offline", _run_config("models: {base: some-org/not-a-cached-model}\n"), 2,
         ("{tmp}/c.yaml: 'models.base': 'some-org/not-a-cached-model' is not a local folder and not in the "
          "Hugging Face cache", "HF_HUB_OFFLINE=1"), ("run",)),
    Case("run-default-hub-model-offline", _run_config("profile: default\ngenerate: {method: extractive}\n"
                                                      "models: {cross_encoder: tiny, retrievers: [{name: tiny}]}\n"),
         2, ("default (not set in {tmp}/c.yaml): 'models.base': 'GPL/msmarco-distilbert-margin-mse'",), ("run",)),
    Case("run-qrels-missing", _run_config(EVAL), 2,
         ("{tmp}/c.yaml: 'evaluate.qrels': {tmp}/data/qrels/test.tsv: no such qrels TSV file",), ("run",)),
    Case("run-qrels-is-a-folder", _with_files({"data/qrels/test.tsv": None, "data/queries.jsonl": QUERIES},
                                              _run_config(EVAL)), 2,
         ("'evaluate.qrels': {tmp}/data/qrels/test.tsv: is a folder, expected a qrels TSV file",), ("run",)),
    Case("run-qrels-bad-line", _with_files({"data/qrels/test.tsv": QRELS + "q1\tb\n", "data/queries.jsonl": QUERIES},
                                           _run_config(EVAL)), 2,
         ("'evaluate.qrels': {tmp}/data/qrels/test.tsv line 3: expected 3 tab-separated fields",), ("run",)),
    Case("run-queries-missing", _with_files({"data/qrels/test.tsv": QRELS}, _run_config(EVAL)), 2,
         ("default (not set in {tmp}/c.yaml): 'evaluate.queries': {tmp}/data/queries.jsonl: no such queries.jsonl",),
         ("run",)),
    Case("run-judged-query-without-text", _with_files({"data/qrels/test.tsv": QRELS + "q2\ta\t1\n",
                                                       "data/queries.jsonl": QUERIES}, _run_config(EVAL)), 2,
         ("'evaluate.qrels': {tmp}/data/qrels/test.tsv line 3: query id 'q2' is not in",), ("run",)),
    Case("run-queries-given-as-folder", _with_files({"data/qrels/test.tsv": QRELS, "qs": None},
                                                    _run_config(EVAL, "--set", "evaluate.queries={tmp}/qs")), 2,
         ("--set evaluate.queries={tmp}/qs: 'evaluate.queries': {tmp}/qs: is a folder",), ("run",)),
    Case("run-no-retrievers-without-bm25", _run_config("", "--set", "models.retrievers=[]"), 2,
         ("--set models.retrievers=[]: 'models.retrievers': empty", "mine.bm25: true"), ("run",)),
    Case("run-bm25-only-with-unnamed-teacher", _run_config("label: {teacher: bi_encoder}\nmine: {bm25: true}\n",
                                                           "--set", "models.retrievers=[]"), 2,
         ("'models.bi_encoder_teacher': not set, and models.retrievers is empty",), ("run",)),
    Case("run-name-with-a-slash", _run_config("", "--set", "name=a/b"), 2,
         ("--set name=a/b: 'name': 'a/b' must be a plain folder name",), ("run",)),
    Case("run-name-dot-dot", _run_config("", "--set", "name=.."), 2, ("'name': '..' must be a plain folder",),
         ("run",)),
    Case("run-corpus-missing", _run_config("", "--set", "corpus.path={tmp}/none.jsonl"), 2,
         ("--set corpus.path={tmp}/none.jsonl: 'corpus.path': {tmp}/none.jsonl: no such file or folder",), ("run",)),
    Case("run-dir-is-a-file", _with_files({"run": "a file"}, _run_config()), 2,
         ("run directory {tmp}/run: is a file, not a folder",), check=_run_dir_kept_as_file),
    Case("run-dir-under-a-file", _with_files({"run": "a file"}, _run_config("", "--run-dir", "{tmp}/run/sub")), 2,
         ("run directory {tmp}/run/sub: cannot be created: {tmp}/run is a file",), check=_run_dir_kept_as_file),
    Case("run-all-problems-in-one-line", _run_config(EVAL, "--set", "models.base=/nope", "--set", "name=a/b"), 2,
         ("'name'", "'models.base'", "'evaluate.qrels'"), ("run",)),
    Case("ingest-into-a-file", _ingest_into("run"), 2, ("run directory {tmp}/run: is a file, not a folder",),
         check=_run_dir_kept_as_file),
    Case("ingest-under-a-file", _ingest_into("run/sub"), 2, ("run directory {tmp}/run/sub: lies under {tmp}/run",),
         check=_run_dir_kept_as_file),
    Case("textdir-with-a-txt-named-link-to-a-folder", _textdir_with_link("link.md"), 2,
         ("{tmp}/texts/link.md: a link to a folder", "copy the folder in"), ("run/corpus",)),
    Case("textdir-with-a-link-to-a-folder", _textdir_with_link("sub"), 2,
         ("{tmp}/texts/sub: a link to a folder",), ("run/corpus",)),
    Case("datasets-dict-json-empty", _datasets_dict("{}"), 2,
         ("{tmp}/hf: not a datasets save_to_disk folder", "lacks the key 'splits'"), ("run/corpus",)),
    Case("datasets-dict-json-a-list", _datasets_dict("[]"), 2,
         ("{tmp}/hf: not a datasets save_to_disk folder", "wrong shape"), ("run/corpus",)),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_case(case: Case, tmp_path: Path) -> None:
    args = case.setup(tmp_path)
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == case.exit_code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    if case.exit_code == 2:  # one line; models the hub cannot serve get a line each, after the error's line
        models = case.name.startswith("run-") and "hub" in case.name
        assert lines[0].startswith("error:") and (len(lines) == 1 or models), result.output
        assert not models or all(line.startswith("  ") for line in lines[1:]), result.output
    output = " ".join(result.output.replace("│", " ").split())  # a status table row as plain words
    for word in case.words:
        assert word.replace("{tmp}", str(tmp_path)) in output, (word, result.output)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), rel
    if case.check is not None:
        case.check(tmp_path)


def test_export_failing_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = _run_with(tmp_path)
    _write(tmp_path / "out" / "corpus.jsonl", "the previous export")

    def broken(rows):
        yield "{}"
        raise OSError("disk full")

    monkeypatch.setattr(gpl_format, "_query_lines", broken)
    with pytest.raises(OSError, match="disk full"):
        gpl_format.export_gpl(ArtifactStore(run_dir), str(tmp_path / "out"), force=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["corpus.jsonl"]
    assert (tmp_path / "out" / "corpus.jsonl").read_text() == "the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


# --- 4. every numeric config key is bounded; a bad value is a ConfigError naming the key ---------------------

BAD_VALUES = [
    ("train.max_seq_length", "0"), ("train.max_seq_length", "-1"), ("train.learning_rate", "-1.0e-5"),
    ("train.learning_rate", ".inf"), ("train.learning_rate", ".nan"),
    ("train.warmup_steps", "-1"), ("train.seed", "-1"), ("train.seed", str(2**32)), ("train.steps", "0"),
    ("pretrain.learning_rate", "-3.0e-5"), ("pretrain.seed", "-2"), ("generate.top_k", "-1"),
    ("generate.top_p", "0"), ("generate.top_p", "1.5"), ("generate.max_query_length", "0"),
    ("generate.max_passage_length", "-3"), ("generate.queries_per_passage", "0"), ("generate.seed", "-1"),
    ("label.triples", "0"), ("label.max_seq_length", "0"), ("label.seed", "-1"), ("mine.max_seq_length", "0"),
    ("evaluate.max_seq_length", "-1"), ("models.tiny_seed", "-1"), ("execution.shard_timeout_s", ".inf"),
    ("execution.shard_timeout_s", "0"), ("execution.shard_size", "0"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_config_value_names_the_key(key: str, value: str) -> None:
    from gplflow.flows.config import ConfigError, PipelineConfig, apply_override

    with pytest.raises(ConfigError) as err:
        PipelineConfig.load(None, ["corpus.path=docs.jsonl", f"{key}={value}"])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)
    data: dict = {"corpus": {"path": "docs.jsonl"}}
    apply_override(data, f"{key}={value}")
    with pytest.raises(ConfigError, match=f"'{key}'"):
        PipelineConfig.from_dict(data)


def test_every_numeric_config_field_has_bounds() -> None:
    import types
    import typing

    from pydantic import BaseModel

    from gplflow.flows.config import ConfigError, PipelineConfig

    # int | 'auto': checked by a field validator
    validated = {"generate.queries_per_passage", "generate.batch_size", "label.triples", "train.devices",
                 "pretrain.devices", "augment.cross_encoder.devices", "execution.devices", "execution.max_in_flight"}
    unbounded = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{info.alias or name}"
            union = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
            args = typing.get_args(info.annotation) if union else ()
            kinds = [a for a in (args or (info.annotation,)) if a is not type(None)]
            for kind in kinds:
                if isinstance(kind, type) and issubclass(kind, BaseModel):
                    walk(kind, f"{key}.")
            numeric = any(kind in (int, float) for kind in kinds)
            bounded = any(type(m).__name__ in ("Gt", "Ge") for m in info.metadata)
            if numeric and not bounded and key not in validated:
                unbounded.append(key)

    walk(PipelineConfig, "")
    assert unbounded == []
    for key in sorted(k for k in validated if k.endswith(("devices", "max_in_flight"))):  # the exemptions hold
        with pytest.raises(ConfigError, match=rf"'{key}': .*'auto' or an integer >= 1, got 0"):
            PipelineConfig.load(None, ["corpus.path=docs.jsonl", f"{key}=0"])
    assert {"train.max_seq_length", "label.seed", "execution.shard_size"} <= _numeric_keys(PipelineConfig)


def _numeric_keys(model, prefix: str = "") -> set[str]:
    """The numeric keys the walk above must have seen (a check that it looks where it should)."""
    from pydantic import BaseModel

    found = set()
    for name, info in model.model_fields.items():
        key = f"{prefix}{info.alias or name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found |= _numeric_keys(info.annotation, f"{key}.")
        elif info.annotation in (int, float) or any(type(m).__name__ in ("Gt", "Ge") for m in info.metadata):
            found.add(key)
    return found


# --- 5 (cont.). a rerun recomputes what is unreadable ---------------------------------------------------------

@pytest.mark.parametrize("manifest", ["[]", "3", '"x"', '{"fingerprint": 1, "files": {}}', '{"files": {"a": 1}}'])
def test_rerun_recomputes_a_stage_whose_manifest_is_not_one(tmp_path: Path, manifest: str) -> None:
    from stage_calls import run_ingest

    from gplflow.tasks.ingest import IngestConfig

    cfg = IngestConfig(path=str(_write(tmp_path / "docs.jsonl", '{"_id": "a", "text": "bees"}\n')))
    store = ArtifactStore(tmp_path / "run")
    first = run_ingest(cfg, store)
    _write(tmp_path / "run" / "corpus" / "manifest.json", manifest)
    assert store.load("corpus") is None and store.problems("corpus")[0].startswith(f"{store.url('corpus')}: ")
    again = run_ingest(cfg, store)
    assert again.fingerprint == first.fingerprint and again.rows == 1
    assert store.load("corpus") is not None


@pytest.mark.parametrize("plan", ["[]", '{"n_shards": "2"}', '{"n_shards": -1}', '{"n_shards": true}', "{bad"])
def test_staging_under_an_unreadable_plan_starts_over(tmp_path: Path, plan: str) -> None:
    from gplflow.adapters.staging import ShardStaging

    store = ArtifactStore(tmp_path / "run")
    staging = ShardStaging(store, "triples", "ab12")
    staging.prepare({"n_shards": 2})
    staging.write_parquet(0, [pa.table({"x": [1]})], pa.schema([("x", pa.int64())]))
    _write(Path(staging.path) / "plan.json", plan)
    assert staging.read_plan() is None and staging.n_shards() is None and staging.plan_problem()
    assert staging.prepare({"n_shards": 2}) == [0, 1]  # the shard staged under the unreadable plan is redone
    assert sorted(p.name for p in Path(staging.path).iterdir()) == ["plan.json"]


@pytest.mark.parametrize("record", ["[]", '{"file": 3}', '{"file": "part-00000.parquet", "size": "1"}',
                                    '{"file": "../corpus/part-00000.parquet", "size": 1, "sha256": "x", "rows": 1}'])
def test_a_shard_with_an_unreadable_record_is_recomputed(tmp_path: Path, record: str) -> None:
    from gplflow.adapters.staging import ShardStaging

    staging = ShardStaging(ArtifactStore(tmp_path / "run"), "triples", "ab12")
    staging.prepare({"n_shards": 2})
    staging.write_parquet(0, [pa.table({"x": [1]})], pa.schema([("x", pa.int64())]))
    staging.write_parquet(1, [pa.table({"x": [2]})], pa.schema([("x", pa.int64())]))
    _write(Path(staging.path) / "part-00000.done.json", record)
    assert staging.prepare({"n_shards": 2}) == [0]


# --- 7 (cont.). the CLI starts fast: --help and status import neither torch nor the config ------------------

_PROBE = """
import sys, time
started = time.perf_counter()
from gplflow.flows.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("PROBE", code, round(time.perf_counter() - started, 2),
      *(name for name in ("torch", "gplflow.flows.config", "gplflow.flows.pipeline", "prefect.server.api.server")
        if name in sys.modules))
"""


def _probe(*args: str) -> tuple[int, float, set[str], str]:
    """Run gplflow in a fresh interpreter: exit code, seconds, which heavy modules it imported, stderr."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("PROBE"))
    _, code, seconds, *modules = line.split()
    return int(code), float(seconds), set(modules), done.stderr


@pytest.mark.timeout(300)
def test_help_and_status_do_not_import_torch_or_the_config(tmp_path: Path) -> None:
    code, _, modules, _ = _probe("--help")
    assert code == 0 and modules == set(), modules
    code, _, modules, _ = _probe("status", str(_run_with(tmp_path)))
    assert code == 0 and modules == set(), modules


@pytest.mark.timeout(300)
def test_config_errors_come_before_the_pipeline_and_prefect(tmp_path: Path) -> None:
    args = _run_config(EVAL, "--set", "models.base={tmp}/nope")(tmp_path)
    code, seconds, modules, stderr = _probe(*args)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "'models.base'" in lines[0] and "'evaluate.qrels'" in lines[0], stderr
    assert "Traceback" not in stderr
    assert "gplflow.flows.pipeline" not in modules and "prefect.server.api.server" not in modules
    assert "torch" not in modules  # the stage modules load torch, transformers and bm25s only when they compute
    assert not (tmp_path / "run").exists()
    print(f"config error after {seconds} s")


# --- 10. a user error is one line (exit 2); anything else is a bug and keeps its traceback (exit 1) ----------

_FAILING_STATUS = """
import sys
import pyarrow
from gplflow.adapters.errors import InputError
import gplflow.flows.status

def fail(*args, **kwargs):
    raise {error}

gplflow.flows.status.run_status = fail
from gplflow.flows.cli import app
app(sys.argv[1:])
"""

RAISED = [
    ("InputError('runs/x: a problem the user can fix')", 2, "error: runs/x: a problem the user can fix"),
    ("ValueError('a plain ValueError is a bug')", 1, "ValueError: a plain ValueError is a bug"),
    ("pyarrow.lib.ArrowInvalid('a pyarrow bug')", 1, "pyarrow.lib.ArrowInvalid: a pyarrow bug"),  # a ValueError
    ("FileNotFoundError(2, 'No such file', '/x/y')", 1, "FileNotFoundError: [Errno 2] No such file: '/x/y'"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("error", "code", "shown"), RAISED, ids=[r[0].split("(")[0] for r in RAISED])
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(error: str, code: int, shown: str,
                                                                 tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FAILING_STATUS.format(error=error), "status", str(tmp_path)],
                          capture_output=True, text=True, timeout=100, env={**os.environ, "COLUMNS": "400"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code, done.stderr
    if code == 2:
        assert lines == [shown], done.stderr
    else:
        assert lines[0] == "Traceback (most recent call last):" and lines[-1] == shown, done.stderr
        assert not any(line.startswith("error:") for line in lines), done.stderr


# --- 8 (cont.). a run directory that cannot be written: a read-only mount (tests run as root) ---------------

@pytest.fixture()
def mount_tmpfs(tmp_path: Path):
    """Mount a small tmpfs (root with CAP_SYS_ADMIN only; skipped elsewhere), unmounted afterwards."""
    import subprocess

    mounted: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()[:80]}); needs root with CAP_SYS_ADMIN")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_a_read_only_run_dir_is_one_line(tmp_path: Path, mount_tmpfs) -> None:
    read_only = mount_tmpfs("ro", "1m", read_only=True)
    docs = _write(tmp_path / "docs.jsonl", '{"_id": "a", "text": "bees"}\n')
    line = _one_error_line(runner.invoke(app, ["ingest", str(docs), "--run-dir", str(read_only / "run")]))
    assert f"run directory {read_only}/run: not writable" in line
    args = _run_config()(tmp_path)
    line = _one_error_line(runner.invoke(app, [*args, "--run-dir", str(read_only / "run")]))
    assert f"run directory {read_only}/run: cannot be created: {read_only} not writable" in line


# --- 9. a full disk: one line naming where, nothing half-written, never retried ----------------------------

def _big_corpus(path: Path, docs: int = 3000) -> Path:
    """About 1.5 MB of text Parquet cannot compress much (random words)."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=8)) for _ in range(5000)]
    lines = (json.dumps({"_id": f"d{i}", "text": " ".join(rng.choices(words, k=60))}) for i in range(docs))
    return _write(path, "\n".join(lines) + "\n")


def _nothing_half_written(run_dir: Path) -> None:
    assert not run_dir.exists() or [p.name for p in run_dir.iterdir()] == []  # no corpus/, no .corpus.tmp-*


def test_ingest_onto_a_full_disk_is_one_line(tmp_path: Path, mount_tmpfs) -> None:
    small = mount_tmpfs("small", "256k")
    docs = _big_corpus(tmp_path / "docs.jsonl")
    line = _one_error_line(runner.invoke(app, ["ingest", str(docs), "--run-dir", str(small / "run")]))
    assert f"no space left on {small}: writing {small}/run/corpus failed" in line
    _nothing_half_written(small / "run")


_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
from gplflow.flows.cli import app
app(sys.argv[1:])
"""


@pytest.mark.timeout(300)
def test_ingest_past_a_file_size_limit_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    docs = _big_corpus(tmp_path / "docs.jsonl")
    done = subprocess.run([sys.executable, "-c", _LIMITED, "ingest", str(docs), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "400"})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "no space left on " in errors[0] and f"writing {tmp_path}/run/corpus failed" in errors[0]
    assert "size limit (ulimit -f)" in errors[0]
    _nothing_half_written(tmp_path / "run")


_LIMITED_TRAIN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from gplflow.adapters.store import ArtifactStore
from gplflow.tasks.train import TrainConfig, TrainInputs, run_train
store = ArtifactStore(sys.argv[1])
corpus, queries = store.require("corpus"), store.require("queries")
cfg = TrainConfig(loss="mnrl", steps=4, batch_size=4, checkpoint_every=2, max_seq_length=32, warmup_steps=0)
resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))  # the tiny model's weights are ~1.2 MB
try:
    run_train(TrainInputs(run_dir=sys.argv[1], cfg=cfg, base_model=sys.argv[2], corpus=corpus.ref, queries=queries.ref))
except Exception as err:
    print("ERROR", type(err).__name__, str(err).splitlines()[0])
"""


@pytest.mark.timeout(300)
def test_a_checkpoint_past_a_file_size_limit_is_one_error_and_left_nowhere(tmp_path: Path) -> None:
    """Training whose first checkpoint cannot be written: a NoSpaceError naming where, no half checkpoint left
    (the next run must not resume from it), no model/ and no temporary folder."""
    import subprocess
    import sys

    from artifact_rows import write_artifact

    from gplflow.adapters.store import ArtifactStore
    from gplflow.adapters.tiny_models import build_tiny_models

    texts = [f"bees make honey from nectar number {i}" for i in range(24)]
    tiny = build_tiny_models(texts, tmp_path / "tiny", seed=0)
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", [(f"d{i}", "", t) for i, t in enumerate(texts)])
    write_artifact(store, "queries", [(f"q{i}", f"d{i}", f"how bees make honey {i}") for i in range(24)])
    done = subprocess.run([sys.executable, "-c", _LIMITED_TRAIN, str(tmp_path / "run"), str(tiny.bi_encoder)],
                          capture_output=True, text=True, timeout=240)
    [error] = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert error.startswith("ERROR NoSpaceError ") and "no space left on " in error, (error, done.stderr[-2000:])
    assert f"writing {tmp_path}/run/model failed (a file reached the size limit (ulimit -f))" in error
    checkpoints = list((tmp_path / "run" / ".checkpoints").glob("model-*/checkpoint-*"))
    assert checkpoints == [], checkpoints  # the half-written one was removed
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".checkpoints")) == [
        "corpus", "queries"]  # no model/, no .model.tmp-*


def test_a_full_disk_is_not_retried() -> None:
    import errno as errnos

    from prefect.states import Failed

    from gplflow.adapters.corpus_readers import CorpusError
    from gplflow.adapters.disk import NoSpaceError
    from gplflow.tasks.base import retry_unless_deterministic

    assert not retry_unless_deterministic(None, None, Failed(data=NoSpaceError(errnos.ENOSPC, "no space left on /")))
    assert not retry_unless_deterministic(None, None, Failed(data=OSError(errnos.EFBIG, "File too large")))
    wrapped = RuntimeError("[enforce fail] Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert not retry_unless_deterministic(None, None, Failed(data=wrapped))
    assert retry_unless_deterministic(None, None, Failed(data=RuntimeError("CUDA error: an illegal memory access")))
    # any other user error fails the same way on a second try
    assert not retry_unless_deterministic(None, None, Failed(data=CorpusError("docs.jsonl line 3: missing 'text'")))
