"""A trainer callback that stands in for a killed training process (the resume tests of training, n-tuple losses
and re-mining rounds)."""

from __future__ import annotations

from transformers import TrainerCallback


class CrashAt(TrainerCallback):
    """Raises when step ``step`` is about to run: the steps before it are done (and checkpointed as configured)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            raise RuntimeError(f"simulated crash before step {self.step}")
