"""Shard staging (plan, done records, validation), the out-of-memory halving helper, and `gplflow status`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from artifact_rows import write_artifact
from typer.testing import CliRunner

from gplflow.adapters.oom import OutOfMemoryError, halve_on_oom
from gplflow.adapters.staging import ShardStaging, staging_dirs, sum_counters
from gplflow.adapters.store import ArtifactStore
from gplflow.flows.cli import app
from gplflow.flows.status import run_status, stage_status

SCHEMA = pa.schema([("doc_id", pa.string())])


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"doc_id": ids}, schema=SCHEMA)


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(tmp_path / "run")
    return ArtifactStore(f"memory://gplflow-staging-{tmp_path.name}")


def test_shards_are_recorded_and_validated(store: ArtifactStore) -> None:
    staging = ShardStaging(store, "queries", "abc123")
    assert staging.prepare({"n_shards": 3, "shard_size": 2}) == [0, 1, 2]
    record = staging.write_parquet(1, [_table(["a", "b"])], SCHEMA, {"dropped": 1})
    assert record["rows"] == 2 and record["counters"] == {"dropped": 1} and record["file"] == "part-00001.parquet"
    staging.write_array(2, np.ones((3, 4), dtype=np.float32), {"encoded": 3})
    assert staging.pending(3) == [0]
    assert staging.read_table(1).column("doc_id").to_pylist() == ["a", "b"]
    assert staging.read_array(2).shape == (3, 4)
    assert sum_counters(staging.records(3).values()) == {"dropped": 1, "encoded": 3}
    assert staging_dirs(store, "queries") == ["abc123"] and staging_dirs(store, "triples") == []
    # the same plan again keeps the finished shards
    assert staging.prepare({"n_shards": 3, "shard_size": 2}) == [0]


def test_a_changed_or_missing_shard_file_is_not_done(store: ArtifactStore) -> None:
    staging = ShardStaging(store, "queries", "abc123")
    staging.prepare({"n_shards": 2, "shard_size": 2})
    staging.write_parquet(0, [_table(["a"])], SCHEMA)
    staging.write_parquet(1, [_table(["b"])], SCHEMA)
    with store.fs.open(staging.file(0, "parquet"), "wb") as fh:
        fh.write(b"not parquet")
    store.fs.rm(staging.file(1, "parquet"))
    assert staging.pending(2) == [0, 1]


def test_a_shard_file_without_its_done_record_is_not_done(store: ArtifactStore) -> None:
    """A process killed after writing the file but before its record: the shard is recomputed."""
    staging = ShardStaging(store, "queries", "abc123")
    staging.prepare({"n_shards": 1, "shard_size": 2})
    staging.write_parquet(0, [_table(["a"])], SCHEMA)
    store.fs.rm(f"{staging.path}/part-00000.done.json")
    assert staging.pending(1) == [0]


def test_another_plan_discards_the_staged_shards(store: ArtifactStore) -> None:
    staging = ShardStaging(store, "queries", "abc123")
    staging.prepare({"n_shards": 2, "shard_size": 5})
    staging.write_parquet(0, [_table(["a"])], SCHEMA)
    assert staging.prepare({"n_shards": 4, "shard_size": 3}) == [0, 1, 2, 3]
    assert staging.read_plan()["shard_size"] == 3


# --- out of memory ----------------------------------------------------------------------------------------

def test_oom_retries_the_batch_in_halves() -> None:
    calls = []

    def fn(batch):
        calls.append(list(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in batch]

    assert halve_on_oom(fn, [1, 2, 3, 4], what="label.batch_size") == [([1, 2], [10, 20]), ([3, 4], [30, 40])]
    assert calls == [[1, 2, 3, 4], [1, 2], [3, 4]]
    assert halve_on_oom(fn, [5], what="x") == [([5], [50])]


def test_oom_at_half_size_gives_up_naming_the_setting() -> None:
    def fn(batch):
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return batch

    with pytest.raises(OutOfMemoryError, match=r"batch of 4 and again at 2.*lower generate.batch_size"):
        halve_on_oom(fn, [1, 2, 3, 4], what="generate.batch_size")
    with pytest.raises(OutOfMemoryError, match="batch of 1"):
        halve_on_oom(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")), [1], what="x")


def test_other_errors_are_not_retried() -> None:
    calls = []

    def fn(batch):
        calls.append(batch)
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        halve_on_oom(fn, [1, 2], what="x")
    assert len(calls) == 1


def test_encoding_survives_an_injected_oom(monkeypatch) -> None:
    """adapters.encoding.encode: a batch that runs out of memory is encoded as two halves, rows unchanged."""
    from gplflow.adapters import encoding

    sizes: list[int] = []

    class Model:
        def get_embedding_dimension(self):
            return 2

        def encode_document(self, texts, batch_size, convert_to_tensor, show_progress_bar):
            sizes.append(len(texts))
            if len(texts) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return torch.tensor([[len(t), 1.0] for t in texts])

    texts = ["a", "bbb", "cc", "dddd"]
    out = encoding.encode(Model(), texts, batch_size=4, show_progress=False)
    assert out[:, 0].tolist() == [1, 3, 2, 4]
    assert sizes == [4, 2, 2]


# --- status -----------------------------------------------------------------------------------------------

def test_status_complete_partial_corrupted_missing(tmp_path) -> None:
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", [(doc_id, "", f"passage {doc_id}") for doc_id in "abc"])
    write_artifact(store, "negatives", [("x", "bm25", ["a"], [1.0])])
    staging = ShardStaging(store, "queries", "feedbeef")
    staging.prepare({"n_shards": 4, "shard_size": 1})
    staging.write_parquet(0, [_table(["q1", "q2"])], SCHEMA)
    staging.write_parquet(2, [_table(["q3"])], SCHEMA)
    (tmp_path / "run" / "negatives" / "part-00000.parquet").write_bytes(b"corrupt")
    (tmp_path / "run" / ".checkpoints" / "model-0123" / "checkpoint-20").mkdir(parents=True)
    (tmp_path / "run" / ".checkpoints" / "model-0123" / "checkpoint-10").mkdir(parents=True)

    rows = {s.stage: s for s in run_status(store)}
    assert (rows["corpus"].state, rows["corpus"].rows, rows["corpus"].rerun) == ("complete", 3, "reuse it")
    assert (rows["queries"].state, rows["queries"].shards, rows["queries"].rows) == ("partial", "2 of 4", 3)
    assert rows["queries"].fingerprint == "feedbeef"
    assert rows["queries"].rerun == "resume: compute the other 2 shards, then publish"
    assert rows["negatives"].state == "corrupted" and "checksum mismatch" in rows["negatives"].rerun
    assert rows["model"].state == "partial" and rows["model"].rerun.endswith("step 20")
    assert (rows["triples"].state, rows["triples"].rerun) == (
        "missing", "compute, if the flow is gpl and train.loss is margin_mse, kl or kl+margin_mse")

    result = CliRunner().invoke(app, ["status", str(tmp_path / "run")], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "queries" in x)
    assert "partial" in line and "2 of 4" in line


def test_status_of_a_complete_stage_mentions_other_staged_work(tmp_path) -> None:
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "queries", [("q", "d", "a query")])
    ShardStaging(store, "queries", "0a1b").prepare({"n_shards": 2, "shard_size": 1})
    status = stage_status(store, "queries")
    assert status.state == "complete" and "0 of 2 shards for fingerprint 0a1b" in status.rerun
    assert json.loads((tmp_path / "run" / ".queries.shards-0a1b" / "plan.json").read_text())["n_shards"] == 2
