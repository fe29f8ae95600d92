"""Train: the bi-encoder with MarginMSE on the triples (GPL), MNRL on (query, passage) pairs (GenQ), or on a
user's labelled pairs (flow supervised): CoSENT, cosine or AnglE on scored pairs, MNRL on ranking pairs.

On one device the training runs in this process. On several (``train.devices``) the stage runs the same code as
a torchrun job (adapters/distributed.py): every rank rebuilds the inputs from the job file and trains its slice
of each global batch (``train_on_rank``); rank 0 alone writes the checkpoints and publishes the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pyarrow as pa
from prefect import get_run_logger
from pydantic import Field, model_validator

from gplflow.adapters import artifacts, distributed
from gplflow.adapters.checkpoints import folder as checkpoint_folder
from gplflow.adapters.checkpoints import remove as remove_checkpoints
from gplflow.adapters.checkpoints import step as checkpoint_step
from gplflow.adapters.errors import InputError
from gplflow.adapters.lazy import lazy
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.store import Artifact
from gplflow.tasks import remine
from gplflow.tasks.base import AutoOrPositive, Ref, Seed, StageConfig, StageInputs, compute, stage_task
from gplflow.tasks.label import label_config
from gplflow.tasks.planning import CALIBRATION_STEPS, StagePlan, StepClock, pseudo_query
from gplflow.tasks.progress import ProgressArtifact
from gplflow.tasks.remine import Rounds

models = lazy("gplflow.adapters.models")  # torch: loaded when a stage computes, not when a config is read

logger = logging.getLogger(__name__)

STAGE = artifacts.MODEL
CODE_VERSION = "train-1"


# the losses each kind of labelled pairs (tasks/pairs.py) trains with; the first is flow supervised's default
PAIR_LOSSES = {"scored": ("cosent", "cosine", "angle"), "ranking": ("mnrl",)}


# the losses of the teacher's labels (triples, or n-tuples with label.negatives_per_example): GPL's flow
DISTILL_LOSSES = ("margin_mse", "kl", "kl+margin_mse")


class TrainConfig(StageConfig):
    # margin_mse: MarginMSE over each example's margins (GPL); kl: KL divergence between the teacher's and the
    # student's softmax over the positive and the negatives (sentence-transformers' DistillKLDivLoss); kl+margin_mse:
    # KL + margin_mse_weight x MarginMSE
    loss: Literal["margin_mse", "kl", "kl+margin_mse", "mnrl", "cosent", "cosine", "angle"] = "margin_mse"
    temperature: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # kl: softens both softmaxes
    margin_mse_weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)  # kl+margin_mse
    # how the student scores a pair for the teacher's losses. dot (the paper) suits a cross-encoder's logit margins;
    # cos_sim suits a bi-encoder teacher's cosine margins (a dot-product student would shrink its vectors)
    similarity: Literal["dot", "cos_sim"] = "dot"
    steps: int = Field(default=140_000, gt=0)
    batch_size: int = Field(default=32, gt=0)
    max_seq_length: int = Field(default=350, gt=0)
    learning_rate: float = Field(default=2e-5, ge=0.0, allow_inf_nan=False)  # 0 freezes the weights (a test)
    warmup_steps: int = Field(default=1000, ge=0)  # clamped to `steps`
    checkpoint_every: int = Field(default=10_000, gt=0)
    seed: Seed = 42
    # 'auto': every visible GPU (1 on a CPU); N > 1 trains as a torchrun job of N processes (DDP; on a CPU, N
    # gloo processes). batch_size stays the global batch (batch_size / N per device). Where a model trains, not
    # what it is: left out of the fingerprint, so a model trained on 4 GPUs is reused by a run on 2.
    devices: AutoOrPositive = "auto"
    # re-mining rounds (R-GPL, tasks/remine.py): every K steps the student re-mines the negatives and the new pairs
    # are labelled; None: mined once, before training (GPL)
    remine_every: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.devices != "auto":
            check_batch(self.batch_size, int(self.devices))
        if self.remine_every is not None and self.remine_every >= self.steps:
            raise ValueError(f"train.remine_every {self.remine_every} is not below train.steps {self.steps}: "
                             "training would end before the first re-mining; lower it or unset it")
        return self


NOT_FINGERPRINTED = {"devices"}


def _unused(cfg: TrainConfig) -> set[str]:
    """Settings the configured loss does not read: left out of the fingerprint, so a model trained before they
    existed keeps its fingerprint."""
    unused = (set() if "kl" in cfg.loss else {"temperature"}) | (set() if cfg.remine_every else {"remine_every"})
    return unused if cfg.loss == "kl+margin_mse" else unused | {"margin_mse_weight"}


def check_batch(batch_size: int, devices: int, why: str = "") -> None:
    """The global batch splits evenly over the devices, or a ValueError naming both numbers."""
    distributed.check_batch(batch_size, devices, "train", why)


def devices(cfg: TrainConfig) -> int:
    """How many processes train on this host: ``cfg.devices``, 'auto' being every visible GPU (1 on a CPU); an
    InputError when more GPUs are asked for than are visible, or when the batch does not divide over the job's
    processes (adapters/distributed.py ``device_count``, which pretraining and the cross-encoder share)."""
    return distributed.device_count(cfg.devices, cfg.batch_size, "train")


def _fingerprinted(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=NOT_FINGERPRINTED | _unused(cfg))


class TrainInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What training on generated queries reads: the start model, the corpus, the training queries and, for
    margin_mse, the triples."""

    cfg: TrainConfig
    base_model: str  # the model training starts from (the pretrained one when pretraining ran)
    corpus: Ref
    queries: Ref  # the training queries (queries-train when some are held out)
    triples: Ref | None = None  # the teacher's losses only (DISTILL_LOSSES)
    rounds: Rounds | None = None  # train.remine_every: how the rounds mine and label

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        data = ("triples", self.triples) if self.cfg.loss in DISTILL_LOSSES else ("queries", self.queries)
        if data[1] is None:
            raise InputError(f"train: loss {self.cfg.loss!r} needs the triples artifact (run the label stage first)")
        config, inputs = _fingerprinted(self.cfg), {"base_model": model_signature(self.base_model),
                                                    "corpus": self.corpus.fingerprint, data[0]: data[1].fingerprint}
        if self.cfg.remine_every and self.rounds is not None:
            r = self.rounds
            config["rounds"] = {"mine": r.mine.model_dump(mode="json"), "label": label_config(r.label)}
            inputs |= {"teacher": model_signature(r.teacher), "negatives": r.negatives.fingerprint,
                       "queries": self.queries.fingerprint}
        return config, inputs


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
        return _fingerprinted(self.cfg), inputs


