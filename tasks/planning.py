"""What a stage's estimate for ``gplflow run --plan`` is made of: its work, in which unit, and how to time it.

Each stage module writes its own ``estimate(cfg, passages) -> StagePlan`` beside its task; the registry names it
and ``flows/plan.py`` runs the calibration and prints the table. The helpers here time a stage's own compute path
on a few corpus passages, after one warm-up call, several times: the median is the estimate, and the spread of
the timings (``timings``) says how noisy this machine was while calibrating, which the plan shows as "±x%".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NamedTuple

CALIBRATION_TEXTS = 128  # texts encoded or pairs scored to measure a rate
CALIBRATION_STEPS = 3  # training steps; the first one (setup) is not counted
CALIBRATION_PASSAGES = 16  # passages given to the generator (at most one batch)
REPEATS = 3  # timed calls after the warm-up: their median is the time, their spread the noise


class Measured(NamedTuple):
    """A stage's calibration: its rate, and the seconds it spends beside the work counted at that rate (evaluate's
    clustering and embedding map), with what those are, in words."""

    rate: float
    beside: float = 0.0
    beside_detail: str = ""


# (resolved models, passages) -> units per second, or a Measured
Measure = Callable[[dict[str, Any], list[str]], "float | Measured"]
_SPREADS: ContextVar[list[float] | None] = ContextVar("gplflow_calibration_spreads", default=None)
_RATES: ContextVar[dict[tuple[Any, ...], tuple[float, list[float]]] | None] = ContextVar("gplflow_rates", default=None)


@contextmanager
def calibration() -> Iterator[None]:
    """One plan's calibration: a rate two stages measure alike (label's and evaluate's judge scoring the same
    pairs with the same teacher) is measured once, and its spread noted for both."""
    token = _RATES.set({})
    try:
        yield
    finally:
        _RATES.reset(token)


@contextmanager
def timings() -> Iterator[list[float]]:
    """The relative spreads of the timings made inside (by ``clock`` and ``StepClock.rate``): 0.1 = ±10%."""
    found: list[float] = []
    token = _SPREADS.set(found)
    try:
        yield found
    finally:
        _SPREADS.reset(token)


def _median(samples: list[float]) -> float:
    """The median of ``samples`` (seconds), its spread (half the range over the median) noted for ``timings``."""
    middle = max(statistics.median(samples), 1e-9)
    if (noted := _SPREADS.get()) is not None and len(samples) > 1:
        noted.append((max(samples) - min(samples)) / (2 * middle))
    return middle


@dataclass
class StagePlan:
    """One stage: how much work, in which unit, and the calibrated rate (None when it could not be measured).

    ``measure`` times the stage's own compute path on a few passages (given the resolved models and the passage
    sample) and returns its rate in ``unit`` per second, or a ``Measured`` (the rate and the seconds spent beside
    that work). ``stage`` is the registry's name, set by the plan; ``spread`` and ``beside`` are set by it too.
    """

    work: float
    unit: str
    detail: str
    rate: float | None = None
    note: str = ""
    measure: Measure | None = field(default=None, repr=False, compare=False)
    stage: str = ""
    spread: float | None = None  # the calibration timings' relative spread (0.1: ±10%); None when not measured
    beside: float = 0.0  # seconds spent beside ``work`` at ``rate`` (Measured.beside)
    beside_detail: str = ""
    sharded: float | None = None  # the part of ``work`` its shards do (None: all of it; mine: the corpus encoding)

    @property
    def seconds(self) -> float | None:
        return self.work / self.rate + self.beside if self.rate else None


def clock(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Seconds of one call: the median of ``repeats`` timed calls after a warm-up call, which pays for one-off
    work (kernels chosen per shape, caches). Their spread is noted for ``timings``."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return _median(samples)


def pseudo_query(passage: str) -> str:
    return " ".join(passage.split()[:12])


def encode_rate(ref: str, texts: list[str], max_seq_length: int | None, batch_size: int) -> float:
    """Texts per second a bi-encoder encodes."""
    return encode_timed(ref, texts, max_seq_length, batch_size)[0]


def encode_timed(ref: str, texts: list[str], max_seq_length: int | None, batch_size: int) -> tuple[float, Any]:
    """Texts per second a bi-encoder encodes, and the embeddings of the calibration texts (a numpy array)."""
    from gplflow.adapters import encoding, models

    model = models.load_bi_encoder(ref, max_seq_length=max_seq_length, inference=True)
    texts, found = texts[:CALIBRATION_TEXTS], []

    def encode() -> None:
        found[:] = [encoding.encode(model, texts, batch_size=batch_size, show_progress=False)]

    return len(texts) / clock(encode), found[0]


def once_then_each(fn: Callable[[], Any], times: int) -> float:
    """Seconds ``times`` calls of ``fn`` take in one process: the first call (which pays one-off costs such as a
    library's JIT compilation, as the run will) plus ``times - 1`` second calls."""
    started = time.perf_counter()
    fn()
    first = time.perf_counter() - started
    if times < 2:
        return first
    started = time.perf_counter()
    fn()
    return first + (times - 1) * (time.perf_counter() - started)


def score_rate(kind: str, ref: str, passages: list[str], max_seq_length: int, batch_size: int,
               normalize: bool = False, per_text: bool = False) -> float:
    """Pairs per second a teacher scores (``per_text``: texts per second, a bi-encoder encoding each once)."""
    import numpy as np

    from gplflow.adapters.scoring import load_scorer

    texts = passages[:CALIBRATION_TEXTS]
    key = ("score", kind, ref, max_seq_length, batch_size, normalize, tuple(texts))
    if (known := (_RATES.get() or {}).get(key)) is not None:
        seconds, spreads = known
        if (noted := _SPREADS.get()) is not None:
            noted.extend(spreads)
    else:
        scorer = load_scorer(kind, ref, max_seq_length=max_seq_length, batch_size=batch_size, normalize=normalize)
        queries = [pseudo_query(p) for p in texts]
        every = np.arange(len(texts))
        with timings() as spreads:
            seconds = clock(lambda: scorer.score(queries, texts, every, np.roll(every, 1)))
        if (noted := _SPREADS.get()) is not None:
            noted.extend(spreads)
        if (rates := _RATES.get()) is not None:
            rates[key] = seconds, spreads
    return (2 if per_text else 1) * len(texts) / seconds


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
        """Steps per second after the first step; the spread of the step times is noted for ``timings``."""
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return 1 / _median(steps) if steps else 1e-9
