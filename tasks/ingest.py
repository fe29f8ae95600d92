"""Ingest: read a corpus in any supported format into the ``corpus/`` artifact (doc_id, title, text)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger

from gplflow.adapters import artifacts
from gplflow.adapters.corpus_readers import CorpusError, Document, FieldMap, detect_format, iter_documents
from gplflow.adapters.store import Artifact, content_signature, row_batches
from gplflow.tasks.base import StageConfig, StageInputs, stage_task

logger = logging.getLogger(__name__)

STAGE = artifacts.CORPUS
CODE_VERSION = "ingest-2"  # 2: the fingerprint holds the detected format, not the path


class IngestConfig(StageConfig):
    path: str
    format: str | None = None  # auto-detected from the path when None
    id_field: str = "_id"
    title_field: str | None = "title"
    text_field: str = "text"
    skip_empty: bool = False  # drop (and count) documents whose text is empty instead of failing


class IngestInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What ingest reads: the corpus files the config names (by content, not by path)."""

    cfg: IngestConfig

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        return identity(self.cfg), {"source": content_signature(self.cfg.path)}


def ingest_fingerprint(cfg: IngestConfig) -> str:
    """The corpus' fingerprint for ``cfg``, wherever it is published (``gplflow ingest``, the plan)."""
    return IngestInputs(run_dir="", cfg=cfg).fingerprint()


def identity(cfg: IngestConfig) -> dict[str, Any]:
    """The settings that shape the corpus rows: the fields, ``skip_empty`` and the format as detected. The path
    is not one: the source's content is an input, so ``gplflow ingest docs`` and a config naming the same folder
    by another path (a config's paths are made absolute) give the same corpus."""
    settings = cfg.model_dump(mode="json", exclude={"path"})
    return {**settings, "format": cfg.format or detect_format(cfg.path)}


def settings_change(manifest: dict[str, Any] | None, settings: dict[str, Any], inputs: dict[str, str]) -> str | None:
    """Why a published corpus with ``manifest`` is not this one, in words, or None when nothing differs."""
    if manifest is None:
        return None
    old = manifest.get("config") or {}
    keys = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
    changed = [f"settings changed ({', '.join(keys)})"] if keys else []
    if (manifest.get("inputs") or {}).get("source") != inputs.get("source"):
        changed.append("the source files changed")
    if manifest.get("code_version") != CODE_VERSION:
        changed.append(f"the ingest code changed ({manifest.get('code_version')} -> {CODE_VERSION})")
    return ", ".join(changed) or None


def run_ingest(inputs: IngestInputs) -> Artifact:
    """Read, validate and normalise the corpus; publish it only if every document passed."""
    cfg, store = inputs.cfg, inputs.store
    if (found := inputs.reuse()) is not None:
        return found
    settings, fps = inputs.fingerprint_parts()
    if (change := settings_change(store.read_manifest(STAGE), settings, fps)) is not None:
        logger.info("corpus: %s, recomputing", change)
    fmt = settings["format"]
    fields = FieldMap(id=cfg.id_field, title=cfg.title_field, text=cfg.text_field)
    with store.writer(STAGE, config=settings, inputs=fps, code_version=CODE_VERSION) as out:
        out.extra["format"] = fmt
        out.extra["path"] = cfg.path
        docs = _checked(iter_documents(cfg.path, fmt, fields), cfg, out.count)
        rows = out.write_part(row_batches(_rows(docs), artifacts.CORPUS_SCHEMA), artifacts.CORPUS_SCHEMA)
        if rows == 0:
            raise CorpusError(f"{cfg.path}: no documents left after dropping {out.counters.get('empty_text', 0)} "
                              "with empty text")
    artifact = store.require(STAGE)
    logger.info("ingested %d documents from %s (%s)", artifact.rows, cfg.path, fmt)
    return artifact


def _checked(docs: Iterator[Document], cfg: IngestConfig, count) -> Iterator[Document]:
    for doc in docs:
        if not doc.text:
            if not cfg.skip_empty:
                raise CorpusError(f"{doc.where or cfg.path}: document {doc.doc_id!r} has empty text; "
                                  "fix it or pass --skip-empty to drop such documents")
            count("empty_text")
            continue
        yield doc


def _rows(docs: Iterator[Document]) -> Iterator[dict[str, str]]:
    for doc in docs:
        yield {"doc_id": doc.doc_id, "title": doc.title, "text": doc.text}


def settings(cfg: Any) -> str:
    """The report's line on the corpus (``cfg``: the PipelineConfig)."""
    c = cfg.corpus
    return f"`{c.path}`" + (f" ({c.format})" if c.format else "")


@stage_task("ingest corpus")
def ingest_task(inputs: IngestInputs) -> str:
    artifact = run_ingest(inputs)
    get_run_logger().info("corpus: %d documents (%s)", artifact.rows, artifact.counters or "nothing dropped")
    return artifact.fingerprint
