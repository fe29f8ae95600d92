"""Train: the bi-encoder with MarginMSE on the triples (GPL), MNRL on (query, passage) pairs (GenQ), or on a
user's labelled pairs (flow supervised): CoSENT, cosine or AnglE on scored pairs, MNRL on ranking pairs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyarrow as pa
from prefect import get_run_logger, task
from pydantic import Field

from gplflow.adapters import artifacts
from gplflow.adapters.checkpoints import folder as checkpoint_folder
from gplflow.adapters.checkpoints import remove as remove_checkpoints
from gplflow.adapters.errors import InputError, MissingInputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.store import Artifact, ArtifactStore
from gplflow.tasks.base import Seed, StageConfig, retry_unless_deterministic, reuse, stage_cache, stage_fingerprint
from gplflow.tasks.progress import ProgressArtifact

models = lazy("gplflow.adapters.models")  # torch: loaded when a stage computes, not when a config is read

logger = logging.getLogger(__name__)

STAGE = artifacts.MODEL
CODE_VERSION = "train-1"
QUERY_STAGES = (artifacts.QUERIES_TRAIN, artifacts.QUERIES)  # the mnrl pairs come from either


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


def _inputs(cfg: TrainConfig, base_model: str, data_fp: str, corpus_fp: str) -> dict[str, str]:
    data = "triples" if cfg.loss == "margin_mse" else "queries"
    return {"base_model": model_signature(base_model), "corpus": corpus_fp, data: data_fp}


def train_fingerprint(cfg: TrainConfig, base_model: str, data_fp: str, corpus_fp: str) -> str:
    """data_fp: the triples' fingerprint for margin_mse, the queries' for mnrl."""
    return stage_fingerprint(STAGE, cfg, _inputs(cfg, base_model, data_fp, corpus_fp), CODE_VERSION)


def run_train(
    cfg: TrainConfig,
    store: ArtifactStore,
    base_model: str,
    corpus: Artifact,
    queries: Artifact,
    triples: Artifact | None,
    callbacks: Sequence[Any] = (),
) -> Artifact:
    """Train from ``base_model`` (resuming from a checkpoint if a crashed run left one) and publish ``model/``.

    ``callbacks`` are ``transformers.TrainerCallback``s (progress reporting, tests).
    """
    data = _training_data(cfg, queries, triples)
    inputs = _inputs(cfg, base_model, data.fingerprint, corpus.fingerprint)
    fp = stage_fingerprint(STAGE, cfg, inputs, CODE_VERSION)
    if (found := reuse(store, STAGE, fp)) is not None:
        return found
    return _fit_and_publish(cfg, store, base_model, inputs, fp, lambda: _dataset(cfg, corpus, queries, data),
                            callbacks)


def pairs_inputs(base_model: str, pairs_fp: str, silver_fp: str | None = None) -> dict[str, str]:
    inputs = {"base_model": model_signature(base_model), "pairs": pairs_fp}
    return {**inputs, "silver": silver_fp} if silver_fp else inputs


def train_pairs_fingerprint(cfg: TrainConfig, base_model: str, pairs_fp: str, silver_fp: str | None = None) -> str:
    """The fingerprint of a model trained on labelled pairs (flow supervised), and on the silver pairs too
    (flow augmented_sbert): no corpus, no queries."""
    return stage_fingerprint(STAGE, cfg, pairs_inputs(base_model, pairs_fp, silver_fp), CODE_VERSION)


def run_train_pairs(cfg: TrainConfig, store: ArtifactStore, base_model: str, pairs: Artifact,
                    callbacks: Sequence[Any] = (), silver: Artifact | None = None) -> Artifact:
    """Fine-tune ``base_model`` on the ``pairs/`` artifact (flow supervised), or on the gold pairs and the
    ``silver/`` pairs a cross-encoder labelled (flow augmented_sbert, tasks/augment.py), and publish ``model/``."""
    from gplflow.adapters import trainer

    kind = pairs.manifest.get("kind", "scored")
    if cfg.loss not in PAIR_LOSSES.get(kind, ()):
        raise InputError(f"train.loss {cfg.loss!r} does not train on {kind} pairs; expected one of "
                         f"{', '.join(PAIR_LOSSES.get(kind, ()))}")
    if silver is not None and kind != "scored":
        raise InputError(f"train: silver pairs are scored pairs; the gold pairs are {kind} pairs")
    inputs = pairs_inputs(base_model, pairs.fingerprint, silver.fingerprint if silver is not None else None)
    fp = stage_fingerprint(STAGE, cfg, inputs, CODE_VERSION)
    if (found := reuse(store, STAGE, fp)) is not None:
        return found
    table = pairs.read_table()
    if silver is not None:  # gold first, then silver: the trainer's seeded sampler shuffles them together
        gold = table.select(["sentence1", "sentence2", "score"])
        table = pa.concat_tables([gold, silver.read_table(gold.column_names).cast(gold.schema)])
    build = trainer.scored_pairs_dataset if kind == "scored" else trainer.ranking_pairs_dataset
    return _fit_and_publish(cfg, store, base_model, inputs, fp, lambda: build(table), callbacks)


def _fit_and_publish(cfg: TrainConfig, store: ArtifactStore, base_model: str, inputs: dict[str, str], fp: str,
                     make_dataset: Callable[[], Any], callbacks: Sequence[Any]) -> Artifact:
    """Train from ``base_model`` on ``make_dataset()`` (resuming from a checkpoint) and publish ``model/``."""
    from gplflow.adapters import trainer  # sentence-transformers' trainer is slow to import: only when training

    model = models.load_bi_encoder(base_model, max_seq_length=cfg.max_seq_length)
    dataset = make_dataset()
    checkpoints = checkpoint_folder(store, STAGE, fp)
    with store.writer(STAGE, config=cfg.model_dump(mode="json"), inputs=inputs, code_version=CODE_VERSION) as out:
        report = trainer.fit(model, dataset, cfg, checkpoints, models.device(), callbacks)
        trainer.save_model(model, out.local_dir())
        out.extra["train"] = info = {"base_model": base_model, "examples": len(dataset), **report.as_dict()}
    remove_checkpoints(checkpoints)
    logger.info("trained %s for %d steps (resumed at %s): loss %s -> %s", cfg.loss, info["steps"],
                info["resumed_from_step"], info["loss_first"], info["loss_last"])
    return store.require(STAGE)


def _training_data(cfg: TrainConfig, queries: Artifact, triples: Artifact | None) -> Artifact:
    """The artifact the loss trains on: triples (margin_mse) or queries (mnrl)."""
    if cfg.loss == "mnrl":
        return queries
    if cfg.loss != "margin_mse":
        raise InputError(f"train: loss {cfg.loss!r} trains on labelled pairs (flow supervised), not on queries")
    if triples is None:
        raise InputError("train: loss 'margin_mse' needs the triples artifact (run the label stage first)")
    return triples


def _dataset(cfg: TrainConfig, corpus: Artifact, queries: Artifact, data: Artifact):
    """Rows for the loss: (query, positive) pairs for mnrl, (query, positive, negative, margin) for margin_mse."""
    from gplflow.adapters import trainer

    passages = trainer.passage_lookup(corpus.read_table(["doc_id", "title", "text"]))
    query_rows = queries.read_table(["query_id", "doc_id", "text"])
    if cfg.loss == "mnrl":
        return trainer.pairs_dataset(query_rows, passages)
    triples = data.read_table(["query_id", "pos_doc_id", "neg_doc_id", "margin"])
    return trainer.margin_mse_dataset(triples, trainer.query_texts(query_rows), passages)


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


def _load(store: ArtifactStore, stages: tuple[str, ...], fp: str) -> Artifact:
    for stage in stages:
        if (artifact := store.consume(stage, expect_fingerprint=fp)) is not None:
            return artifact
    raise MissingInputError(f"{store.root_url}: no valid {' or '.join(stages)} artifact with fingerprint {fp}")


def _task_fingerprint(p: dict[str, Any]) -> str:
    data_fp = p["triples_fp"] if p["cfg"].loss == "margin_mse" else p["queries_fp"]
    return train_fingerprint(p["cfg"], p["base_model"], data_fp, p["corpus_fp"])


@task(name="train bi-encoder", task_run_name="train bi-encoder", retries=1,
      persist_result=True,  # a retry resumes from the last checkpoint
      retry_condition_fn=retry_unless_deterministic,
      cache_policy=stage_cache(STAGE, _task_fingerprint))
def train_task(cfg: TrainConfig, run_dir: str, base_model: str, corpus_fp: str, queries_fp: str,
               triples_fp: str | None) -> str:
    store = ArtifactStore(run_dir)
    triples = _load(store, (artifacts.TRIPLES,), triples_fp) if triples_fp else None
    progress = ProgressArtifact.start("train-bi-encoder", cfg.steps, f"Training with {cfg.loss} for {cfg.steps} "
                                      f"steps of batch {cfg.batch_size}")
    artifact = run_train(cfg, store, base_model, _load(store, (artifacts.CORPUS,), corpus_fp),
                         _load(store, QUERY_STAGES, queries_fp), triples, callbacks=[progress_callback(progress)])
    progress.finish()
    info = artifact.manifest.get("train", {})
    get_run_logger().info("model: %s, %s steps in %ss, loss %s -> %s", cfg.loss, info.get("steps"),
                          info.get("seconds"), info.get("loss_first"), info.get("loss_last"))
    return artifact.fingerprint


@task(name="train bi-encoder on pairs", task_run_name="train bi-encoder on pairs", retries=1,
      persist_result=True,  # a retry resumes from the last checkpoint
      retry_condition_fn=retry_unless_deterministic,
      cache_policy=stage_cache(STAGE, lambda p: train_pairs_fingerprint(p["cfg"], p["base_model"], p["pairs_fp"],
                                                                                p.get("silver_fp"))))
def train_pairs_task(cfg: TrainConfig, run_dir: str, base_model: str, pairs_fp: str,
                     silver_fp: str | None = None) -> str:
    store = ArtifactStore(run_dir)
    what = "gold and silver pairs" if silver_fp else "labelled pairs"
    progress = ProgressArtifact.start("train-bi-encoder", cfg.steps, f"Training with {cfg.loss} on {what} "
                                      f"for {cfg.steps} steps of batch {cfg.batch_size}")
    silver = _load(store, (artifacts.SILVER,), silver_fp) if silver_fp else None
    artifact = run_train_pairs(cfg, store, base_model, _load(store, (artifacts.PAIRS,), pairs_fp),
                               callbacks=[progress_callback(progress)], silver=silver)
    progress.finish()
    info = artifact.manifest.get("train", {})
    get_run_logger().info("model: %s on %s, %s steps in %ss, loss %s -> %s", cfg.loss, what, info.get("steps"),
                          info.get("seconds"), info.get("loss_first"), info.get("loss_last"))
    return artifact.fingerprint
