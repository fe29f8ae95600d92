"""Checkpoint naming and finding (``adapters/checkpoints.py``), shared by training, pretraining and ``status``."""

from __future__ import annotations

from pathlib import Path

from gplflow.adapters import checkpoints
from gplflow.adapters.store import ArtifactStore


def test_step_reads_both_checkpoint_names_and_nothing_else():
    assert checkpoints.step("checkpoint-20") == 20  # the Trainer's folders
    assert checkpoints.step(Path("run/.checkpoints/pretrain-ab/checkpoint-7.pt")) == 7  # the pretraining loop's files
    assert checkpoints.step("checkpoint-3/") == 3
    assert checkpoints.step(".checkpoint-7.pt.tmp") is None and checkpoints.step("checkpoint-x") is None
    paths = [Path(n) for n in ("checkpoint-10", "notes.txt", "checkpoint-9", "checkpoint-100")]
    assert checkpoints.by_step(paths) == [Path("checkpoint-9"), Path("checkpoint-10"), Path("checkpoint-100")]


def test_folder_is_in_the_run_directory_or_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    local = ArtifactStore(tmp_path / "run")
    assert checkpoints.folder(local, "model", "f00d") == tmp_path / "run" / ".checkpoints" / "model-f00d"
    remote = ArtifactStore("memory://gplflow-checkpoints-test")
    assert checkpoints.folder(remote, "pretrain", "f00d") == tmp_path / "cache" / "checkpoints" / "pretrain-f00d"


def test_latest_step_of_a_stage_in_the_run_directory(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    assert checkpoints.latest_step(store, "model") is None
    for name in ("model-a/checkpoint-20", "model-b/checkpoint-30", "pretrain-c/checkpoint-50.pt"):
        (tmp_path / "run" / ".checkpoints" / name).mkdir(parents=True)
    assert checkpoints.latest_step(store, "model") == 30
    assert checkpoints.latest_step(store, "pretrain") == 50
