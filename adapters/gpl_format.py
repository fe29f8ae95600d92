"""Interop with the reference implementation (UKPLab gpl 0.1.4): its folder format to and from artifacts.

The folder (names for the default prefix ``qgen``):

| file | content | artifact |
|---|---|---|
| ``corpus.jsonl`` | ``{"_id", "title", "text"}`` a line | ``corpus/`` |
| ``qgen-queries.jsonl`` | ``{"_id", "text", "metadata": {}}`` a line | ``queries-train/`` (*) (with the qrels) |
| ``qgen-qrels/train.tsv`` | header ``query-id corpus-id score``; query -> passage, score 1 | ``queries-train/`` (*) |
| ``hard-negatives.jsonl`` | ``{"qid", "pos": [ids], "neg": {miner: [ids ranked]}}`` a line | ``negatives/`` |
| ``gpl-training-data.tsv`` | no header: ``qid pos_id neg_id margin`` | ``triples/`` |

(*) export: the training queries, those mining, labelling and training read: what the filter kept
(``queries-filtered/``) when the run filtered, else ``queries-train/`` (the held-out queries left out), else
``queries/`` in a run without a split; import: ``queries/``.

JSON lines are written as the reference writes them (``json.dumps`` defaults). Margins are written as the
shortest decimal that reads back to the same float32 (numpy's float32 repr, e.g. ``13.6840515``, which is
also what the reference's files hold), so export -> import -> export is byte-identical.

What the reference format does not carry, and what import does about it:
- triples: the reference stores only the margin; ``pos_score`` and ``neg_score`` are imported as NaN.
- negatives: miners' scores are not stored; ``scores`` is a list of NaN as long as ``doc_ids``. A positive
  listed among a query's negatives is removed (our negatives contract) and counted.
- queries: a query without a positive qrels row is dropped and counted (it has no passage); a query with
  more than one positive is an error (a ``queries/`` row holds the one passage a query was generated from).
- corpus: read with the ingest stage's JSONL reader, so text is whitespace-normalised like ingested text.
Ids are checked across the files that are present (qrels, negatives and triples against the corpus and
the queries). Every problem in a file is a ``GplFormatError`` naming the file and the line.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc

from gplflow.adapters import artifacts
from gplflow.adapters.beir_io import BeirFormatError, id_field, iter_jsonl, iter_lines, read_qrels, text_field
from gplflow.adapters.corpus_readers import FieldMap, iter_documents
from gplflow.adapters.errors import InputError, MissingInputError
from gplflow.adapters.model_refs import model_name
from gplflow.adapters.store import Artifact, ArtifactStore, content_signature, fingerprint, row_batches

logger = logging.getLogger(__name__)

CODE_VERSION = "gpl-import-1"
CORPUS, NEGATIVES, TRAINING = "corpus.jsonl", "hard-negatives.jsonl", "gpl-training-data.tsv"
QRELS_HEADER = "query-id\tcorpus-id\tscore"


class GplFormatError(InputError):
    """A malformed file of a UKPLab gpl folder; the message names the file and the line."""


def queries_file(prefix: str = "qgen") -> str:
    return f"{prefix}-queries.jsonl"


def qrels_file(prefix: str = "qgen") -> str:
    return f"{prefix}-qrels/train.tsv"


def format_margin(value: float) -> str:
    """The shortest decimal that reads back to the same float32."""
    return str(np.float32(value))


# ---------------------------------------------------------------------------------------------- export


class ExportTargetError(InputError):
    """An export target that cannot be written: a file, or a folder with content and no ``force``."""


def export_gpl(store: ArtifactStore, out_dir: str, prefix: str = "qgen", queries_stage: str | None = None,
               force: bool = False) -> dict[str, int]:
    """Write the reference's files for the artifacts the run has; returns lines written per file.

    The queries are the training queries (``training_queries``): a held-out query is a test query, and a query
    the filter dropped was not trained on, while the reference would train on every query it finds. Miners are
    named by their model names
    (``model_refs.model_name``), never by where their folders lie.

    The files are written into a temporary sibling folder that is renamed into place once complete, so a
    failed export leaves nothing behind. A folder with content is refused unless ``force`` (its content is
    then replaced as a whole: no stale file of an earlier export survives).
    """
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    root = root.rstrip("/") or "/"
    _check_target(fs, root, str(out_dir), force, store)
    if queries_stage is None:
        queries_stage = training_queries(store)
    corpus, queries = store.consume(artifacts.CORPUS), store.consume(queries_stage)
    negatives, triples = store.consume(artifacts.NEGATIVES), store.consume(artifacts.TRIPLES)
    if not any((corpus, queries, negatives, triples)):
        raise MissingInputError(f"{store.root_url}: none of corpus/, {queries_stage}/, negatives/, triples/ "
                                "is a valid artifact; nothing to export")
    if queries is not None:  # ids the TSV files cannot carry are found before anything is written
        _check_tsv_ids(queries, ["query_id", "doc_id"])
    if triples is not None:
        if (n := artifacts.negatives_per_example(triples.manifest)) > 1:
            raise GplFormatError(f"{triples.url}: holds {n} negatives per example (label.negatives_per_example); "
                                 "the reference's gpl-training-data.tsv holds one (query, positive, negative) triple "
                                 "a line: export a run labelled with label.negatives_per_example 1")
        _check_tsv_ids(triples, ["query_id", "pos_doc_id", "neg_doc_id"])
    parent, name = posixpath.split(root)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        counts = _write_all(fs, tmp, prefix, corpus, queries, negatives, triples)
        _move_into_place(fs, tmp, root)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
    logger.info("exported %s to %s", counts, out_dir)
    return counts


def training_queries(store: ArtifactStore) -> str:
    """The queries artifact the run's mining, labelling or training read (their manifests name its fingerprint);
    without such a stage, ``queries-train/`` when the run held some queries out, else ``queries/``.

    A ``queries-filtered/`` that no later stage read (one left by an earlier config that filtered) is not taken."""
    read = {(store.read_manifest(stage) or {}).get("inputs", {}).get("queries")
            for stage in (artifacts.NEGATIVES, artifacts.TRIPLES, artifacts.MODEL)} - {None}
    candidates = (artifacts.QUERIES_FILTERED, artifacts.QUERIES_TRAIN, artifacts.QUERIES)
    for stage in candidates:
        if read and (found := store.load(stage)) is not None and found.fingerprint in read:
            return stage
    return artifacts.QUERIES_TRAIN if store.load(artifacts.QUERIES_TRAIN) else artifacts.QUERIES


def _check_target(fs, root: str, out_dir: str, force: bool, store: ArtifactStore) -> None:
    if fs.exists(root) and not fs.isdir(root):
        raise ExportTargetError(f"{out_dir}: is a file; the export writes a folder")
    if not fs.isdir(root):
        return
    if store.is_local and "file" in _protocols(fs):
        target, run = Path(root).resolve(), Path(store.root).resolve()
        if run == target or target in run.parents:
            raise ExportTargetError(f"{out_dir}: holds the run directory {store.root_url}; export elsewhere")
    entries = fs.ls(root, detail=False)
    if entries and not force:
        raise ExportTargetError(f"{out_dir}: folder not empty ({len(entries)} entries); export into a new or "
                                "empty folder, or pass --force to replace its content")


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _write_all(fs, root: str, prefix: str, corpus, queries, negatives, triples) -> dict[str, int]:
    fs.makedirs(root, exist_ok=True)
    counts: dict[str, int] = {}
    if corpus is not None:
        counts[CORPUS] = _write_lines(fs, root, CORPUS, (_corpus_line(r) for r in _rows(corpus)))
    positives: dict[str, list[str]] = {}
    if queries is not None:
        query_rows = list(_rows(queries, ["query_id", "doc_id", "text"]))
        for row in query_rows:
            positives.setdefault(row["query_id"], []).append(row["doc_id"])
        counts[queries_file(prefix)] = _write_lines(fs, root, queries_file(prefix), _query_lines(query_rows))
        counts[qrels_file(prefix)] = _write_lines(fs, root, qrels_file(prefix), _qrels_lines(query_rows),
                                                  QRELS_HEADER)
    if negatives is not None:
        counts[NEGATIVES] = _write_lines(fs, root, NEGATIVES, _negative_lines(negatives, positives))
    if triples is not None:
        counts[TRAINING] = _write_lines(fs, root, TRAINING, _training_lines(triples))
    return counts


def _move_into_place(fs, tmp: str, root: str) -> None:
    """Rename the finished folder to ``root``; a folder already there is moved aside first, then removed."""
    if not fs.exists(root):
        fs.makedirs(posixpath.dirname(root), exist_ok=True)
        fs.mv(tmp, root, recursive=True)
        return
    parent, name = posixpath.split(root)
    old = f"{parent}/.{name}.old-{uuid.uuid4().hex[:8]}"
    fs.mv(root, old, recursive=True)
    fs.mv(tmp, root, recursive=True)
    fs.rm(old, recursive=True)


def _rows(artifact, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    for batch in artifact.iter_batches(columns):
        yield from batch.to_pylist()


def _write_lines(fs, root: str, name: str, lines: Iterable[str], header: str | None = None) -> int:
    path = f"{root}/{name}"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    count = 0
    with fs.open(path, "wb") as fh:
        if header is not None:
            fh.write((header + "\n").encode())
        for line in lines:
            fh.write((line + "\n").encode("utf-8"))
            count += 1
    return count


def _corpus_line(row: dict[str, Any]) -> str:
    return json.dumps({"_id": row["doc_id"], "title": row["title"] or "", "text": row["text"]})


def _query_lines(rows: list[dict[str, Any]]) -> Iterator[str]:
    seen: set[str] = set()
    for row in rows:
        if row["query_id"] not in seen:
            seen.add(row["query_id"])
            yield json.dumps({"_id": row["query_id"], "text": row["text"], "metadata": {}})


def _qrels_lines(rows: list[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield f"{row['query_id']}\t{row['doc_id']}\t1"


def _check_tsv_ids(artifact: Artifact, columns: list[str]) -> None:
    """The reference's TSV files cannot carry an id holding a tab or a line break: refuse before writing."""
    for batch in artifact.iter_batches(columns):
        for column in columns:
            bad = pc.match_substring_regex(batch.column(column), r"[\t\r\n]")
            if pc.any(bad).as_py():
                value = batch.column(column)[pc.index(bad, True).as_py()].as_py()
                raise GplFormatError(f"{artifact.url}: {column} {value!r} holds a tab or line break; the "
                                     "reference's TSV files cannot carry it; nothing was exported")


