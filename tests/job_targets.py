"""Functions a test's torchrun job calls on every rank (``module:function`` in its job file): they stand in for
a training where only the launcher's side is under test."""

from __future__ import annotations

from typing import Any

from gplflow.adapters import distributed


def count_steps(payload: dict[str, Any]) -> None:
    """Rank 0 emits the events of ``payload["steps"]`` steps; every rank says where it ran."""
    distributed.emit({"step": 0, "max_steps": payload["steps"]})
    for step in range(1, payload["steps"] + 1):
        distributed.emit({"step": step})
    print(f"counted {payload['steps']} steps", flush=True)
