"""Train: the bi-encoder with MarginMSE on the triples (GPL), MNRL on (query, passage) pairs (GenQ), or on a
user's labelled pairs (flow supervised): CoSENT, cosine or AnglE on scored pairs, MNRL on ranking pairs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyarrow as pa
from prefect import get_run_logger
from pydantic import Field

from gplflow.adapters import artifacts
from gplflow.adapters.checkpoints import folder as checkpoint_folder
from gplflow.adapters.checkpoints import remove as remove_checkpoints
from gplflow.adapters.errors import InputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.store import Artifact
from gplflow.tasks.base import Ref, Seed, StageConfig, StageInputs, stage_task
from gplflow.tasks.planning import CALIBRATION_STEPS, StagePlan, StepClock, pseudo_query
from gplflow.tasks.progress import ProgressArtifact

models = lazy("gplflow.adapters.models")  # torch: loaded when a stage computes, not when a config is read

logger = logging.getLogger(__name__)

STAGE = artifacts.MODEL
CODE_VERSION = "train-1"


# the losses each kind of labelled pairs (tasks/pairs.py) trains with; the first is flow supervised's default
PAIR_LOSSES = {"scored": ("cosent", "cosine", "angle"), "ranking": ("mnrl",)}


class TrainConfig(StageConfig):
    loss: Literal["margin_mse", "mnrl", "cosent", "cosine", "angle"] = "margin_mse"
    # margin_mse: how the student scores a pair. dot (the paper) suits a cross-encoder's logit margins;
    # cos_sim suits a bi-encoder teacher's cosine margins (a dot-product student would shrink its vectors)
    similarity: Literal["dot", "cos_sim"] = "dot"
    steps: int = Field(default=140_000, gt=0)
    batch_size: int = Field(default=32, gt=0)
    max_seq_length: int = Field(default=350, gt=0)
    learning_rate: float = Field(default=2e-5, ge=0.0, allow_inf_nan=False)  # 0 freezes the weights (a test)
    warmup_steps: int = Field(default=1000, ge=0)  # clamped to `steps`
    checkpoint_every: int = Field(default=10_000, gt=0)
    seed: Seed = 42


class TrainInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What training on generated queries reads: the start model, the corpus, the training queries and, for
    margin_mse, the triples."""

    cfg: TrainConfig
    base_model: str  # the model training starts from (the pretrained one when pretraining ran)
    corpus: Ref
    queries: Ref  # the training queries (queries-train when some are held out)
    triples: Ref | None = None  # margin_mse only

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        data = ("triples", self.triples) if self.cfg.loss == "margin_mse" else ("queries", self.queries)
        if data[1] is None:
            raise InputError("train: loss 'margin_mse' needs the triples artifact (run the label stage first)")
        return self.cfg.model_dump(mode="json"), {"base_model": model_signature(self.base_model),
                                                  "corpus": self.corpus.fingerprint, data[0]: data[1].fingerprint}


class TrainPairsInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What training on labelled pairs reads (flow supervised), and on the silver pairs too (augmented_sbert)."""

    cfg: TrainConfig
    base_model: str
    pairs: Ref
    silver: Ref | None = None

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        inputs = {"base_model": model_signature(self.base_model), "pairs": self.pairs.fingerprint}
        if self.silver is not None:
            inputs["silver"] = self.silver.fingerprint
        return self.cfg.model_dump(mode="json"), inputs


def run_train(inputs: TrainInputs, callbacks: Sequence[Any] = ()) -> Artifact:
    """Train from the start model (resuming from a checkpoint if a crashed run left one) and publish ``model/``.

    ``callbacks`` are ``transformers.TrainerCallback``s (progress reporting, tests).
    """
    cfg = inputs.cfg
    if cfg.loss not in ("mnrl", "margin_mse"):
        raise InputError(f"train: loss {cfg.loss!r} trains on labelled pairs (flow supervised), not on queries")
    if (found := inputs.reuse()) is not None:
        return found
    corpus, queries = inputs.load(inputs.corpus), inputs.load(inputs.queries)
    triples = inputs.load(inputs.triples) if cfg.loss == "margin_mse" and inputs.triples is not None else None
    return _fit_and_publish(inputs, lambda: _dataset(cfg, corpus, queries, triples), callbacks)


def run_train_pairs(inputs: TrainPairsInputs, callbacks: Sequence[Any] = ()) -> Artifact:
    """Fine-tune the start model on the ``pairs/`` artifact (flow supervised), or on the gold pairs and the
    ``silver/`` pairs a cross-encoder labelled (flow augmented_sbert, tasks/augment.py), and publish ``model/``."""
    from gplflow.adapters import trainer

    cfg = inputs.cfg
    pairs = inputs.load(inputs.pairs)
    silver = inputs.load(inputs.silver) if inputs.silver is not None else None
    kind = pairs.manifest.get("kind", "scored")
    if cfg.loss not in PAIR_LOSSES.get(kind, ()):
        raise InputError(f"train.loss {cfg.loss!r} does not train on {kind} pairs; expected one of "
                         f"{', '.join(PAIR_LOSSES.get(kind, ()))}")
    if silver is not None and kind != "scored":
        raise InputError(f"train: silver pairs are scored pairs; the gold pairs are {kind} pairs")
    if (found := inputs.reuse()) is not None:
        return found
    table = pairs.read_table()
    if silver is not None:  # gold first, then silver: the trainer's seeded sampler shuffles them together
        gold = table.select(["sentence1", "sentence2", "score"])
        table = pa.concat_tables([gold, silver.read_table(gold.column_names).cast(gold.schema)])
    build = trainer.scored_pairs_dataset if kind == "scored" else trainer.ranking_pairs_dataset
    return _fit_and_publish(inputs, lambda: build(table), callbacks)


def _fit_and_publish(inputs: TrainInputs | TrainPairsInputs, make_dataset: Callable[[], Any],
                     callbacks: Sequence[Any]) -> Artifact:
    """Train from the start model on ``make_dataset()`` (resuming from a checkpoint) and publish ``model/``."""
    from gplflow.adapters import trainer  # sentence-transformers' trainer is slow to import: only when training

    cfg, store = inputs.cfg, inputs.store
    model = models.load_bi_encoder(inputs.base_model, max_seq_length=cfg.max_seq_length)
    dataset = make_dataset()
    checkpoints = checkpoint_folder(store, STAGE, inputs.fingerprint())
    config, fps = inputs.fingerprint_parts()
    with store.writer(STAGE, config=config, inputs=fps, code_version=CODE_VERSION) as out:
        report = trainer.fit(model, dataset, cfg, checkpoints, models.device(), callbacks)
        trainer.save_model(model, out.local_dir())
        out.extra["train"] = info = {"base_model": inputs.base_model, "examples": len(dataset), **report.as_dict()}
    remove_checkpoints(checkpoints)
    logger.info("trained %s for %d steps (resumed at %s): loss %s -> %s", cfg.loss, info["steps"],
                info["resumed_from_step"], info["loss_first"], info["loss_last"])
    return store.require(STAGE)


def _dataset(cfg: TrainConfig, corpus: Artifact, queries: Artifact, triples: Artifact | None):
    """Rows for the loss: (query, positive) pairs for mnrl, (query, positive, negative, margin) for margin_mse."""
    from gplflow.adapters import trainer

    passages = trainer.passage_lookup(corpus.read_table(["doc_id", "title", "text"]))
    query_rows = queries.read_table(["query_id", "doc_id", "text"])
    if cfg.loss == "mnrl":
        return trainer.pairs_dataset(query_rows, passages)
    if triples is None:
        raise InputError("train: loss 'margin_mse' needs the triples artifact (run the label stage first)")
    rows = triples.read_table(["query_id", "pos_doc_id", "neg_doc_id", "margin"])
    return trainer.margin_mse_dataset(rows, trainer.query_texts(query_rows), passages)


def progress_callback(progress: ProgressArtifact) -> Any:
    """A ``transformers.TrainerCallback`` that moves ``progress`` to the trainer's global step.

    ``progress`` limits how often the UI is updated, so calling it every step is cheap. A resumed run starts
    at its checkpoint's step.
    """
    from transformers import TrainerCallback  # slow to import: only when training

    class TrainProgress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress.set(state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress.set(state.global_step)

    return TrainProgress()


# --- what the run's report and plan ask of this stage -----------------------------------------------------

def settings(cfg: Any) -> str:
    t = cfg.train
    return (f"{t.steps} steps of batch {t.batch_size}, lr {t.learning_rate:g}, max length {t.max_seq_length}, "
            f"seed {t.seed}")


def estimate(cfg: Any, n: int) -> StagePlan:
    t = cfg.train
    return StagePlan(t.steps, "steps", f"{t.loss}, {t.steps} steps of batch {t.batch_size} "
                     f"({t.steps * t.batch_size} examples)",
                     measure=lambda resolved, passages: _rate(t, resolved, passages))


def _rate(t: TrainConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    """Steps per second of the trainer on corpus passages (steps after the first)."""
    import tempfile
    from pathlib import Path

    from gplflow.adapters import trainer

    n = CALIBRATION_STEPS * t.batch_size
    docs = pa.table({"doc_id": [f"d{i}" for i in range(n)], "title": [""] * n, "text": passages[:n]})
    queries = pa.table({"query_id": [f"q{i}" for i in range(n)], "doc_id": docs["doc_id"],
                        "text": [pseudo_query(p) for p in passages[:n]]})
    lookup = trainer.passage_lookup(docs)
    if t.loss in PAIR_LOSSES["scored"]:
        dataset = trainer.scored_pairs_dataset(pa.table({"sentence1": queries["text"], "sentence2": passages[:n],
                                                         "score": [float(i % 2) for i in range(n)]}))
    elif t.loss == "mnrl":
        dataset = trainer.pairs_dataset(queries, lookup)
    else:
        triples = pa.table({"query_id": queries["query_id"], "pos_doc_id": docs["doc_id"],
                            "neg_doc_id": [f"d{(i + 1) % n}" for i in range(n)], "margin": [0.0] * n})
        dataset = trainer.margin_mse_dataset(triples, trainer.query_texts(queries), lookup)
    steps = StepClock()
    settings = t.model_copy(update={"steps": CALIBRATION_STEPS, "warmup_steps": 0, "checkpoint_every": 10**9})
    model = models.load_bi_encoder(resolved["base"], max_seq_length=t.max_seq_length)
    with tempfile.TemporaryDirectory(prefix="gplflow-plan-train-") as out:
        trainer.fit(model, dataset, settings, Path(out), models.device(), [steps.callback()])
    return steps.rate()


@stage_task("train bi-encoder", retries=1)  # a retry resumes from the last checkpoint
def train_task(inputs: TrainInputs) -> str:
    cfg = inputs.cfg
    progress = ProgressArtifact.start("train-bi-encoder", cfg.steps, f"Training with {cfg.loss} for {cfg.steps} "
                                      f"steps of batch {cfg.batch_size}")
    artifact = run_train(inputs, callbacks=[progress_callback(progress)])
    progress.finish()
    _log_trained(artifact, cfg.loss)
    return artifact.fingerprint


@stage_task("train bi-encoder on pairs", retries=1)
def train_pairs_task(inputs: TrainPairsInputs) -> str:
    cfg = inputs.cfg
    what = "gold and silver pairs" if inputs.silver else "labelled pairs"
    progress = ProgressArtifact.start("train-bi-encoder", cfg.steps, f"Training with {cfg.loss} on {what} "
                                      f"for {cfg.steps} steps of batch {cfg.batch_size}")
    artifact = run_train_pairs(inputs, callbacks=[progress_callback(progress)])
    progress.finish()
    _log_trained(artifact, f"{cfg.loss} on {what}")
    return artifact.fingerprint


def _log_trained(artifact: Artifact, what: str) -> None:
    info = artifact.manifest.get("train", {})
    get_run_logger().info("model: %s, %s steps in %ss, loss %s -> %s", what, info.get("steps"),
                          info.get("seconds"), info.get("loss_first"), info.get("loss_last"))
