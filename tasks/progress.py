"""Progress artifacts: how far a long stage is, shown in the Prefect UI while it runs.

A stage reports work done (passages, pairs, steps) as often as it likes; the artifact is updated only when the
percentage has moved by ``step`` points, and once at 100 %, so a run of a million batches makes about
``100 / step`` API calls. Outside a Prefect task run (plain functions, tests) nothing is sent anywhere.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

logger = logging.getLogger(__name__)

DEFAULT_STEP = 5.0  # percentage points between two updates


def artifact_key(*parts: str) -> str:
    """A valid Prefect artifact key (lowercase letters, digits, dashes) made of ``parts``: every key gplflow
    makes from config values (``pretrain-ct_inbatch``, a run's name) goes through here."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key or "gplflow"


def in_task_run() -> bool:
    return TaskRunContext.get() is not None


class ProgressArtifact:
    """A progress artifact for ``total`` units of work; ``advance(n)`` / ``set(done)`` feed it.

    ``create`` and ``update`` are Prefect's ``create_progress_artifact`` and ``update_progress_artifact`` (or
    fakes, in tests); without ``create`` the object only counts. ``start`` picks them for the current context.
    """

    def __init__(self, key: str, total: int, description: str, step: float = DEFAULT_STEP, *,
                 create: Callable[..., Any] | None = None, update: Callable[[Any, float], Any] | None = None):
        self.total, self.step, self.done = max(int(total), 0), step, 0
        self.shown = 0.0  # the percentage the UI shows now
        self.key = artifact_key(key)
        self._id = create(0.0, key=self.key, description=description) if create is not None else None
        self._update = update if self._id is not None else None

    @classmethod
    def start(cls, key: str, total: int, description: str, step: float = DEFAULT_STEP) -> ProgressArtifact:
        """A progress artifact when running inside a Prefect task run; one that only counts otherwise."""
        if not in_task_run():
            return cls(key, total, description, step)
        return cls(key, total, description, step, create=create_progress_artifact, update=update_progress_artifact)

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else min(100.0, 100.0 * self.done / self.total)

    def advance(self, n: int = 1) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        self.done = done
        pct = self.percent
        if self._update is not None and (pct >= self.shown + self.step or pct >= 100.0 > self.shown):
            self._update(self._id, round(pct, 1))
            self.shown = pct

    def finish(self) -> None:
        """Show 100 % (a stage reused from an earlier run reports no work at all)."""
        self.set(max(self.done, self.total))
