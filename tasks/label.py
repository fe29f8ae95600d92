"""Label: a fixed, seeded set of (query, positive, negative) triples scored once per distinct pair."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gplflow.tasks.base import StageConfig

STAGE = "triples"
CODE_VERSION = "label-1"


class LabelConfig(StageConfig):
    triples: int | Literal["auto"] = "auto"   # auto = train.steps x train.batch_size (the paper's rule)
    seed: int = 42
    teacher: Literal["cross_encoder", "bi_encoder"] = "cross_encoder"
    batch_size: int = Field(default=32, gt=0)
    max_seq_length: int = 350
