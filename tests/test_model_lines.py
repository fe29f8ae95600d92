"""The models a run resolved, in its log: one line per slot, ``slot: configured -> resolved`` (issue 20, item 7),
not a Python dict of paths."""

from __future__ import annotations

from gplflow.flows import models
from gplflow.flows.config import PipelineConfig

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _demo_like() -> PipelineConfig:
    return PipelineConfig.from_dict({
        "profile": "tiny", "corpus": {"path": "docs"}, "generate": {"method": "extractive"},
        "models": {"base": MINILM, "base_layers": 1, "bi_encoder_teacher": MINILM,
                   "retrievers": [{"name": MINILM, "score": "cos_sim"}, {"name": "/models/e5", "score": "dot"}]},
        "label": {"teacher": "bi_encoder"}})


RESOLVED = {"generator": "/cache/tiny/generator", "cross_encoder": "/cache/tiny/cross-encoder",
            "base": "/cache/truncated-1l", "bi_encoder_teacher": "/venv/minilm",
            "retrievers": [("/venv/minilm", "cos_sim"), ("/models/e5", "dot")]}


def test_each_slot_is_one_line_configured_then_resolved():
    assert models.model_lines(_demo_like(), RESOLVED) == [
        "generator: tiny -> /cache/tiny/generator",
        "cross_encoder: tiny -> /cache/tiny/cross-encoder",
        f"base: {MINILM} (first 1 layer) -> /cache/truncated-1l",
        f"bi_encoder_teacher: {MINILM} -> /venv/minilm",
        f"retrievers.0: {MINILM} (cos_sim) -> /venv/minilm",
        "retrievers.1: /models/e5 (dot)",  # a folder used as configured: no arrow
    ]


def test_the_prepare_models_task_logs_those_lines_and_no_dict(monkeypatch):
    logged: list[str] = []

    class Log:
        def info(self, message: str, *args: object) -> None:
            logged.append(message % args)

    monkeypatch.setattr(models, "get_run_logger", Log)
    monkeypatch.setattr(models, "resolve_models", lambda cfg, store: RESOLVED)
    assert models.prepare_models.fn(_demo_like(), "unused-run-dir") is RESOLVED
    assert logged == [f"model {line}" for line in models.model_lines(_demo_like(), RESOLVED)]
    assert not any("{" in line for line in logged)
