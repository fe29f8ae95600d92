"""Split: a seeded share of the generated queries is held out before mining, as a test set nothing trains on.

Publishes two artifacts with the queries schema (query_id, doc_id, text), both made from ``queries/``:

- ``heldout/``: the held-out queries. The passage each was generated from is its one relevant passage, so the
  evaluate stage scores every model on them without relevance judgements (``evaluate.heldout_*``).
- ``queries-train/``: every other query. Mining, labelling and training (triples or MNRL pairs) read this one,
  so a held-out query is never mined, labelled nor trained on.

Queries are held out by passage: every query of a drawn passage, never some of them. A sibling query of the same
passage in training would teach the student that very (query-like text, passage) pair and flatter the adapted
model on the held-out set. Passages are drawn in a seeded order (``heldout_seed``); a passage is taken while its
queries still fit under ``floor(heldout_fraction x queries)`` capped at ``heldout_max``, so the count is at most
that target (and equals it whenever passages have one query each).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger

from gplflow.adapters import artifacts
from gplflow.adapters.store import Artifact
from gplflow.tasks.base import Ref, StageInputs, reuse, stage_fingerprint, stage_task
from gplflow.tasks.evaluate import EvaluateConfig

logger = logging.getLogger(__name__)

HELDOUT = artifacts.HELDOUT
TRAIN = artifacts.QUERIES_TRAIN
CODE_VERSION = "split-1"


def active(cfg: EvaluateConfig) -> bool:
    """Whether the config holds queries out at all (``heldout_fraction`` 0 or ``heldout_max`` 0 turn it off)."""
    return cfg.heldout_fraction > 0 and cfg.heldout_max > 0


def _config(cfg: EvaluateConfig) -> dict[str, Any]:
    """Only the split's own keys: the other evaluate settings must not re-split (and so re-mine and re-train)."""
    return {"fraction": cfg.heldout_fraction, "max": cfg.heldout_max, "seed": cfg.heldout_seed}


class SplitInputs(StageInputs, artifact=HELDOUT, code_version=CODE_VERSION):
    """What the split reads: the generated queries, cut by the evaluation's held-out settings."""

    cfg: EvaluateConfig
    queries: Ref

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        return _config(self.cfg), {"queries": self.queries.fingerprint}

    def fingerprints(self) -> dict[str, str]:
        """``{"heldout": fp, "queries-train": fp}``: what ``run_split`` publishes under."""
        config, inputs = self.fingerprint_parts()
        return {stage: stage_fingerprint(stage, config, inputs, CODE_VERSION) for stage in (HELDOUT, TRAIN)}


def heldout_passages(doc_ids: np.ndarray, target: int, seed: int) -> set[str]:
    """Passages whose queries are held out: drawn in a seeded order while their queries fit under ``target``."""
    passages, counts = np.unique(doc_ids, return_counts=True)
    chosen, held = set(), 0
    for i in np.random.default_rng(seed).permutation(len(passages)):
        if held == target:
            break
        if held + counts[i] <= target:
            chosen.add(str(passages[i]))
            held += int(counts[i])
    return chosen


def run_split(inputs: SplitInputs) -> dict[str, Artifact]:
    """Publish ``heldout/`` and ``queries-train/`` from the queries (each reused while it validates)."""
    cfg, store, fps = inputs.cfg, inputs.store, inputs.fingerprints()
    found = {stage: reuse(store, stage, fp) for stage, fp in fps.items()}
    if all(found.values()):
        return found  # type: ignore[return-value]
    queries = inputs.load(inputs.queries)
    table = queries.read_table()  # every column: an llm run's logprob goes with its query
    schema = artifacts.queries_schema(logprob="logprob" in table.column_names)
    target = min(cfg.heldout_max, math.floor(cfg.heldout_fraction * table.num_rows))
    doc_ids = table.column("doc_id").to_numpy(zero_copy_only=False)
    chosen = heldout_passages(doc_ids, target, cfg.heldout_seed)
    mask = pc.is_in(table.column("doc_id"), value_set=pa.array(sorted(chosen), pa.string()))
    parts = {HELDOUT: table.filter(mask), TRAIN: table.filter(pc.invert(mask))}  # fraction <= 0.5: TRAIN >= half
    for stage, part in parts.items():
        with store.writer(stage, config=_config(cfg), inputs={"queries": queries.fingerprint},
                          code_version=CODE_VERSION) as out:
            out.write_part([part], schema)
            out.count("queries", part.num_rows)
            out.count("passages", len(set(part.column("doc_id").to_pylist())))
            out.count("target_heldout_queries", target)
    logger.info("held out %d of %d queries (%d passages) for the synthetic evaluation", parts[HELDOUT].num_rows,
                table.num_rows, len(chosen))
    return {stage: store.require(stage) for stage in fps}


@stage_task("hold out queries")
def split_task(inputs: SplitInputs) -> dict[str, str]:
    found = run_split(inputs)
    get_run_logger().info("held-out queries: %d (never mined, labelled nor trained on); training queries: %d",
                          found[HELDOUT].rows, found[TRAIN].rows)
    return {stage: artifact.fingerprint for stage, artifact in found.items()}