def run_train(inputs: TrainInputs, callbacks: Sequence[Any] = (), rounds_runner: RoundRunner | None = None) -> Artifact:
    """Train from the start model (resuming from a checkpoint if a crashed run left one) and publish ``model/``.

    ``callbacks`` are ``transformers.TrainerCallback``s (progress reporting, tests); ``rounds_runner(number, work)``
    runs each re-mining round's ``work()`` (the train task: as a Prefect task of its own; by default, in place).
    """
    cfg = inputs.cfg
    if cfg.loss not in ("mnrl", *DISTILL_LOSSES):
        raise InputError(f"train: loss {cfg.loss!r} trains on labelled pairs (flow supervised), not on queries")
    if (found := inputs.reuse()) is not None:
        return found
    return _fit_and_publish(inputs, _queries_data(inputs), callbacks, rounds_runner)


def _queries_data(inputs: TrainInputs) -> Callable[[], Any]:
    """The input artifacts of training on queries, loaded (verified), and how their rows become the dataset."""
    cfg = inputs.cfg
    corpus, queries = inputs.load(inputs.corpus), inputs.load(inputs.queries)
    triples = inputs.load(inputs.triples) if cfg.loss in DISTILL_LOSSES and inputs.triples is not None else None
    return lambda: _dataset(cfg, corpus, queries, triples)


def run_train_pairs(inputs: TrainPairsInputs, callbacks: Sequence[Any] = ()) -> Artifact:
    """Fine-tune the start model on the ``pairs/`` artifact (flow supervised), or on the gold pairs and the
    ``silver/`` pairs a cross-encoder labelled (flow augmented_sbert, tasks/augment.py), and publish ``model/``."""
    make_dataset = _pairs_data(inputs)
    if (found := inputs.reuse()) is not None:
        return found
    return _fit_and_publish(inputs, make_dataset, callbacks)


