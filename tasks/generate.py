"""Generate: pseudo-queries for every passage (T5 nucleus sampling, or extractive Inverse-Cloze spans)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gplflow.tasks.base import StageConfig

STAGE = "queries"
CODE_VERSION = "generate-1"


class GenerateConfig(StageConfig):
    method: Literal["t5", "extractive"] = "t5"
    queries_per_passage: int | Literal["auto"] = "auto"
    target_queries: int = Field(default=250_000, gt=0)   # the paper's |corpus| x QPP budget for `auto`
    max_passages: int = Field(default=83_334, gt=0)      # above this, `auto` samples passages and uses QPP 3
    batch_size: int = Field(default=32, gt=0)
    seed: int = 42
    top_k: int = 25
    top_p: float = 0.95
    max_query_length: int = 64        # tokens of a generated query
    max_passage_length: int = 350     # tokens of the passage given to the generator
    prefix: str = ""                  # an optional prompt prefix put before every passage
    remove_span: bool = False         # extractive: remove the chosen sentence from the passage (ICT)