def _negative_lines(negatives, positives: dict[str, list[str]]) -> Iterator[str]:
    """One line per query (a query's rows may be spread over parts, e.g. one part per miner)."""
    grouped: dict[str, dict[str, list[str]]] = {}
    names: dict[str, str] = {}  # retriever as mined (a model folder) -> its name in the file, one name each
    for row in _rows(negatives, ["query_id", "retriever", "doc_ids"]):
        if (name := names.get(row["retriever"])) is None:
            name = base = model_name(row["retriever"])
            while name in names.values():
                name = f"{base}-{len(names) + 1}"
            names[row["retriever"]] = name
        grouped.setdefault(row["query_id"], {})[name] = row["doc_ids"]
    for qid, by_miner in grouped.items():
        yield json.dumps({"qid": qid, "pos": positives.get(qid, []), "neg": by_miner})


def _training_lines(triples) -> Iterator[str]:
    for row in _rows(triples, ["query_id", "pos_doc_id", "neg_doc_id", "margin"]):
        ids = (row["query_id"], row["pos_doc_id"], row["neg_doc_id"])
        yield "\t".join(ids) + "\t" + format_margin(row["margin"])


# ---------------------------------------------------------------------------------------------- import


def import_gpl(gpl_dir: str, store: ArtifactStore, prefix: str = "qgen") -> dict[str, str]:
    """Write the artifacts matching the reference files present in ``gpl_dir``; returns stage -> fingerprint.

    A stage whose artifact already holds exactly these files (same fingerprint) is kept, not rewritten.
    """
    fs, root = fsspec.core.url_to_fs(str(gpl_dir))
    if not fs.isdir(root):
        raise MissingInputError(f"{gpl_dir}: not a folder")
    base = str(gpl_dir).rstrip("/")
    present = {n: f"{base}/{n}" for n in (CORPUS, queries_file(prefix), qrels_file(prefix), NEGATIVES, TRAINING)
               if fs.isfile(f"{root}/{n}")}
    if queries_file(prefix) in present and qrels_file(prefix) not in present:
        raise GplFormatError(f"{present[queries_file(prefix)]}: found without {qrels_file(prefix)}, which names "
                             "each query's passage")
    if not present:
        raise MissingInputError(f"{gpl_dir}: none of {CORPUS}, {queries_file(prefix)}, {NEGATIVES}, {TRAINING}")
    importer = _Importer(store, present, prefix)
    return importer.run()


