"""Pretrain: optional domain-adaptive pretraining of the base encoder (TSDAE or MLM)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gplflow.tasks.base import StageConfig

STAGE = "pretrain"
CODE_VERSION = "pretrain-1"


class PretrainConfig(StageConfig):
    method: Literal["none", "tsdae", "mlm"] = "none"
    steps: int = Field(default=10_000, gt=0)
    batch_size: int = Field(default=8, gt=0)
    learning_rate: float = 3e-5
    max_seq_length: int = 256
    seed: int = 42