def _pairs_data(inputs: TrainPairsInputs) -> Callable[[], Any]:
    """The labelled pairs (and silver pairs) loaded and checked against the loss, and how they become the dataset."""
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

    def build() -> Any:
        table = pairs.read_table()
        if silver is not None:  # gold first, then silver: the trainer's seeded sampler shuffles them together
            gold = table.select(["sentence1", "sentence2", "score"])
            table = pa.concat_tables([gold, silver.read_table(gold.column_names).cast(gold.schema)])
        return (trainer.scored_pairs_dataset if kind == "scored" else trainer.ranking_pairs_dataset)(table)

    return build


def _fit_and_publish(inputs: TrainInputs | TrainPairsInputs, make_dataset: Callable[[], Any],
                     callbacks: Sequence[Any], rounds_runner: RoundRunner | None = None) -> Artifact:
    """Train from the start model on ``make_dataset()`` (resuming from a checkpoint) and publish ``model/``: in
    this process on one device, as a torchrun job on several."""
    count = devices(inputs.cfg)
    checkpoints = checkpoint_folder(inputs.store, STAGE, inputs.fingerprint())
    if inputs.cfg.remine_every and count > 1:
        raise InputError(f"train.remine_every: re-mining rounds train on one device for now, not {count} "
                         "(set train.devices: 1)")
    if distributed.in_process(count) or _finished(checkpoints, inputs.cfg.steps):
        _train(inputs, make_dataset, callbacks, rounds_runner=rounds_runner)
    else:
        payload = {"kind": type(inputs).__name__, "inputs": inputs.model_dump(mode="json")}
        distributed.launch(checkpoints / "job", count, f"{__name__}:train_on_rank", payload, what="train",
                           on_event=_replay(callbacks, inputs.cfg.steps))
    remove_checkpoints(checkpoints)
    return inputs.store.require(STAGE)


def _train(inputs: TrainInputs | TrainPairsInputs, make_dataset: Callable[[], Any], callbacks: Sequence[Any],
           world_size: int = 1, rounds_runner: RoundRunner | None = None) -> None:
    """Train on this process's device; the one process, or rank 0 of a torchrun job, publishes ``model/`` with the
    world size and every rank's device in its manifest."""
    from gplflow.adapters import trainer  # sentence-transformers' trainer is slow to import: only when training

    cfg, store = inputs.cfg, inputs.store
    model = models.load_bi_encoder(inputs.base_model, max_seq_length=cfg.max_seq_length)
    dataset = make_dataset()
    checkpoints = checkpoint_folder(store, STAGE, inputs.fingerprint())
    if not distributed.is_main():
        trainer.fit(model, dataset, cfg, checkpoints, models.device(), callbacks, world_size)
        distributed.devices_used()  # a collective: rank 0 waits for every rank's answer
        return
    config, fps = inputs.fingerprint_parts()
    with store.writer(STAGE, config=config, inputs=fps, code_version=CODE_VERSION) as out:
        rounds: list[dict[str, Any]] = []
        if isinstance(inputs, TrainInputs) and cfg.remine_every:
            report, rounds = _fit_rounds(inputs, model, dataset, checkpoints, callbacks, rounds_runner)
        else:
            report = trainer.fit(model, dataset, cfg, checkpoints, models.device(), callbacks, world_size)
        used = distributed.devices_used()
        trainer.save_model(model, out.local_dir())
        out.extra["train"] = info = {"base_model": inputs.base_model, "examples": len(dataset), **report.as_dict(),
                                     "world_size": world_size, "devices": used}
        if rounds:
            info["rounds"] = rounds
    logger.info("trained %s for %d steps (resumed at %s) on %d device(s): loss %s -> %s", cfg.loss, info["steps"],
                info["resumed_from_step"], world_size, info["loss_first"], info["loss_last"])


RoundRunner = Callable[[int, Callable[[], None]], None]