class _Importer:
    """Imports the present files in dependency order, remembering ids to check the later files against."""

    def __init__(self, store: ArtifactStore, present: dict[str, str], prefix: str):
        self.store, self.present, self.prefix = store, present, prefix
        self.doc_ids: set[str] | None = None     # known once the corpus is imported
        self.query_ids: set[str] | None = None   # known once the queries are imported
        self.positives: dict[str, str] = {}

    def run(self) -> dict[str, str]:
        done: dict[str, str] = {}
        q_files = [queries_file(self.prefix), qrels_file(self.prefix)]
        if CORPUS in self.present:
            done[artifacts.CORPUS] = self._stage(artifacts.CORPUS, [CORPUS], self._corpus, self._remember_docs)
        if queries_file(self.prefix) in self.present:
            done[artifacts.QUERIES] = self._stage(artifacts.QUERIES, q_files, self._queries, self._remember_queries)
        if NEGATIVES in self.present:
            done[artifacts.NEGATIVES] = self._stage(artifacts.NEGATIVES, [NEGATIVES], self._negatives)
        if TRAINING in self.present:
            done[artifacts.TRIPLES] = self._stage(artifacts.TRIPLES, [TRAINING], self._triples)
        logger.info("imported %s from the UKPLab gpl folder", ", ".join(done))
        return done

    def _stage(self, stage: str, files: list[str],
               rows: Callable[[Callable[[str, int], None]], Iterator[dict[str, Any]]],
               remember: Callable[[Artifact], None] | None = None) -> str:
        """Write (or keep, when it holds exactly these files already) one artifact; ``remember`` its ids."""
        # Ids are checked against the corpus and queries files present, so those are inputs too.
        checked = [] if stage == artifacts.CORPUS else [
            n for n in (CORPUS, queries_file(self.prefix), qrels_file(self.prefix))
            if n in self.present and n not in files]
        inputs = {n: content_signature(self.present[n]) for n in [*files, *checked]}
        config = {"format": "ukplab-gpl", "files": files}
        fp = fingerprint(stage, config, inputs, CODE_VERSION)
        artifact = self.store.load(stage, expect_fingerprint=fp)
        if artifact is None:
            with self.store.writer(stage, config=config, inputs=inputs, code_version=CODE_VERSION) as out:
                out.extra["source"] = "ukplab-gpl"
                schema = artifacts.SCHEMAS[stage]
                out.write_part(row_batches(rows(out.count), schema), schema)
            artifact = self.store.require(stage)
        if remember is not None:
            remember(artifact)
        return fp

    def _remember_docs(self, corpus: Artifact) -> None:
        self.doc_ids = set(corpus.read_table(["doc_id"]).column("doc_id").to_pylist())

    def _remember_queries(self, queries: Artifact) -> None:
        table = queries.read_table(["query_id", "doc_id"])
        self.positives = dict(zip(table.column("query_id").to_pylist(), table.column("doc_id").to_pylist(),
                                  strict=True))
        self.query_ids = set(self.positives)

    def _corpus(self, count: Callable[[str, int], None]) -> Iterator[dict[str, Any]]:
        for doc in iter_documents(self.present[CORPUS], "jsonl", FieldMap()):
            yield {"doc_id": doc.doc_id, "title": doc.title, "text": doc.text}

    def _queries(self, count: Callable[[str, int], None]) -> Iterator[dict[str, Any]]:
        positives, first_line = self._qrels_positives(count)
        path = self.present[queries_file(self.prefix)]
        seen: set[str] = set()
        for number, record in _jsonl(path):
            where = f"{path} line {number}"
            qid, text = _call(id_field, record, "_id", where), _call(text_field, record, "text", where)
            if qid in seen:
                raise GplFormatError(f"{where}: duplicate query id {qid!r}")
            seen.add(qid)
            if qid not in positives:
                count("queries_without_positive", 1)
                continue
            yield {"query_id": qid, "doc_id": positives[qid], "text": text}
        unknown = [qid for qid in positives if qid not in seen]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise GplFormatError(f"{self.present[qrels_file(self.prefix)]} line {first_line[unknown[0]]}: query id "
                                 f"{unknown[0]!r} is not in {queries_file(self.prefix)}{more}")

    def _qrels_positives(self, count: Callable[[str, int], None]) -> tuple[dict[str, str], dict[str, int]]:
        """query id -> its one positive passage, and the qrels line where each query first appears."""
        path = self.present[qrels_file(self.prefix)]
        try:
            qrels = read_qrels(path)
        except BeirFormatError as err:
            raise GplFormatError(str(err)) from err
        positives = {}
        for qid, docs in qrels.judgments.items():
            relevant = [did for did, score in docs.items() if score > 0]
            if len(docs) > len(relevant):
                count("qrels_not_positive", len(docs) - len(relevant))
            where = f"{path} line {qrels.first_line[qid]}"
            if len(relevant) > 1:
                raise GplFormatError(f"{where}: query {qid!r} has {len(relevant)} positive passages; a generated "
                                     "query has one (the passage it was generated from)")
            for did in relevant:
                self._check_doc(did, where)
                positives[qid] = did
        return positives, qrels.first_line

    def _negatives(self, count: Callable[[str, int], None]) -> Iterator[dict[str, Any]]:
        path = self.present[NEGATIVES]
        seen: set[str] = set()
        for number, record in _jsonl(path):
            where = f"{path} line {number}"
            qid = _call(id_field, record, "qid", where)
            pos, neg = record.get("pos", []), record.get("neg")
            if qid in seen:
                raise GplFormatError(f"{where}: query {qid!r} appears twice")
            seen.add(qid)
            self._check_query(qid, where)
            if not isinstance(pos, list) or not isinstance(neg, dict):
                raise GplFormatError(f"{where}: expected 'pos' a list of ids and 'neg' an object "
                                     "{miner: [ids]}")
            positives = {str(p) for p in pos} | ({self.positives[qid]} if qid in self.positives else set())
            for miner, ids in neg.items():
                doc_ids = self._negative_ids(ids, where, miner)
                kept = [d for d in doc_ids if d not in positives]
                if len(kept) < len(doc_ids):
                    count("positives_removed", len(doc_ids) - len(kept))
                yield {"query_id": qid, "retriever": miner, "doc_ids": kept, "scores": [math.nan] * len(kept)}

    def _negative_ids(self, ids: Any, where: str, miner: str) -> list[str]:
        if not isinstance(ids, list) or not all(isinstance(i, str | int) and not isinstance(i, bool) for i in ids):
            raise GplFormatError(f"{where}: 'neg'.{miner!r} must be a list of ids")
        doc_ids = [str(i) for i in ids]
        for did in doc_ids:
            self._check_doc(did, where)
        return doc_ids

    def _triples(self, count: Callable[[str, int], None]) -> Iterator[dict[str, Any]]:
        path = self.present[TRAINING]
        for number, line in _lines(path):
            where = f"{path} line {number}"
            fields = line.split("\t")
            if len(fields) != 4 or not all(fields[:3]):
                raise GplFormatError(f"{where}: expected 4 tab-separated fields (query id, positive id, "
                                     f"negative id, margin), got {line[:80]!r}")
            qid, pos, neg, raw = fields
            try:
                margin = np.float32(float(raw))
            except ValueError as err:
                raise GplFormatError(f"{where}: margin {raw!r} is not a number") from err
            self._check_query(qid, where)
            self._check_doc(pos, where)
            self._check_doc(neg, where)
            yield {"query_id": qid, "pos_doc_id": pos, "neg_doc_id": neg, "pos_score": math.nan,
                   "neg_score": math.nan, "margin": margin}

    def _check_doc(self, doc_id: str, where: str) -> None:
        if self.doc_ids is not None and doc_id not in self.doc_ids:
            raise GplFormatError(f"{where}: passage id {doc_id!r} is not in {CORPUS}")

    def _check_query(self, query_id: str, where: str) -> None:
        if self.query_ids is not None and query_id not in self.query_ids:
            raise GplFormatError(f"{where}: query id {query_id!r} is not among the imported queries "
                                 f"({queries_file(self.prefix)} with a positive in {qrels_file(self.prefix)})")


def _call(fn: Callable[..., str], *args: Any) -> str:
    try:
        return fn(*args)
    except BeirFormatError as err:
        raise GplFormatError(str(err)) from err


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        yield from iter_jsonl(path)
    except BeirFormatError as err:
        raise GplFormatError(str(err)) from err


def _lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        yield from iter_lines(path)
    except BeirFormatError as err:
        raise GplFormatError(str(err)) from err

