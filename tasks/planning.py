"""What a stage's estimate for ``gplflow run --plan`` is made of: its work, in which unit, and how to time it.

Each stage module writes its own ``estimate(cfg, passages) -> StagePlan`` beside its task; the registry names it
and ``flows/plan.py`` runs the calibration and prints the table. The helpers here time a stage's own compute path
on a few corpus passages, after one warm-up call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CALIBRATION_TEXTS = 128  # texts encoded or pairs scored to measure a rate
CALIBRATION_STEPS = 3  # training steps; the first one (setup) is not counted
CALIBRATION_PASSAGES = 16  # passages given to the generator (at most one batch)

Measure = Callable[[dict[str, Any], list[str]], float]  # (resolved models, passages) -> units per second


@dataclass
class StagePlan:
    """One stage: how much work, in which unit, and the calibrated rate (None when it could not be measured).

    ``measure`` times the stage's own compute path on a few passages (given the resolved models and the passage
    sample) and returns its rate in ``unit`` per second. ``stage`` is the registry's name, set by the plan.
    """

    work: float
    unit: str
    detail: str
    rate: float | None = None
    note: str = ""
    measure: Measure | None = field(default=None, repr=False, compare=False)
    stage: str = ""

    @property
    def seconds(self) -> float | None:
        return self.work / self.rate if self.rate else None


def clock(fn: Callable[[], Any]) -> float:
    """Seconds of the second of two calls: the first pays for one-off work (kernels chosen per shape, caches)."""
    fn()
    started = time.perf_counter()
    fn()
    return max(time.perf_counter() - started, 1e-9)


def pseudo_query(passage: str) -> str:
    return " ".join(passage.split()[:12])


def encode_rate(ref: str, texts: list[str], max_seq_length: int | None, batch_size: int) -> float:
    """Texts per second a bi-encoder encodes."""
    from gplflow.adapters import encoding, models

    model = models.load_bi_encoder(ref, max_seq_length=max_seq_length, inference=True)
    texts = texts[:CALIBRATION_TEXTS]
    return len(texts) / clock(lambda: encoding.encode(model, texts, batch_size=batch_size, show_progress=False))


def score_rate(kind: str, ref: str, passages: list[str], max_seq_length: int, batch_size: int,
               normalize: bool = False, per_text: bool = False) -> float:
    """Pairs per second a teacher scores (``per_text``: texts per second, a bi-encoder encoding each once)."""
    import numpy as np

    from gplflow.adapters.scoring import load_scorer

    scorer = load_scorer(kind, ref, max_seq_length=max_seq_length, batch_size=batch_size, normalize=normalize)
    texts = passages[:CALIBRATION_TEXTS]
    queries = [pseudo_query(p) for p in texts]
    every = np.arange(len(texts))
    return (2 if per_text else 1) * len(texts) / clock(lambda: scorer.score(queries, texts, every, np.roll(every, 1)))


class StepClock:
    """Time stamps of training steps; ``rate()`` is steps per second after the first (setup) step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def tick(self, *_args: Any, **_kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())

    def callback(self) -> Any:
        """The clock as a ``transformers.TrainerCallback``."""
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.tick()

        return Clock()

    def rate(self) -> float:
        return (len(self.stamps) - 1) / max(self.stamps[-1] - self.stamps[0], 1e-9)
