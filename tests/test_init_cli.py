"""``gplflow init CORPUS`` (issue 20, item 1): a config for your corpus from configs/my-corpus.yaml, the format
detected and the path relative to the config, then its plan; existing files are kept, bad paths are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gplflow.flows import plan as plan_module
from gplflow.flows.cli import app
from gplflow.flows.config import PipelineConfig


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "my docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"note-{i}.md").write_text(f"Note {i}. The hive {i % 3} was inspected in spring. The queen laid "
                                             f"eggs in {i + 2} frames.")
    return folder


def test_init_writes_a_config_for_a_folder_of_text_files_and_prints_its_plan(docs, tmp_path, monkeypatch):
    real = plan_module.make_plan
    monkeypatch.setattr(plan_module, "make_plan", lambda cfg, run_dir: real(cfg, run_dir, calibrate=False))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["init", "my docs", "--out", "configs/mine.yaml"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    written = tmp_path / "configs" / "mine.yaml"
    data = yaml.safe_load(written.read_text())
    assert data["corpus"] == {"path": "../my docs", "format": "textdir"} and data["name"] == "my-docs"
    assert written.read_text().startswith("# Written by `gplflow init my docs` (format detected: textdir)")
    assert "# the student: MiniLM's first transformer layer" in written.read_text()  # the template's comments kept
    cfg = PipelineConfig.load(written)
    assert cfg.corpus.path == str(docs.resolve()) and cfg.generate.method == "extractive"
    output = " ".join(result.output.split())
    assert "wrote configs/mine.yaml: corpus my docs (textdir)" in output and "12 passages" in output
    for stage in ("generate", "mine", "label", "train", "evaluate", "total"):
        assert f"│ {stage}" in result.output, stage
    assert not (tmp_path / "runs").exists()  # the plan writes nothing


def test_init_detects_a_jsonl_file_and_names_the_fields_it_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "text": "bees"}) + "\n")
    result = CliRunner().invoke(app, ["init", "corpus.jsonl", "--no-plan"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "my-corpus.yaml").read_text())["corpus"] == {"path": "corpus.jsonl",
                                                                                  "format": "jsonl"}
    assert "corpus.id_field '_id'" in " ".join(result.output.split()) and "│" not in result.output


def test_init_keeps_an_existing_file_and_refuses_what_it_cannot_read(docs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-corpus.yaml").write_text("mine\n")
    kept = CliRunner().invoke(app, ["init", str(docs), "--no-plan"])
    assert kept.exit_code == 2 and "my-corpus.yaml: already exists; pass --force" in kept.output
    assert (tmp_path / "my-corpus.yaml").read_text() == "mine\n"
    replaced = CliRunner().invoke(app, ["init", str(docs), "--no-plan", "--force"])
    assert replaced.exit_code == 0 and "format: textdir" in (tmp_path / "my-corpus.yaml").read_text()
    (tmp_path / "notes.xyz").write_text("?")
    for path in ("notes.xyz", "missing"):
        found = CliRunner().invoke(app, ["init", path, "--no-plan", "--out", "other.yaml"])
        assert found.exit_code == 2 and len(found.output.strip().splitlines()) == 1, found.output
        assert path in found.output and not (tmp_path / "other.yaml").exists()
