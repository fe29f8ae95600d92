"""Pretrain: optional domain-adaptive pretraining of the base encoder on the corpus.

Methods: TSDAE, MLM, unsupervised SimCSE, Contrastive Tension (``ct``) and CT with in-batch negatives
(``ct_inbatch``). The output ``pretrain/`` is a sentence-transformers folder that the train stage starts from
instead of the base model: TSDAE keeps the CLS pooling it trained, MLM gets mean pooling, SimCSE and CT keep
the base's pooling (mean for a plain encoder). A crashed run continues from its last checkpoint (kept under
``<run_dir>/.checkpoints/pretrain-<fingerprint>/`` until the model is published).

On several devices (``pretrain.devices``) the stage runs as a torchrun job (adapters/distributed.py), as the train
stage does: every rank rebuilds the inputs from the job file and trains its slice of each global batch
(``pretrain_on_rank``); rank 0 alone writes the checkpoints and publishes the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prefect import get_run_logger
from pydantic import Field, model_validator

from gplflow.adapters import artifacts, distributed
from gplflow.adapters.checkpoints import folder as checkpoint_folder
from gplflow.adapters.checkpoints import remove as remove_checkpoints
from gplflow.adapters.model_refs import model_signature
from gplflow.adapters.store import Artifact
from gplflow.adapters.text import passage_text
from gplflow.tasks.base import AutoOrPositive, Ref, Seed, StageConfig, StageInputs, stage_task
from gplflow.tasks.planning import CALIBRATION_STEPS, StagePlan, StepClock
from gplflow.tasks.progress import ProgressArtifact

logger = logging.getLogger(__name__)

STAGE = artifacts.PRETRAIN
CODE_VERSION = "pretrain-3"  # 2: sentences cut by adapters/text.py split_sentences; 3: MLM masks its first
# batch from the step's seed (its collator had a seed of its own), so an MLM model of pretrain-2 is not reused


class PretrainConfig(StageConfig):
    method: Literal["none", "tsdae", "mlm", "simcse", "ct", "ct_inbatch"] = "none"
    steps: int = Field(default=10_000, gt=0)
    batch_size: int = Field(default=8, gt=0)
    learning_rate: float = Field(default=3e-5, ge=0.0, allow_inf_nan=False)  # TSDAE paper: 3e-5, constant; 0 freezes
    max_seq_length: int = Field(default=256, gt=0)
    seed: Seed = 42
    noise_ratio: float = Field(default=0.6, ge=0.0, lt=1.0)  # TSDAE: fraction of words deleted
    min_sentence_words: int = Field(default=3, gt=0)  # sentence methods: shorter ones are dropped (and counted)
    # the output's pooling; None: the method's own (TSDAE cls, as the paper; MLM mean; SimCSE and CT the
    # base's, mean for a plain encoder). `mean` keeps a base that was trained with mean pooling (most
    # sentence-transformers models) on the pooling it knows.
    pooling: Literal["cls", "mean"] | None = None
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)  # MLM: fraction of tokens masked
    # SimCSE and ct_inbatch: cosine similarity x scale (= 1/temperature) in the softmax; 20 = SimCSE's 0.05
    # (ct_inbatch learns it from there, as sentence-transformers' loss does)
    scale: float = Field(default=20.0, gt=0.0, allow_inf_nan=False)
    ct_negatives: int = Field(default=7, gt=0)  # CT: random pairs per identical pair in a batch (the paper's K)
    warmup_steps: int = Field(default=0, ge=0)  # linear warm-up, then a constant learning rate
    checkpoint_every: int = Field(default=1000, gt=0)
    log_every: int | None = Field(default=None, gt=0)  # loss points and progress; None: about 100 per run
    # 'auto': every visible GPU (1 on a CPU); N > 1 pretrains as a torchrun job of N processes (on a CPU, N gloo
    # processes). batch_size stays the global batch. Left out of the fingerprint, as train.devices is.
    devices: AutoOrPositive = "auto"

    @model_validator(mode="after")
    def _batch_divides(self) -> PretrainConfig:
        if self.devices != "auto":
            distributed.check_batch(self.batch_size, int(self.devices), "pretrain")
        return self


NOT_FINGERPRINTED = {"devices"}  # where a model trains, not what it is


class PretrainInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What pretraining reads: the corpus and the base model it starts from."""

    cfg: PretrainConfig
    corpus: Ref
    base_model: str

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        """A local base folder is named by its content (a retrained base at the same path is a new input)."""
        return self.cfg.model_dump(mode="json", exclude=NOT_FINGERPRINTED), {
            "corpus": self.corpus.fingerprint, "base_model": model_signature(self.base_model)}


def run_pretrain(inputs: PretrainInputs, on_progress=None) -> Artifact:
    """Pretrain the base model on the corpus and publish ``pretrain/`` (resuming from a checkpoint if any).

    ``on_progress(step, total_steps, loss)`` is called every ``log_every`` steps.
    """
    cfg, store = inputs.cfg, inputs.store
    if cfg.method == "none":
        raise ValueError("pretrain: method is 'none', nothing to pretrain (the flow skips this stage)")
    if (found := inputs.reuse()) is not None:
        return found
    count = distributed.device_count(cfg.devices, cfg.batch_size, "pretrain")
    checkpoints = checkpoint_folder(store, STAGE, inputs.fingerprint())
    if distributed.in_process(count):
        _pretrain(inputs, on_progress)
    else:
        distributed.launch(checkpoints / "job", count, f"{__name__}:pretrain_on_rank", inputs.model_dump(mode="json"),
                           what="pretrain", on_event=_progress_events(on_progress))
    remove_checkpoints(checkpoints)
    return store.require(STAGE)


