"""Re-mining rounds (R-GPL, ``train.remine_every: K``): training in rounds of K steps, the negatives refreshed with
the model being trained between rounds.

Round 1 trains on the label stage's examples. Before round r > 1 the student as it stands at step (r - 1) x K (its
checkpoint) encodes the corpus and the training queries and mines ``mine.negatives_per_query`` negatives per query
(``negatives-round-<r>``); labelling draws the round's examples from them with the label stage's code and seed and
scores only the pairs no earlier round scored (``triples-round-<r>``); the round then trains on them, resuming the
one optimizer, schedule and RNG from the checkpoint. Every round holds ``remine_every x batch_size`` examples, one
epoch of the trainer, so a run killed in the middle of round r resumes in round r at the same batch.

A round's artifacts are keyed by the train stage's fingerprint and the round number (the student that mined them
follows from both), so a rerun reuses them even after its checkpoint was rotated away.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gplflow.adapters import artifacts
from gplflow.adapters.store import Artifact, Ref
from gplflow.tasks.base import StageConfig, StageInputs, compute
from gplflow.tasks.label import LabelConfig, LabelJob, RoundLabelInputs
from gplflow.tasks.mine import MineConfig, MineJob, _dense_batches

logger = logging.getLogger(__name__)

CODE_VERSION = "remine-1"


class Rounds(StageConfig):
    """What re-mining rounds read beside the train stage's own inputs: how to mine and label, the teacher, and the
    first round's negatives (the mine stage's), against which round 2 counts its changed negatives."""

    mine: MineConfig
    label: LabelConfig
    teacher: str  # a loadable model reference
    negatives: Ref
    shard_size: int = Field(gt=0)


class RoundMineInputs(StageInputs, code_version=CODE_VERSION):
    """Mining round ``round``'s negatives with the student (a checkpoint folder)."""

    cfg: MineConfig
    corpus: Ref
    queries: Ref
    previous: Ref  # the negatives the previous round trained on
    student: str  # its checkpoint at the round's first step: not fingerprinted (``train`` and ``round`` fix it)
    score: str  # the student's similarity: "dot" or "cos_sim"
    train: str  # the train stage's fingerprint
    round: int = Field(ge=2)
    shard_size: int = Field(gt=0)  # passages per shard of the corpus encoding (not fingerprinted: same rows)

    @property
    def artifact(self) -> str:  # type: ignore[override]
        return artifacts.round_artifact(artifacts.NEGATIVES, self.round)

    def checked(self) -> list[tuple[str, str]]:
        """The one retriever, as the mine stage's job reads its retrievers: the student and its similarity."""
        return [(self.student, self.score)]

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        config = {**self.cfg.model_dump(mode="json"), "score": self.score, "round": self.round}
        return config, {"corpus": self.corpus.fingerprint, "queries": self.queries.fingerprint,
                        "previous": self.previous.fingerprint, "train": self.train}


class RoundMineJob(MineJob):
    """A round's mining as the mine stage's job: the corpus encoding by the student cut into shards (which the run
    spreads over its devices or pool workers as it spreads the mine stage's), then the search in this process."""

    def __init__(self, inputs: RoundMineInputs):
        self.started = time.time()
        super().__init__(inputs)  # type: ignore[arg-type]

    def publish(self) -> Artifact:
        inputs: RoundMineInputs = self.inputs  # type: ignore[assignment]
        records = self.done_records()
        emb = np.concatenate([self.staging.read_array(c) for c in range(self.slices)])
        name = f"student-round-{inputs.round}"
        chunks = self.queries.iter_batches(["query_id", "doc_id", "text"], batch_size=self.cfg.query_chunk)
        with self.store.writer(self.stage, config=self.config, inputs=self.input_fps, code_version=CODE_VERSION) as out:
            batches = list(_dense_batches(self.cfg, name, inputs.score, emb, self._load(inputs.student), self.docs,
                                          chunks, out.count))
            out.write_part(batches, artifacts.NEGATIVES_SCHEMA)
            changed, total = _changed(pa.Table.from_batches(batches, artifacts.NEGATIVES_SCHEMA),
                                      inputs.load(inputs.previous))
            out.count("queries", self.queries.rows)
            out.count("negatives", total)
            out.count("changed_negatives", changed)
            out.extra["round"] = inputs.round
            out.extra["seconds"] = round(time.time() - self.started, 3)
            out.extra["shards"] = self.shard_summary(records)
        self._drop_model()
        self.staging.remove()
        return self.store.require(self.stage)


def _changed(new: pa.Table, previous: Artifact) -> tuple[int, int]:
    """(negatives in ``new`` that ``previous`` did not list for the same query, negatives in ``new``)."""
    def pairs(table: pa.Table) -> set[tuple[str, str]]:
        lists = table.column("doc_ids").combine_chunks()
        query = table.column("query_id").combine_chunks().take(pc.list_parent_indices(lists))
        return set(zip(query.to_pylist(), pc.list_flatten(lists).to_pylist(), strict=True))

    now = pairs(new)
    return len(now - pairs(previous.read_table(["query_id", "doc_ids"]))), len(now)


def round_labels(inputs: Any, rounds: Rounds, number: int, negatives: Artifact, prior: Sequence[Ref],
                 examples: int) -> Artifact:
    """Round ``number``'s labels: ``examples`` drawn from its negatives as the label stage draws, the pairs an
    earlier round scored (``prior``) taken from there."""
    label = RoundLabelInputs(run_dir=inputs.run_dir, cfg=rounds.label, triples=examples, corpus=inputs.corpus,
                             queries=inputs.queries, negatives=negatives.ref, teacher=rounds.teacher,
                             shard_size=rounds.shard_size, round=number, prior=tuple(prior))
    return compute(LabelJob(label))


def stop_at(step: int) -> Any:
    """A ``transformers.TrainerCallback`` that ends training at ``step``, with a checkpoint there."""
    from transformers import TrainerCallback  # slow to import: only when training

    class StopAt(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= step:
                control.should_save = control.should_training_stop = True
            return control

    return StopAt()


def number_of_rounds(steps: int, every: int) -> int:
    return math.ceil(steps / every)


def round_summary(number: int, every: int, steps: int, history: Sequence[Sequence[float]],
                  negatives: Artifact | None, labels: Artifact) -> dict[str, Any]:
    """What the manifest keeps of a round: its steps, its negatives and pairs, and its loss."""
    first, last = (number - 1) * every, min(number * every, steps)
    losses = [loss for step, loss in history if first < step <= last]
    counters = labels.counters
    return {"round": number, "steps": [first + 1, last],
            "negatives": negatives.counters.get("negatives") if negatives else None,
            "negatives_changed": negatives.counters.get("changed_negatives") if negatives else None,
            "new_pairs_scored": counters.get("scored_pairs", 0), "reused_pairs": counters.get("reused_pairs", 0),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "loss_mean": round(float(np.mean(losses)), 6) if losses else None}
