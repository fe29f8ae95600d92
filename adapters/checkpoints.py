"""Where the training stages keep their checkpoints, how a checkpoint is named, and which is the newest.

A training stage (``pretrain``, ``model``) checkpoints into ``<run_dir>/.checkpoints/<stage>-<fingerprint>/``
until its model is published; a rerun with the same fingerprint continues from the newest checkpoint there.
Checkpoints are written with plain file I/O, so a run directory on remote storage (an fsspec URL) gets a local
folder instead: ``$GPLFLOW_CACHE_DIR/checkpoints/<stage>-<fingerprint>`` (default ``~/.cache/gplflow``).

A checkpoint is named ``checkpoint-<step>``: a folder (the sentence-transformers Trainer's) or a
``checkpoint-<step>.pt`` file (the pretraining loop's).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from gplflow.adapters.store import ArtifactStore

CHECKPOINTS = ".checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)(\.pt)?$")


def folder(store: ArtifactStore, stage: str, fingerprint: str) -> Path:
    """The checkpoint folder of one training run of ``stage`` (see the module docstring)."""
    from gplflow.adapters.tiny_models import default_cache_dir  # torch: only when training, not for `status`

    key = f"{stage}-{fingerprint}"
    return Path(store.root) / CHECKPOINTS / key if store.is_local else default_cache_dir() / "checkpoints" / key


def step(path: str | Path) -> int | None:
    """The step a checkpoint's name holds, or None when the name is not a checkpoint's."""
    match = _NAME.match(PurePosixPath(str(path).rstrip("/")).name)
    return int(match.group(1)) if match else None


def by_step(paths: Iterable[Path]) -> list[Path]:
    """The checkpoints among ``paths``, oldest step first."""
    return sorted((p for p in paths if step(p) is not None), key=lambda p: step(p) or 0)


def latest_step(store: ArtifactStore, stage: str) -> int | None:
    """The newest checkpoint step that a killed run of ``stage`` left in the run directory, if any."""
    root = f"{store.root}/{CHECKPOINTS}"
    if not store.fs.exists(root):
        return None
    steps = [found for run in store.fs.ls(root, detail=False)
             if PurePosixPath(run.rstrip("/")).name.startswith(f"{stage}-")
             for path in store.fs.ls(run, detail=False) if (found := step(path)) is not None]
    return max(steps, default=None)


def remove(checkpoints: Path) -> None:
    """Drop a finished run's checkpoints (the published model replaces them)."""
    shutil.rmtree(checkpoints, ignore_errors=True)