def _fit_rounds(inputs: TrainInputs, model: Any, first: Any, checkpoints: Any, callbacks: Sequence[Any],
                runner: RoundRunner | None) -> tuple[Any, list[dict[str, Any]]]:
    """Train in rounds of ``train.remine_every`` steps (tasks/remine.py): round 1 on ``first`` (the label stage's
    examples), each later one on the negatives the student re-mined and their new labels, one optimizer and schedule
    throughout (each round resumes the previous one's checkpoint). Returns the training report and the rounds."""
    from gplflow.adapters import trainer

    cfg, rounds = inputs.cfg, inputs.rounds
    every = cfg.remine_every or cfg.steps
    if rounds is None or inputs.triples is None:
        raise InputError("train.remine_every: the rounds need the label stage's examples and the mine settings")
    per_round = every * cfg.batch_size
    if len(first) != per_round:
        raise InputError(f"train.remine_every: each round trains on remine_every x batch_size = {per_round} examples "
                         f"(one epoch), but the label stage made {len(first)}; leave label.triples at auto")
    made: list[tuple[Artifact | None, Artifact]] = [(None, inputs.load(inputs.triples))]
    negatives = inputs.load(rounds.negatives)
    report: list[Any] = []
    total = remine.number_of_rounds(cfg.steps, every)
    for number in range(1, total + 1):

        def work(number: int = number) -> None:
            nonlocal negatives
            dataset, end = first, min(number * every, cfg.steps)
            if number > 1:
                # absolute: pool workers and device processes load it too (from the run directory they share)
                student = (checkpoints / f"checkpoint-{(number - 1) * every}").resolve()
                negatives = compute(remine.RoundMineJob(remine.RoundMineInputs(
                    run_dir=inputs.run_dir, cfg=rounds.mine, corpus=inputs.corpus, queries=inputs.queries,
                    previous=negatives.ref, student=str(student), score=cfg.similarity, train=inputs.fingerprint(),
                    round=number, shard_size=rounds.shard_size)))
                labels = remine.round_labels(inputs, rounds, number, negatives, [lb.ref for _, lb in made], per_round)
                made.append((negatives, labels))
                dataset = _dataset(cfg, inputs.load(inputs.corpus), inputs.load(inputs.queries), labels)
            newest = trainer.latest_checkpoint(checkpoints)
            if end < cfg.steps and newest is not None and (checkpoint_step(newest) or 0) >= end:
                return  # a rerun: this round was trained before
            stop = [remine.stop_at(end)] if end < cfg.steps else []
            report[:] = [trainer.fit(model, dataset, cfg, checkpoints, models.device(), [*callbacks, *stop])]

        (runner or _in_place)(number, work)
    history = report[0].loss_history
    return report[0], [remine.round_summary(number, every, cfg.steps, history, negatives, labels)
                       for number, (negatives, labels) in enumerate(made, 1)]


def _in_place(number: int, work: Callable[[], None]) -> None:
    work()


def _finished(checkpoints: Any, steps: int) -> bool:
    """Whether a crashed run's newest checkpoint is its last step (publishing it needs no torchrun job).
    Incomplete checkpoints are removed here, before any rank starts."""
    from gplflow.adapters import trainer

    newest = trainer.latest_checkpoint(checkpoints)
    return newest is not None and (checkpoint_step(newest) or 0) >= steps


def train_on_rank(payload: dict[str, Any]) -> None:
    """One rank of a torchrun training job (adapters/distributed.py calls it with the job file's payload): the
    stage inputs rebuilt from JSON, loaded and trained on as in one process."""
    kind = {"TrainInputs": TrainInputs, "TrainPairsInputs": TrainPairsInputs}[payload["kind"]]
    inputs = kind.model_validate(payload["inputs"])
    make_dataset = _queries_data(inputs) if isinstance(inputs, TrainInputs) else _pairs_data(inputs)
    callbacks = [distributed.step_events()] if distributed.is_main() else []
    _train(inputs, make_dataset, callbacks, distributed.world_size())


def _replay(callbacks: Sequence[Any], steps: int) -> Callable[[dict[str, Any]], None]:
    """Rank 0's events as this process's trainer callbacks would see them (``on_train_begin``, ``on_step_end``:
    progress), and its losses in the log."""
    from transformers import TrainerState

    state = TrainerState(max_steps=steps)

    def on_event(event: dict[str, Any]) -> None:
        state.global_step = int(event.get("step", state.global_step))
        if "loss" in event:
            logger.info("train: step %d of %d, loss %.4f", state.global_step, steps, event["loss"])
            return
        hook = "on_train_begin" if "max_steps" in event else "on_step_end"
        for callback in callbacks:
            getattr(callback, hook, lambda *a, **k: None)(None, state, None)

    return on_event


