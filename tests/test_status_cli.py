"""``gplflow status``: a folder that is not a run exits 2 in one line; stages only other configs compute are not
listed as missing; the conditions are printed whole on an 80-column output; ``--verify`` says what it hashed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from artifact_rows import write_artifact
from typer.testing import CliRunner

from gplflow.adapters.store import ArtifactStore
from gplflow.flows.cli import app

runner = CliRunner()


def _status(*args: str):
    return runner.invoke(app, ["status", *args], env={"COLUMNS": "80"})


def test_a_folder_that_is_not_a_run_directory_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("bees")
    result = _status(str(tmp_path / "docs"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'docs'}: not a run directory (no stage "
                                                  "artifact, staged shard or checkpoint in it); give the --run-dir "
                                                  "of a run"]


def test_status_lists_the_runs_stages_and_names_the_others_whole_and_verify_counts_what_it_hashed(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", [("d1", "", "bees make honey"), ("d2", "", "wax cells")])
    plain = _status(str(tmp_path / "run"))
    assert plain.exit_code == 0, plain.output
    assert re.search(r"corpus\s+│\s+complete", plain.output)
    assert not re.search(r"(pretrain|pairs|silver)\s+│\s+missing", plain.output)  # other configs' stages
    assert re.search(r"promoted\s+│\s+missing", plain.output)  # a stage every run computes
    assert "pretrain (if pretrain.method is not none)" in plain.output  # on one line, not cut to "pretrain.me…"
    assert "…" not in plain.output
    manifest = json.loads((tmp_path / "run" / "corpus" / "manifest.json").read_text())
    files = manifest["files"]
    size = sum(meta["size"] for meta in files.values())
    assert f"checked sizes and modification times of {len(files)} files" in plain.output
    verified = _status(str(tmp_path / "run"), "--verify")
    assert verified.exit_code == 0
    assert f"verified: hashed {len(files)} files ({size / 1e6:.1f} MB)" in verified.output
    assert verified.output != plain.output


def test_the_rounds_are_found_published_or_staged_in_round_order(tmp_path: Path) -> None:
    from gplflow.flows.status import round_artifacts

    for folder in ("triples-round-10", ".triples-round-2.shards-0a1b", "negatives-round-2", "negatives-round-10",
                   "negatives", ".triples.shards-0a1b", "queries-round-2", "triples-round-x", ".negatives-round-3"):
        (tmp_path / folder).mkdir()
    assert round_artifacts(ArtifactStore(tmp_path)) == ["negatives-round-2", "triples-round-2", "negatives-round-10",
                                                         "triples-round-10"]
