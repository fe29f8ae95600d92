"""Cheap checks and full verification: how often a file's bytes are hashed, and that changed bytes are still
caught before they are used (sizes and mtimes on every read, sha256 at publish, before a stage consumes an
artifact it did not write or verify in this process, and in ``gplflow status --verify``)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from artifact_rows import write_artifact
from stage_calls import run_generate, run_ingest
from typer.testing import CliRunner

from gplflow.adapters import staging as staging_module
from gplflow.adapters import store as store_module
from gplflow.adapters.staging import ShardStaging
from gplflow.adapters.store import ArtifactStore, content_signature, forget_digests
from gplflow.flows.cli import app
from gplflow.flows.status import stage_status
from gplflow.tasks.generate import GenerateConfig
from gplflow.tasks.ingest import IngestConfig

SCHEMA = pa.schema([("doc_id", pa.string())])
HOUR_AGO = time.time() - 3600


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every sha256 read of a file's bytes, counted per path, in a process whose memo starts empty."""
    counts: Counter[str] = Counter()
    real = store_module._sha256

    def counting(fs, path: str) -> str:
        counts[path] += 1
        return real(fs, path)

    monkeypatch.setattr(store_module, "_sha256", counting)
    monkeypatch.setattr(staging_module, "_sha256", counting)
    forget_digests()
    return counts


def _count(counts: Counter[str], folder: str, name: str) -> int:
    """Hashes of ``name`` in the stage folder ``folder`` or in the temporary folder it was published from."""
    return sum(n for path, n in counts.items()
               if path.endswith(f"/{name}") and path.rsplit("/", 2)[-2] in (folder, *_tmp_names(path, folder)))


def _tmp_names(path: str, folder: str) -> list[str]:
    parent = path.rsplit("/", 2)[-2]
    return [parent] if parent.startswith(f".{folder}.tmp-") else []


def _corpus_file(tmp_path: Path, n: int = 30) -> Path:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"Bees visit flower number {i}. Nectar becomes "
                                        "honey in the comb."}) + "\n" for i in range(n)), encoding="utf-8")
    # A corpus that has sat on disk a while: a file changed in the last seconds is hashed on every read (its
    # mtime could still change within the same tick), see store.SETTLE_SECONDS.
    os.utime(src, (HOUR_AGO, HOUR_AGO))
    return src


def test_a_warm_rerun_hashes_no_file_again(tmp_path: Path, hashed: Counter[str]) -> None:
    src = _corpus_file(tmp_path)
    store = ArtifactStore(tmp_path / "run")
    cfg = IngestConfig(path=str(src))
    corpus = run_ingest(cfg, store)
    parts = [p.rsplit("/", 1)[-1] for p in corpus.part_paths()]
    assert hashed[str(src)] == 1  # the fingerprint's content signature, once, though it is asked for twice
    assert all(_count(hashed, "corpus", name) == 1 for name in parts)  # at publish
    cold = sum(hashed.values())

    generate = GenerateConfig(method="extractive", queries_per_passage=2, seed=3)
    queries = run_generate(generate, store, store.consume("corpus", expect_fingerprint=corpus.fingerprint), "",
                           shard_size=8)
    assert queries.manifest["shards"]["count"] == 4
    shards = [p for p in hashed if "/.queries.shards-" in p]
    assert len(shards) == 4 and all(hashed[p] == 1 for p in shards)  # each at staging, none again to publish
    assert all(_count(hashed, "queries", p.rsplit("/", 1)[-1]) == 0 for p in queries.part_paths())
    assert sum(hashed.values()) == cold + 4  # consuming the corpus this process wrote hashed nothing

    # the warm rerun, in the same process: every decision from sizes, mtimes and the memo
    before = dict(hashed)
    again = run_ingest(cfg, store)
    assert again.fingerprint == corpus.fingerprint
    consumed = store.consume("corpus", expect_fingerprint=again.fingerprint)
    assert consumed is not None
    assert run_generate(generate, store, consumed, "", shard_size=8).fingerprint == queries.fingerprint
    assert dict(hashed) == before

    # another process that reuses the corpus verifies it once before reading it, and only once
    forget_digests()
    assert run_ingest(cfg, store).fingerprint == corpus.fingerprint
    assert hashed[str(src)] == 2 and all(_count(hashed, "corpus", name) == 1 for name in parts)  # cheap reuse
    for _ in range(2):
        assert store.consume("corpus", expect_fingerprint=corpus.fingerprint) is not None
    assert all(_count(hashed, "corpus", name) == 2 for name in parts)


def _publish(store: ArtifactStore, ids: tuple[str, ...] = ("a", "b", "c")) -> str:
    """A published corpus of one part; returns the part's path."""
    write_artifact(store, "corpus", [(doc_id, "", f"passage {doc_id}") for doc_id in ids])
    return f"{store.path('corpus')}/part-00000.parquet"


