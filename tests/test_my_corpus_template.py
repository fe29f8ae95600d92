"""configs/my-corpus.yaml, the starting point for a corpus without judgements: on a folder of text files it
validates offline (packaged and tiny models only, no hub) and ``--plan`` prints every stage of its GPL run."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gplflow.flows.cli import app
from gplflow.flows.config import PipelineConfig
from gplflow.flows.validate import validate_run

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "my-corpus.yaml"


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"note-{i}.txt").write_text(f"Note {i}. The hive {i % 3} was inspected in spring. The queen laid "
                                              f"eggs in {i + 2} frames. Varroa counts were low after treatment.")
    return folder


def test_the_template_validates_offline_on_a_folder_of_text_files(docs: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = PipelineConfig.load(TEMPLATE, [f"corpus.path={docs}"])
    validate_run(cfg, str(tmp_path / "run"), TEMPLATE, [f"corpus.path={docs}"])  # no hub model, nothing to judge
    assert cfg.is_gpl and cfg.generate.method == "extractive" and cfg.label.teacher == "bi_encoder"
    assert cfg.evaluate.qrels is None and cfg.evaluate.sts is None and cfg.evaluate.clustering is None
    assert cfg.evaluate.heldout_fraction > 0  # the verdict comes from held-out queries


def test_the_template_plans_every_stage_on_a_folder_of_text_files(docs: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(TEMPLATE), "--plan", "--set", "corpus.path=docs", "--set",
                                      "train.steps=2", "--run-dir", "runs/mine"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "12 passages" in result.output
    for stage in ("generate", "mine", "label", "train", "evaluate", "total"):
        assert f"│ {stage}" in result.output, stage
    assert not (tmp_path / "runs").exists()