def _dataset(cfg: TrainConfig, corpus: Artifact, queries: Artifact, triples: Artifact | None):
    """Rows for the loss: (query, positive) pairs for mnrl; for the teacher's losses (query, positive, negative,
    margin) triples for margin_mse on triples (GPL as it always was), else (query, positive, negative_1..n, the
    teacher's n + 1 scores)."""
    from gplflow.adapters import trainer

    passages = trainer.passage_lookup(corpus.read_table(["doc_id", "title", "text"]))
    query_rows = queries.read_table(["query_id", "doc_id", "text"])
    if cfg.loss == "mnrl":
        return trainer.pairs_dataset(query_rows, passages)
    if triples is None:
        raise InputError(f"train: loss {cfg.loss!r} needs the triples artifact (run the label stage first)")
    n = artifacts.negatives_per_example(triples.manifest)
    margins = cfg.loss == "margin_mse" and n == 1  # GPL as it always was: the triples' margins
    negatives = ["neg_doc_ids", "neg_scores"] if n > 1 else ["neg_doc_id", "neg_score"]
    columns = ["query_id", "pos_doc_id", *(["neg_doc_id", "margin"] if margins else ["pos_score", *negatives])]
    try:
        rows = artifacts.check_triples(triples.read_table(columns), n, triples.url)
    except (ValueError, KeyError) as err:
        raise InputError(str(err)) from err
    make = trainer.margin_mse_dataset if margins else trainer.tuples_dataset
    return make(rows, trainer.query_texts(query_rows), passages)


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
    loss = {"kl": f"kl (temperature {t.temperature:g}), ",
            "kl+margin_mse": f"kl (temperature {t.temperature:g}) + {t.margin_mse_weight:g} x margin_mse, "}
    return (loss.get(t.loss, "") +
            f"{t.steps} steps of batch {t.batch_size}, lr {t.learning_rate:g}, max length {t.max_seq_length}, "
            f"seed {t.seed}" + (f", train.devices {t.devices}" if t.devices != "auto" else ""))


def estimate(cfg: Any, n: int) -> StagePlan:
    t = cfg.train
    several = f" on {t.devices} devices: one device's rate x{t.devices}, a scaling assumed until measured" \
        if t.devices != "auto" and int(t.devices) > 1 else ""
    per = cfg.label.negatives_per_example if t.loss in DISTILL_LOSSES else 0
    negatives = f" of {per} negatives" if per > 1 else ""
    rounds = ""
    if t.remine_every and t.loss in DISTILL_LOSSES:  # each round after the first re-mines and labels: not timed
        count = remine.number_of_rounds(t.steps, t.remine_every)
        rounds = (f", {count} rounds: {count - 1} re-mining(s) by the student ({n} passages and the training queries "
                  f"encoded, {t.remine_every * t.batch_size} examples labelled, each; not timed)")
    return StagePlan(t.steps, "steps", f"{t.loss}, {t.steps} steps of batch {t.batch_size} "
                     f"({t.steps * t.batch_size} examples{negatives}){several}{rounds}",
                     measure=lambda resolved, passages: _rate(t, resolved, passages, per) * devices(t))


def _rate(t: TrainConfig, resolved: dict[str, Any], passages: list[str], per: int = 1) -> float:
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
    elif t.loss == "margin_mse" and per == 1:
        triples = pa.table({"query_id": queries["query_id"], "pos_doc_id": docs["doc_id"],
                            "neg_doc_id": [f"d{(i + 1) % n}" for i in range(n)], "margin": [0.0] * n})
        dataset = trainer.margin_mse_dataset(triples, trainer.query_texts(queries), lookup)
    else:  # n negatives per example: the texts a step encodes grow with n
        examples = pa.table({"query_id": queries["query_id"], "pos_doc_id": docs["doc_id"], "pos_score": [1.0] * n,
                             "neg_doc_ids": [[f"d{(i + j) % n}" for j in range(1, per + 1)] for i in range(n)],
                             "neg_scores": [[0.0] * per for _ in range(n)]})
        dataset = trainer.tuples_dataset(examples, trainer.query_texts(queries), lookup)
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
    artifact = run_train(inputs, callbacks=[progress_callback(progress)], rounds_runner=_prefect_round)
    progress.finish()
    _log_trained(artifact, cfg.loss)
    return artifact.fingerprint


def _prefect_round(number: int, work: Callable[[], None]) -> None:
    """A re-mining round as a Prefect task of its own, named by its number in the UI (its artifacts resume it)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    task(name="train round", task_run_name=f"train round {number}", cache_policy=NO_CACHE)(work)()


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