def _flip_keeping_size_and_mtime(path: str) -> None:
    stat = os.stat(path)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_status_verify_reports_bytes_changed_behind_size_and_mtime(tmp_path: Path, hashed: Counter[str]) -> None:
    store = ArtifactStore(tmp_path / "run")
    part = _publish(store)
    _flip_keeping_size_and_mtime(part)

    assert stage_status(store, "corpus").state == "complete"  # the cheap check looks at sizes and mtimes only
    assert sum(hashed.values()) == 1  # the hash at publish
    result = CliRunner().invoke(app, ["status", str(tmp_path / "run"), "--verify"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("│ corpus "))
    assert "corrupted" in line and "checksum mismatch" in line
    plain = CliRunner().invoke(app, ["status", str(tmp_path / "run")], env={"COLUMNS": "250"})
    assert "complete" in next(x for x in plain.output.splitlines() if x.startswith("│ corpus "))

    # a stage in another process (no memo of the publish) verifies the bytes before it reads them
    forget_digests()
    assert store.load("corpus") is not None
    assert store.consume("corpus") is None
    with pytest.raises(FileNotFoundError, match="checksum mismatch"):
        store.require("corpus", check="consume")


def test_a_changed_mtime_is_hashed_once_and_the_same_bytes_are_reused(tmp_path: Path,
                                                                       hashed: Counter[str]) -> None:
    store = ArtifactStore(tmp_path / "run")
    part = _publish(store)
    os.utime(part, (HOUR_AGO, HOUR_AGO))  # copied or restored with another mtime, same bytes
    for _ in range(3):
        assert store.load("corpus") is not None
        assert store.consume("corpus") is not None
    assert sum(hashed.values()) == 2 and hashed[part] == 1  # at publish, then once for the new mtime

    Path(part).write_bytes(Path(part).read_bytes()[:-1] + b"x")  # changed bytes, same size, a new mtime
    assert store.load("corpus") is None
    assert store.problems("corpus") == [f"{store.url('corpus')}/part-00000.parquet: checksum mismatch"]


def test_a_manifest_without_mtimes_is_still_read(tmp_path: Path, hashed: Counter[str]) -> None:
    """Manifests written before mtimes were recorded: the files are hashed (once per process) instead."""
    store = ArtifactStore(tmp_path / "run")
    part = _publish(store)
    os.utime(part, (HOUR_AGO, HOUR_AGO))
    path = tmp_path / "run" / "corpus" / "manifest.json"
    manifest = json.loads(path.read_text())
    for meta in manifest["files"].values():
        del meta["mtime"]
    path.write_text(json.dumps(manifest))
    forget_digests()
    assert store.load("corpus") is not None and store.load("corpus") is not None
    assert sum(hashed.values()) == 2 and hashed[part] == 1  # at publish, then once in the "new process"


def test_publishing_to_an_object_store_records_the_mtimes_after_the_move(hashed: Counter[str]) -> None:
    """On a store where a rename is a copy (fsspec memory, s3, gcs) the files' mtimes change as the folder is
    moved into place: the manifest holds the final ones, so a later process's plain read hashes nothing."""
    store = ArtifactStore(f"memory://gplflow-verify-{time.time_ns()}")
    part = _publish(store)
    recorded = store.read_manifest("corpus")["files"]["part-00000.parquet"]["mtime"]
    assert recorded == store_module.file_state(store.fs, part).mtime
    forget_digests()
    hashed.clear()
    assert store.load("corpus") is not None
    assert sum(hashed.values()) == 0
    store.fs.pipe_file(part, b"x" * store.fs.size(part))  # rewritten: a new mtime, so it is hashed and refused
    assert store.load("corpus") is None


def test_content_signature_hashes_a_settled_file_once_per_process(tmp_path: Path, hashed: Counter[str]) -> None:
    src = _corpus_file(tmp_path)
    first = content_signature(src)
    assert content_signature(src) == first and hashed[str(src)] == 1
    src.write_text(src.read_text().replace("Bees", "Wasp"))  # same size, new mtime
    assert content_signature(src) != first and hashed[str(src)] == 2


def test_staged_shards_are_done_by_size_and_mtime_and_verified_before_publishing(tmp_path: Path,
                                                                                   hashed: Counter[str]) -> None:
    store = ArtifactStore(tmp_path / "run")
    staging = ShardStaging(store, "queries", "abc123")
    staging.prepare({"n_shards": 2, "shard_size": 2})
    staging.write_parquet(0, [pa.table({"doc_id": ["a"]}, schema=SCHEMA)], SCHEMA)
    staging.write_parquet(1, [pa.table({"doc_id": ["b"]}, schema=SCHEMA)], SCHEMA)
    assert sorted(staging.records(2, check="consume")) == [0, 1]
    assert sum(hashed.values()) == 2  # at staging only: this process wrote them
    _flip_keeping_size_and_mtime(staging.file(1, "parquet"))
    forget_digests()  # a worker that did not write the shards
    assert staging.pending(2) == []  # done-ness: sizes and mtimes
    assert sorted(staging.records(2, check="consume")) == [0]  # what publishing reads is hashed
