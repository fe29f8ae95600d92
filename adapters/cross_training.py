"""Training a cross-encoder on scored pairs with the sentence-transformers (v6) ``CrossEncoderTrainer``.

Augmented SBERT's first step (Thakur et al., NAACL 2021): a cross-encoder learns the gold pairs' scores in
[0, 1] with binary cross-entropy on its one logit, and then labels sampled pairs. It trains for a few epochs
on a small gold set, so there are no checkpoints: a run killed while training trains again from the start.
The folder is saved with a Sigmoid activation, so ``CrossEncoder(path).predict`` gives scores on the gold
scale (``models.load_cross_encoder`` still gives raw logits).

Under torchrun (``world_size`` > 1, adapters/distributed.py) the same Trainer runs DDP with the batch as the global
batch, split over the ranks (accelerate's ``split_batches``), as the bi-encoder's trainer does: binary
cross-entropy is a mean over the pairs, so the ranks' mean is the one-process loss. An epoch's last, incomplete
batch is kept, completed with the epoch's first pairs so that it splits evenly: the steps and the schedule stay
those of one process.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from datasets import Dataset
from scipy.stats import spearmanr
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
from transformers import TrainerCallback

from gplflow.adapters import models
from gplflow.adapters.trainer import TrainReport

logger = logging.getLogger(__name__)


class CrossTrainSettings(Protocol):
    """What ``fit`` reads of the cross-encoder's config, passed whole (``tasks/augment.py``
    CrossEncoderTrainConfig, whose fields hold the defaults and the bounds)."""

    epochs: int
    steps: int | None  # when set, exactly this many steps (``epochs`` is then ignored)
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    seed: int


@dataclass(frozen=True)
class ScoredPairs:
    """(sentence1, sentence2, score in [0, 1]) columns, as lists."""

    sentence1: Sequence[str]
    sentence2: Sequence[str]
    scores: Sequence[float]

    def __len__(self) -> int:
        return len(self.scores)


def fit(model: CrossEncoder, pairs: ScoredPairs, cfg: CrossTrainSettings,
        callbacks: Sequence[TrainerCallback] = (), world_size: int = 1) -> TrainReport:
    """Train ``model`` (``models.load_cross_encoder(ref, inference=False)``) in place with binary cross-entropy
    of its logit against the scores (``world_size`` > 1: as one rank of a torchrun job)."""
    dev = models.device()
    with tempfile.TemporaryDirectory(prefix="gplflow-cross-encoder-") as scratch:  # the trainer wants a folder
        return _fit(model, pairs, cfg, dev, Path(scratch), callbacks, world_size)


def _distributed_args(dev: str) -> dict:
    """A rank's extra arguments: each global batch split over the ranks; rank 0 reports its progress to the
    launcher, so no progress bar. Every parameter of a cross-encoder reaches its logit, and DDP's search for unused
    ones (the Trainer's default for a model that is not a transformers model) marks the classifier's bias ready
    twice: off."""
    return {"accelerator_config": {"split_batches": True}, "disable_tqdm": True,
            "ddp_backend": "nccl" if dev == "cuda" else "gloo", "ddp_find_unused_parameters": False}


def _fit(model: CrossEncoder, pairs: ScoredPairs, cfg: CrossTrainSettings, dev: str, output_dir: Path,
         callbacks: Sequence[TrainerCallback], world_size: int = 1) -> TrainReport:
    args = CrossEncoderTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,  # a few hundred steps at most: every loss goes in the history (thinned in the manifest)
        report_to="none",
        bf16=models.bf16_pays(model, dev),
        fp16=dev == "cuda" and not models.bf16_supported(dev),
        use_cpu=dev == "cpu",
        dataloader_num_workers=0,
        **(_distributed_args(dev) if world_size > 1 else {}),
    )
    dataset = Dataset.from_dict({"sentence1": list(pairs.sentence1), "sentence2": list(pairs.sentence2),
                                 "label": np.asarray(pairs.scores, dtype=np.float32)})
    model.model_card_data.local_files_only = True  # no Hub lookups for the model card
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset,
                                  loss=BinaryCrossEntropyLoss(model), callbacks=list(callbacks))
    started = time.perf_counter()
    trainer.train()
    return TrainReport(global_step=trainer.state.global_step, resumed_from_step=None,
                       seconds=time.perf_counter() - started,
                       loss_history=[(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history
                                     if "loss" in e])


def logits(model: CrossEncoder, sentence1: Sequence[str], sentence2: Sequence[str], batch_size: int) -> np.ndarray:
    """The model's raw logit for each pair, float32, in fp32 (no autocast: these become labels and metrics)."""
    batch = list(zip(sentence1, sentence2, strict=True))
    if not batch:
        return np.empty(0, dtype=np.float32)
    out = model.predict(batch, batch_size=batch_size, show_progress_bar=False, activation_fn=torch.nn.Identity(),
                        convert_to_numpy=True)
    return np.asarray(out, dtype=np.float32).reshape(-1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def fit_on(model: CrossEncoder, pairs: ScoredPairs, batch_size: int) -> dict[str, float]:
    """How well the model fits ``pairs``: the mean binary cross-entropy of its logits against the scores (the
    training loss) and the Spearman correlation of its scores with them (1: it ranks the pairs as they are)."""
    found = torch.from_numpy(logits(model, pairs.sentence1, pairs.sentence2, batch_size))
    target = torch.tensor(list(pairs.scores), dtype=torch.float32)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(found, target).item()
    rho = spearmanr(found.numpy(), target.numpy()).statistic if len(set(target.tolist())) > 1 else float("nan")
    return {"bce": round(float(bce), 6), "spearman": round(float(rho), 6) if np.isfinite(rho) else None}


def save(model: CrossEncoder, folder: Path) -> None:
    """A CrossEncoder folder whose saved activation is Sigmoid: ``CrossEncoder(folder)`` predicts in [0, 1]."""
    model.activation_fn = torch.nn.Sigmoid()
    model.save(str(folder), create_model_card=False)
    model.activation_fn = torch.nn.Identity()
