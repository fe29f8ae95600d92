"""Ingest: read a corpus in any supported format into the ``corpus/`` artifact (doc_id, title, text)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prefect import get_run_logger, task

from gplflow.adapters import artifacts
from gplflow.adapters.corpus_readers import CorpusError, Document, FieldMap, detect_format, iter_documents
from gplflow.adapters.store import Artifact, ArtifactStore, content_signature, row_batches
from gplflow.tasks.base import StageConfig, retry_unless_deterministic, reuse, stage_cache, stage_fingerprint

logger = logging.getLogger(__name__)

STAGE = artifacts.CORPUS
CODE_VERSION = "ingest-1"


class IngestConfig(StageConfig):
    path: str
    format: str | None = None  # auto-detected from the path when None
    id_field: str = "_id"
    title_field: str | None = "title"
    text_field: str = "text"
    skip_empty: bool = False  # drop (and count) documents whose text is empty instead of failing


def ingest_fingerprint(cfg: IngestConfig) -> str:
    return stage_fingerprint(STAGE, cfg, {"source": content_signature(cfg.path)}, CODE_VERSION)


def run_ingest(cfg: IngestConfig, store: ArtifactStore) -> Artifact:
    """Read, validate and normalise the corpus; publish it only if every document passed."""
    fp = ingest_fingerprint(cfg)
    if (found := reuse(store, STAGE, fp)) is not None:
        return found
    fmt = cfg.format or detect_format(cfg.path)
    fields = FieldMap(id=cfg.id_field, title=cfg.title_field, text=cfg.text_field)
    with store.writer(STAGE, config=cfg.model_dump(mode="json"), inputs={"source": content_signature(cfg.path)},
                      code_version=CODE_VERSION) as out:
        out.extra["format"] = fmt
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


@task(name="ingest corpus", task_run_name="ingest corpus", retries=0, persist_result=True,
      retry_condition_fn=retry_unless_deterministic,
      cache_policy=stage_cache(STAGE, lambda p: ingest_fingerprint(p["cfg"])))
def ingest_task(cfg: IngestConfig, run_dir: str) -> str:
    artifact = run_ingest(cfg, ArtifactStore(run_dir))
    get_run_logger().info("corpus: %d documents (%s)", artifact.rows, artifact.counters or "nothing dropped")
    return artifact.fingerprint
