"""Train: the bi-encoder with MarginMSE on the triples (GPL) or MNRL on (query, passage) pairs (GenQ)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gplflow.tasks.base import StageConfig

STAGE = "model"
CODE_VERSION = "train-1"


class TrainConfig(StageConfig):
    loss: Literal["margin_mse", "mnrl"] = "margin_mse"
    steps: int = Field(default=140_000, gt=0)
    batch_size: int = Field(default=32, gt=0)
    max_seq_length: int = 350
    learning_rate: float = 2e-5
    warmup_steps: int = 1000
    checkpoint_every: int = 10_000
    seed: int = 42