def _pretrain(inputs: PretrainInputs, on_progress=None, world_size: int = 1) -> None:
    """Pretrain on this process's device; the one process, or rank 0 of a torchrun job, publishes ``pretrain/``
    with the world size and every rank's device in its manifest."""
    from gplflow.adapters import pretraining  # slow to import (torch, sentence-transformers): only when used

    cfg, store, base_model = inputs.cfg, inputs.store, inputs.base_model
    corpus = inputs.load(inputs.corpus)
    checkpoints = checkpoint_folder(store, STAGE, inputs.fingerprint())
    texts = _texts(corpus, cfg.method)
    if not distributed.is_main():
        pretraining.pretrain(cfg, base_model, texts, checkpoints, None, world_size=world_size)
        distributed.devices_used()  # a collective: rank 0 waits for every rank's answer
        return
    config, fps = inputs.fingerprint_parts()
    with store.writer(STAGE, config=config, inputs=fps, code_version=CODE_VERSION) as out:
        report = pretraining.pretrain(cfg, base_model, texts, checkpoints, out.local_dir(), on_progress, world_size)
        used = distributed.devices_used()
        for name, value in report.counters.items():
            out.count(name, value)
        out.extra["pretrain"] = info = {"base_model": base_model, **report.as_dict(), "world_size": world_size,
                                        "devices": used}
    start = f"resumed at step {report.resumed_from_step}" if report.resumed_from_step else "from the start"
    logger.info("pretrained %s with %s for %d steps on %d examples (%s) on %d device(s): loss %s -> %s", base_model,
                cfg.method, report.steps, report.examples, start, world_size, info["loss_first"], info["loss_last"])


def pretrain_on_rank(payload: dict[str, Any]) -> None:
    """One rank of a torchrun pretraining job (adapters/distributed.py calls it with the job file's payload)."""
    inputs = PretrainInputs.model_validate(payload)
    report = (lambda step, total, loss: distributed.emit({"step": step, "max_steps": total, "loss": loss})) \
        if distributed.is_main() else None
    _pretrain(inputs, report, distributed.world_size())


def _progress_events(on_progress) -> Callable[[dict[str, Any]], None]:
    """Rank 0's progress events as ``on_progress(step, total_steps, loss)`` calls in this process."""

    def on_event(event: dict[str, Any]) -> None:
        if on_progress is not None and "loss" in event:
            on_progress(int(event["step"]), int(event["max_steps"]), float(event["loss"]))

    return on_event


def _texts(corpus: Artifact, method: str) -> Iterator[str]:
    """TSDAE, SimCSE and CT split the passage text into sentences (titles would merge into the first one);
    MLM reads the passage as every other stage does (``adapters/text.py``: title + " " + text)."""
    for batch in corpus.iter_batches(["title", "text"]):
        titles, texts = batch.column("title").to_pylist(), batch.column("text").to_pylist()
        for title, text in zip(titles, texts, strict=True):
            yield passage_text(title, text) if method == "mlm" else text


# --- what the run's report and plan ask of this stage -----------------------------------------------------

def settings(cfg: Any) -> str:
    p = cfg.pretrain
    return (f"{p.method}, {p.steps} steps of batch {p.batch_size}, seed {p.seed}"
            + (f", pretrain.devices {p.devices}" if p.devices != "auto" else ""))


def estimate(cfg: Any, n: int) -> StagePlan:
    p = cfg.pretrain
    several = f" on {p.devices} devices: one device's rate x{p.devices}, a scaling assumed until measured" \
        if p.devices != "auto" and int(p.devices) > 1 else ""
    return StagePlan(p.steps, "steps", f"{p.method}, {p.steps} steps of batch {p.batch_size}{several}",
                     measure=lambda resolved, passages: _rate(p, resolved, passages)
                     * distributed.device_count(p.devices, p.batch_size, "pretrain"))


def _rate(p: PretrainConfig, resolved: dict[str, Any], passages: list[str]) -> float:
    import tempfile
    from pathlib import Path

    from gplflow.adapters import pretraining

    steps = StepClock()
    settings = p.model_copy(update={"steps": CALIBRATION_STEPS, "log_every": 1, "checkpoint_every": 10**9,
                                    "warmup_steps": 0})
    with tempfile.TemporaryDirectory(prefix="gplflow-plan-pretrain-") as out:
        pretraining.pretrain(settings, resolved["base"], passages, Path(out) / "ckpt", Path(out) / "model",
                             on_progress=steps.tick)
    return steps.rate()


@stage_task("pretrain encoder", retries=1,  # a retry resumes from checkpoint
            task_run_name="pretrain encoder ({inputs.cfg.method})")
def pretrain_task(inputs: PretrainInputs) -> str:
    cfg, base_model = inputs.cfg, inputs.base_model
    log = get_run_logger()
    progress = ProgressArtifact.start(f"pretrain-{cfg.method}", cfg.steps,
                                      f"{cfg.method.upper()} pretraining of {base_model} for {cfg.steps} steps")

    def on_progress(step: int, total: int, loss: float) -> None:
        progress.set(step)
        log.info("pretrain %s: step %d/%d, loss %.4f", cfg.method, step, total, loss)

    artifact = run_pretrain(inputs, on_progress)
    progress.finish()  # also when the artifact was reused
    info = artifact.manifest.get("pretrain", {})
    log.info("pretrain: %s, %s steps in %ss, loss %s -> %s", cfg.method, info.get("steps"),
             info.get("seconds"), info.get("loss_first"), info.get("loss_last"))
    return artifact.fingerprint
