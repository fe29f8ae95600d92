"""Pairs: read a user's labelled pairs (flow ``supervised``) into the ``pairs/`` artifact.

``scored`` rows are (sentence1, sentence2, score in [0, 1]); ``ranking`` rows are (anchor, positive) and, when
the file has one, a negative. The manifest records the kind, the format and, for scored pairs, how the scores
are spread (min, mean, max and a five-bin histogram), so a skewed label set shows before training on it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any, Literal

from prefect import get_run_logger
from pydantic import Field

from gplflow.adapters import artifacts
from gplflow.adapters.corpus_readers import detect_format
from gplflow.adapters.pair_readers import iter_pairs
from gplflow.adapters.store import Artifact, content_signature, row_batches
from gplflow.tasks.base import StageConfig, StageInputs, stage_task

logger = logging.getLogger(__name__)

STAGE = artifacts.PAIRS
CODE_VERSION = "pairs-1"
HISTOGRAM_BINS = 5


class PairColumnsConfig(StageConfig):
    """The file's column (JSON key) for each role; only the kind's roles are read."""

    sentence1: str = Field(default="sentence1", min_length=1)
    sentence2: str = Field(default="sentence2", min_length=1)
    score: str = Field(default="score", min_length=1)
    anchor: str = Field(default="anchor", min_length=1)
    positive: str = Field(default="positive", min_length=1)
    negative: str = Field(default="negative", min_length=1)  # read when the file has it


class PairsConfig(StageConfig):
    path: str
    format: Literal["jsonl", "csv", "tsv", "parquet"] | None = None  # detected from the file name when None
    kind: Literal["scored", "ranking"] = "scored"
    columns: PairColumnsConfig = PairColumnsConfig()
    score_max: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)  # scores lie in [0, score_max] (STS-B: 5)


class PairsInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What reading pairs reads: the user's pairs file (by content)."""

    cfg: PairsConfig

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        return self.cfg.model_dump(mode="json"), {"source": content_signature(self.cfg.path)}


def run_pairs(inputs: PairsInputs) -> Artifact:
    """Read and validate every pair; publish them only if all passed."""
    cfg, store = inputs.cfg, inputs.store
    if (found := inputs.reuse()) is not None:
        return found
    fmt = cfg.format or detect_format(cfg.path)
    rows = iter_pairs(cfg.path, cfg.kind, fmt, cfg.columns.model_dump(), cfg.score_max)
    first = next(rows)  # the first row says whether the file has negatives (and raises for an empty file)
    schema = artifacts.pairs_schema(cfg.kind, with_negative="negative" in first)
    with store.writer(STAGE, config=cfg.model_dump(mode="json"), inputs={"source": content_signature(cfg.path)},
                      code_version=CODE_VERSION) as out:
        out.extra.update(format=fmt, kind=cfg.kind, columns=schema.names)
        scores: list[float] = []
        out.write_part(row_batches(_noting_scores(itertools.chain([first], rows), scores), schema), schema)
        if scores:
            out.extra["scores"] = score_summary(scores)
    artifact = store.require(STAGE)
    logger.info("read %d %s pairs from %s (%s)", artifact.rows, cfg.kind, cfg.path, fmt)
    return artifact


def score_summary(scores: list[float], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """min, mean, max and the counts in ``bins`` equal bins of [0, 1] (a score of 1 goes in the last)."""
    histogram = [0] * bins
    for score in scores:
        histogram[min(int(score * bins), bins - 1)] += 1
    return {"min": round(min(scores), 6), "mean": round(sum(scores) / len(scores), 6), "max": round(max(scores), 6),
            "histogram": histogram, "bins": [round(i / bins, 6) for i in range(bins + 1)]}


def _noting_scores(rows: Iterator[dict[str, Any]], scores: list[float]) -> Iterator[dict[str, Any]]:
    """The rows, unchanged; the score of each scored pair is appended to ``scores`` on the way."""
    for row in rows:
        if "score" in row:
            scores.append(row["score"])
        yield row


def settings(cfg: Any) -> str:
    p = cfg.pairs
    return f"{p.kind} pairs `{p.path}`" + (f" (scores in [0, {p.score_max:g}])" if p.kind == "scored" else "")


@stage_task("read labelled pairs")
def pairs_task(inputs: PairsInputs) -> str:
    artifact = run_pairs(inputs)
    get_run_logger().info("pairs: %d %s pairs (%s)", artifact.rows, inputs.cfg.kind,
                          artifact.manifest.get("scores") or "no scores")
    return artifact.fingerprint
