"""Training a bi-encoder with the sentence-transformers (v6) Trainer: datasets, arguments, losses, checkpoints.

The training rows are ids (query_id, positive_id, negative_id, label) resolved to texts lazily, batch by
batch, with ``sentence_transformers.util.resolve_ids``: GPL's millions of triples reference a few hundred
thousand passages, so the texts are held once (as Arrow) rather than once per triple. Checkpoints (model,
optimizer, scheduler, RNG, step) go to a local folder outside the published artifact, and a rerun continues
from the newest complete one.

Under torchrun (``world_size`` > 1, adapters/distributed.py) the same Trainer runs DDP with the batch as the
global batch: the sampler builds the batches one process would, and each rank takes its slice of every one
(accelerate's ``split_batches``), so the data order, the steps and the schedule do not depend on the device count.
MNRL gathers the embeddings of every rank, so each query still sees the whole global batch as negatives.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
    util,
)
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.util import resolve_ids
from transformers import TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME

from gplflow.adapters import gathered_losses, models
from gplflow.adapters.checkpoints import by_step
from gplflow.adapters.checkpoints import step as checkpoint_step
from gplflow.adapters.text import passage_texts

logger = logging.getLogger(__name__)

LOSSES = ("margin_mse", "kl", "kl+margin_mse", "mnrl", "cosent", "cosine", "angle")
# The losses of the teacher's scores of (query, positive, negative_1..n) examples: MarginMSE over the n margins,
# KL between the teacher's and the student's softmax over the n + 1 candidates, and their weighted sum.
DISTILL_LOSSES = ("margin_mse", "kl", "kl+margin_mse")
# Losses of scored pairs (sentence1, sentence2, score in [0, 1]): CoSENT and AnglE rank the pairs by cosine
# (AnglE by angle difference in complex space), CosineSimilarityLoss regresses the cosine on the score.
# The score each loss teaches: MarginMSE fits dot-product margins (GPL); the others score by cosine.
SIMILARITY = {"dot": "dot", "cos_sim": "cosine"}  # train.similarity -> the similarity saved with the model
_MAX_HISTORY = 100  # loss points kept in the manifest
_KEEP_CHECKPOINTS = 2  # the newest checkpoints kept while training


class TrainSettings(Protocol):
    """What ``fit`` reads of the train stage's config, passed whole (``tasks/train.py`` TrainConfig, whose fields
    hold the defaults, the bounds and what each setting means)."""

    loss: str
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    checkpoint_every: int
    seed: int
    similarity: str
    # and, read when set (settings made before the n-tuple losses lack them): temperature (kl: DistillKLDivLoss's),
    # margin_mse_weight (kl+margin_mse: KL + margin_mse_weight x MarginMSE)


@dataclass
class TrainReport:
    """What a training run did, for the manifest."""

    global_step: int
    resumed_from_step: int | None
    seconds: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "steps": self.global_step,
            "resumed_from_step": self.resumed_from_step,
            "steps_this_run": self.global_step - (self.resumed_from_step or 0),
            "seconds": round(self.seconds, 3),
            **loss_summary(self.loss_history),
        }


def loss_summary(history: list[tuple[int, float]], keep: int = _MAX_HISTORY) -> dict:
    """First and last loss, and at most about ``keep`` (step, loss) points, evenly spaced, the last kept."""
    points = [[step, round(loss, 6)] for step, loss in history]
    if len(points) > keep:
        stride = -(-len(points) // keep)
        points = points[::stride] if (len(points) - 1) % stride == 0 else [*points[::stride], points[-1]]
    return {"loss_first": history[0][1] if history else None, "loss_last": history[-1][1] if history else None,
            "loss_history": points}


# --- datasets ---------------------------------------------------------------------------------------------


def passage_lookup(corpus: pa.Table) -> Dataset:
    """(doc_id, passage) of the corpus, passage as ``adapters/text.py`` reads it: the lookup training resolves
    passage ids in."""
    return Dataset.from_dict({"doc_id": corpus["doc_id"], "passage": passage_texts(corpus)})


def query_texts(queries: pa.Table) -> Dataset:
    """(query_id, text) of the queries artifact."""
    return Dataset.from_dict({"query_id": queries["query_id"], "text": queries["text"]})


def _check_ids(rows: pa.Table, column: str, known: Dataset, key: str, what: str) -> None:
    """A one-line error naming the first row whose id is missing from the lookup (before training starts)."""
    present = pc.is_in(rows[column], value_set=known.data.column(key).combine_chunks())
    if not pc.all(present).as_py():
        row = pc.index(present, False).as_py()
        raise ValueError(f"{what} row {row}: {column} {rows[column][row].as_py()!r} is not in the {key} lookup")


def margin_mse_dataset(triples: pa.Table, queries: Dataset, passages: Dataset) -> Dataset:
    """(query, positive, negative, label=margin) rows, texts resolved lazily from the ids of ``triples``."""
    for column, known, key in (("query_id", queries, "query_id"), ("pos_doc_id", passages, "doc_id"),
                               ("neg_doc_id", passages, "doc_id")):
        _check_ids(triples, column, known, key, "triples")
    rows = Dataset.from_dict({
        "query_id": triples["query_id"],
        "positive_id": triples["pos_doc_id"],
        "negative_id": triples["neg_doc_id"],
        "label": pc.cast(triples["margin"], pa.float32()),
    })
    rows.set_transform(resolve_ids({
        "query_id": (queries, "query_id", "text"),
        "positive_id": (passages, "doc_id", "passage"),
        "negative_id": (passages, "doc_id", "passage"),
    }))
    return rows


def tuples_dataset(examples: pa.Table, queries: Dataset, passages: Dataset) -> Dataset:
    """(query, positive, negative_1..n, label=[teacher score of the positive, of each negative]) rows, texts resolved
    lazily: the labels DistillKLDivLoss takes, and MarginMSELoss turns into the n margins. ``examples`` holds
    triples (``neg_doc_id``, ``neg_score``) or n-tuples (``neg_doc_ids``, ``neg_scores`` lists)."""
    listed = "neg_doc_ids" in examples.column_names
    negatives = examples["neg_doc_ids"].combine_chunks() if listed else None
    n = len(negatives[0]) if listed and len(negatives) else 1
    for column, known, key in (("query_id", queries, "query_id"), ("pos_doc_id", passages, "doc_id")):
        _check_ids(examples, column, known, key, "triples")
    neg_ids = pc.list_flatten(negatives).to_numpy(zero_copy_only=False).reshape(-1, n) if listed else \
        examples["neg_doc_id"].to_numpy(zero_copy_only=False)[:, None]
    _check_ids(pa.table({"neg_doc_id": neg_ids.ravel()}), "neg_doc_id", passages, "doc_id", "triples")
    neg_scores = pc.list_flatten(examples["neg_scores"].combine_chunks()).to_numpy(zero_copy_only=False) if listed \
        else examples["neg_score"].to_numpy(zero_copy_only=False)
    scores = np.concatenate([examples["pos_score"].to_numpy(zero_copy_only=False)[:, None],
                             neg_scores.reshape(-1, n)], axis=1).astype(np.float32)
    negative_ids = {f"negative_{i + 1}_id": neg_ids[:, i] for i in range(n)}
    rows = Dataset.from_dict({"query_id": examples["query_id"], "positive_id": examples["pos_doc_id"],
                              **negative_ids, "label": scores.tolist()})
    rows.set_transform(resolve_ids({
        "query_id": (queries, "query_id", "text"),
        "positive_id": (passages, "doc_id", "passage"),
        **{name: (passages, "doc_id", "passage") for name in negative_ids},
    }))
    return rows


def pairs_dataset(queries: pa.Table, passages: Dataset) -> Dataset:
    """(query, positive) rows for MNRL: each generated query with the passage it was generated from."""
    _check_ids(queries, "doc_id", passages, "doc_id", "queries")
    rows = Dataset.from_dict({"query_id": queries["query_id"], "positive_id": queries["doc_id"]})
    rows.set_transform(resolve_ids({
        "query_id": (query_texts(queries), "query_id", "text"),
        "positive_id": (passages, "doc_id", "passage"),
    }))
    return rows


def scored_pairs_dataset(pairs: pa.Table) -> Dataset:
    """(sentence1, sentence2, label=score) rows of the ``pairs/`` artifact, for the scored-pair losses."""
    return Dataset.from_dict({"sentence1": pairs["sentence1"], "sentence2": pairs["sentence2"],
                              "label": pc.cast(pairs["score"], pa.float32())})


def ranking_pairs_dataset(pairs: pa.Table) -> Dataset:
    """(anchor, positive[, negative]) rows of the ``pairs/`` artifact, for MNRL (in-batch negatives, and the
    row's own negative when the file gave one)."""
    columns = [c for c in ("anchor", "positive", "negative") if c in pairs.column_names]
    return Dataset.from_dict({c: pairs[c] for c in columns})


def make_loss(name: str, model: SentenceTransformer, similarity: str = "dot", world_size: int = 1,
              temperature: float = 1.0, margin_mse_weight: float = 1.0) -> torch.nn.Module:
    """MarginMSE (GPL), KL over the n + 1 candidates (``temperature``) or KL + ``margin_mse_weight`` x MarginMSE,
    the student scoring by dot product (the paper) or cosine similarity; MultipleNegativesRanking with in-batch
    negatives (GenQ, and ranking pairs); or a scored-pair loss.

    With ``world_size`` > 1, MNRL gathers every rank's embeddings (with their gradients), so the negatives are
    the global batch, as in one process, and so do CoSENT and AnglE; the per-example losses need nothing of the
    other ranks."""
    if name in DISTILL_LOSSES:
        if similarity not in SIMILARITY:
            raise ValueError(f"train.similarity {similarity!r}: expected one of {', '.join(SIMILARITY)}")
        score = util.pairwise_dot_score if similarity == "dot" else util.pairwise_cos_sim
        margin_mse = losses.MarginMSELoss(model, similarity_fct=score)
        if name == "margin_mse":
            return margin_mse
        kl = losses.DistillKLDivLoss(model, similarity_fct=score, temperature=temperature)
        return kl if name == "kl" else WeightedLoss(model, [(1.0, kl), (margin_mse_weight, margin_mse)])
    if name == "mnrl":
        return losses.MultipleNegativesRankingLoss(model, gather_across_devices=world_size > 1)
    if name == "cosent":  # CoSENT and AnglE rank the batch's pairs: over the global batch under torchrun
        return (gathered_losses.GatheredCoSENTLoss if world_size > 1 else losses.CoSENTLoss)(model)
    if name == "cosine":
        return losses.CosineSimilarityLoss(model)
    if name == "angle":
        return (gathered_losses.GatheredAnglELoss if world_size > 1 else losses.AnglELoss)(model)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")


class WeightedLoss(torch.nn.Module):
    """The weighted sum of losses that read the same columns and labels, the embeddings computed once."""

    def __init__(self, model: SentenceTransformer, parts: Sequence[tuple[float, torch.nn.Module]]):
        super().__init__()
        self.model, self.weights = model, [w for w, _ in parts]
        self.parts = torch.nn.ModuleList([loss for _, loss in parts])

    def forward(self, sentence_features: Sequence[dict[str, torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
        embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return sum(w * loss.compute_loss_from_embeddings(embeddings, labels)
                   for w, loss in zip(self.weights, self.parts, strict=True))


# --- model ------------------------------------------------------------------------------------------------


def offline_model_card(model: SentenceTransformer) -> SentenceTransformer:
    """Keep model-card generation off the Hub (it would look up the base model and datasets there)."""
    model.model_card_data.local_files_only = True
    return model


def save_model(model: SentenceTransformer, folder: Path) -> None:
    """Save a sentence-transformers folder (``SentenceTransformer(folder)`` loads it)."""
    offline_model_card(model).save(str(folder))


# --- checkpoints ------------------------------------------------------------------------------------------


def latest_checkpoint(folder: Path, clean: bool = True) -> Path | None:
    """The newest complete checkpoint; incomplete ones (killed while saving) are removed unless ``clean`` is off
    (the ranks of a distributed job: their launcher cleaned the folder before they started).

    The Trainer writes ``trainer_state.json`` last, so a checkpoint without it is incomplete.
    """
    if not folder.is_dir():
        return None
    found = by_step(p for p in folder.iterdir() if p.is_dir())
    complete = [p for p in found if (p / TRAINER_STATE_NAME).is_file()]
    for path in found if clean else ():
        if path not in complete:
            logger.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


# --- training ---------------------------------------------------------------------------------------------


class _Trainer(SentenceTransformerTrainer):
    """The sentence-transformers Trainer, saving on the process that should save: its ``_save`` assumes only
    process zero calls it, while transformers 5 calls ``_save`` on every rank (and checks inside its own), so
    under DDP every rank would write the same checkpoint files at once."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            super()._save(output_dir, state_dict)


def training_args(cfg: TrainSettings, output_dir: Path, dev: str, bf16: bool = False,
                  world_size: int = 1) -> SentenceTransformerTrainingArguments:
    """Trainer arguments: fixed steps, seeded order, checkpoints, no evaluation, no trackers.

    ``bf16``: bf16 autocast (fp32 master weights), on GPUs and on CPUs with AMX alike; a GPU without bf16 gets
    fp16 instead. ``world_size`` > 1 (a torchrun rank): ``batch_size`` is the global batch, split over the ranks.
    """
    return SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_steps=min(cfg.warmup_steps, cfg.steps),  # an int >= 1 is a step count (a float < 1 a ratio)
        seed=cfg.seed,
        data_seed=cfg.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES if cfg.loss == "mnrl" else BatchSamplers.BATCH_SAMPLER,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=_KEEP_CHECKPOINTS,
        eval_strategy="no",
        logging_steps=max(1, min(100, cfg.steps // 100)),
        report_to="none",
        bf16=bf16,
        fp16=dev == "cuda" and not models.bf16_supported(dev),
        use_cpu=dev == "cpu",
        dataloader_num_workers=0,
        **(_distributed_args(dev) if world_size > 1 else {}),
    )


def _distributed_args(dev: str) -> dict:
    """A rank's extra arguments: each global batch split over the ranks (the sampler runs at the global batch
    size); an epoch's last, incomplete batch skipped, since it cannot be split evenly; rank 0 reports progress to
    the launcher, so no progress bar."""
    return {"accelerator_config": {"split_batches": True}, "dataloader_drop_last": True, "disable_tqdm": True,
            "ddp_backend": "nccl" if dev == "cuda" else "gloo"}


def fit(
    model: SentenceTransformer,
    dataset: Dataset,
    cfg: TrainSettings,
    checkpoints: Path,
    dev: str,
    callbacks: Sequence[TrainerCallback] = (),
    world_size: int = 1,
) -> TrainReport:
    """Train ``model`` in place for ``cfg.steps`` steps, resuming from the newest checkpoint if there is one.

    ``world_size`` > 1: this process is one rank of a torchrun job (adapters/distributed.py)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    # saved with the model, so users (and the evaluate stage) score as it was trained
    model.similarity_fn_name = SIMILARITY[cfg.similarity] if cfg.loss in DISTILL_LOSSES else "cosine"
    resume = latest_checkpoint(checkpoints, clean=world_size == 1)
    if resume is not None and (checkpoint_step(resume) or 0) >= cfg.steps:
        return _from_final_checkpoint(model, resume)  # the Trainer would run one step past max_steps
    if resume is not None:
        logger.info("resuming training from %s", resume)
    trainer = _Trainer(
        model=offline_model_card(model),
        args=training_args(cfg, checkpoints, dev, bf16=models.bf16_pays(model, dev), world_size=world_size),
        train_dataset=dataset,
        loss=make_loss(cfg.loss, model, cfg.similarity, world_size, getattr(cfg, "temperature", 1.0),
                       getattr(cfg, "margin_mse_weight", 1.0)),
        callbacks=list(callbacks),
    )
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException:
        # removes a checkpoint the failure left half-written (a full disk); a torchrun job's launcher does it
        latest_checkpoint(checkpoints, clean=world_size == 1)
        raise
    return TrainReport(
        global_step=trainer.state.global_step,
        resumed_from_step=checkpoint_step(resume) if resume is not None else None,
        seconds=time.perf_counter() - started,
        loss_history=_losses(trainer.state),
    )


def _losses(state: TrainerState) -> list[tuple[int, float]]:
    return [(int(entry["step"]), float(entry["loss"])) for entry in state.log_history if "loss" in entry]


def _from_final_checkpoint(model: SentenceTransformer, checkpoint: Path) -> TrainReport:
    """A run that crashed after its last checkpoint (while saving or publishing): take the weights as they are."""
    logger.info("training already finished in %s; using its weights", checkpoint)
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    trained = SentenceTransformer(str(checkpoint), device=str(model.device), local_files_only=True)
    model.load_state_dict(trained.state_dict())
    return TrainReport(global_step=state.global_step, resumed_from_step=state.global_step, seconds=0.0,
                       loss_history=_losses(state))
