"""Evaluate: base vs adapted model on BEIR qrels (nDCG@10, MAP@100, Recall@100, MRR@10 via pytrec_eval)."""

from __future__ import annotations

from pydantic import Field

from gplflow.tasks.base import StageConfig

STAGE = "evaluate"
CODE_VERSION = "evaluate-1"


class EvaluateConfig(StageConfig):
    qrels: str | None = None     # a BEIR qrels TSV (query-id, corpus-id, score); None skips evaluation
    queries: str | None = None   # BEIR queries.jsonl; default: queries.jsonl in the qrels folder's parent
    batch_size: int = Field(default=64, gt=0)
    max_seq_length: int = 350
