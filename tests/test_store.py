"""The artifact store: atomic publish, manifests with checksums, validation on read, fsspec URLs."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from gplflow.adapters.store import ArtifactStore, content_signature, fingerprint

SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string())])


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"doc_id": ids, "text": [f"text of {i}" for i in ids]}, schema=SCHEMA)


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(tmp_path / "run")
    return ArtifactStore(f"memory://gplflow-test-{tmp_path.name}")


def _publish(store: ArtifactStore, parts: list[list[str]], config: dict | None = None) -> None:
    with store.writer("corpus", config=config or {"k": 1}, inputs={"src": "abc"}) as out:
        for index, ids in enumerate(parts):
            out.write_part([_table(ids)], SCHEMA, index=index)
        out.count("dropped", 3)


def test_publish_writes_parts_and_manifest(store: ArtifactStore) -> None:
    _publish(store, [["a", "b"], ["c"]])
    artifact = store.load("corpus")
    assert artifact is not None
    assert artifact.rows == 3
    assert artifact.read_table().column("doc_id").to_pylist() == ["a", "b", "c"]
    manifest = artifact.manifest
    assert sorted(manifest["files"]) == ["part-00000.parquet", "part-00001.parquet"]
    assert [manifest["files"][n]["rows"] for n in sorted(manifest["files"])] == [2, 1]
    assert manifest["counters"] == {"dropped": 3}
    assert manifest["fingerprint"] == fingerprint("corpus", {"k": 1}, {"src": "abc"}, manifest["code_version"])
    assert manifest["inputs"] == {"src": "abc"}


def test_manifest_checksums_match_parts(tmp_path) -> None:
    import hashlib

    store = ArtifactStore(tmp_path)
    _publish(store, [["a", "b"]])
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    part = tmp_path / "corpus" / "part-00000.parquet"
    assert manifest["files"]["part-00000.parquet"]["sha256"] == hashlib.sha256(part.read_bytes()).hexdigest()
    assert manifest["files"]["part-00000.parquet"]["size"] == part.stat().st_size


def test_failure_inside_writer_leaves_nothing(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError), store.writer("corpus", config={}) as out:
        out.write_part([_table(["a"])], SCHEMA)
        raise RuntimeError("crash mid-stage")
    assert store.load("corpus") is None
    assert not store.fs.exists(store.root) or store.fs.ls(store.root) == []


def test_failure_keeps_the_previous_artifact(store: ArtifactStore) -> None:
    _publish(store, [["a"]])
    with pytest.raises(RuntimeError), store.writer("corpus", config={"k": 2}) as out:
        out.write_part([_table(["z"])], SCHEMA)
        raise RuntimeError("crash")
    assert store.require("corpus").read_table().column("doc_id").to_pylist() == ["a"]


def test_republish_replaces(store: ArtifactStore) -> None:
    _publish(store, [["a", "b"]])
    _publish(store, [["c"]], config={"k": 2})
    artifact = store.require("corpus")
    assert artifact.read_table().column("doc_id").to_pylist() == ["c"]
    assert [p.rsplit("/", 1)[-1] for p in store.fs.ls(store.root, detail=False)] == ["corpus"]


def test_deleted_part_means_absent(store: ArtifactStore) -> None:
    _publish(store, [["a"], ["b"]])
    store.fs.rm(f"{store.path('corpus')}/part-00001.parquet")
    assert store.load("corpus") is None
    assert any("part-00001.parquet: missing" in p for p in store.problems("corpus"))
    with pytest.raises(FileNotFoundError, match=r"part-00001\.parquet: missing"):
        store.require("corpus")


def test_corrupted_part_means_absent(store: ArtifactStore) -> None:
    _publish(store, [["a", "b"]])
    path = f"{store.path('corpus')}/part-00000.parquet"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    store.fs.pipe_file(path, bytes(data))
    assert store.load("corpus") is None
    assert store.problems("corpus") == [f"{store.url('corpus')}/part-00000.parquet: checksum mismatch"]


def test_missing_or_broken_manifest_means_absent(store: ArtifactStore) -> None:
    _publish(store, [["a"]])
    store.fs.pipe_file(f"{store.path('corpus')}/manifest.json", b"{not json")
    assert store.load("corpus") is None
    store.fs.rm(f"{store.path('corpus')}/manifest.json")
    assert store.load("corpus") is None


def test_expected_fingerprint(store: ArtifactStore) -> None:
    _publish(store, [["a"]])
    fp = store.require("corpus").fingerprint
    assert store.load("corpus", expect_fingerprint=fp) is not None
    assert store.load("corpus", expect_fingerprint="0" * 20) is None


def test_model_folder_files_are_checksummed(store: ArtifactStore) -> None:
    with store.writer("model", config={}) as out:
        folder = out.local_dir()
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    artifact = store.require("model")
    assert set(artifact.manifest["files"]) == {"config.json", "sub/weights.bin"}
    assert (artifact.local_dir() / "sub" / "weights.bin").read_bytes() == b"\x00" * 10


def test_fingerprint_is_stable_and_sensitive() -> None:
    base = fingerprint("s", {"a": 1, "b": [1, 2]}, {"x": "1"}, "v1")
    assert base == fingerprint("s", {"b": [1, 2], "a": 1}, {"x": "1"}, "v1")
    assert base != fingerprint("s", {"a": 2, "b": [1, 2]}, {"x": "1"}, "v1")
    assert base != fingerprint("s", {"a": 1, "b": [1, 2]}, {"x": "2"}, "v1")
    assert base != fingerprint("s", {"a": 1, "b": [1, 2]}, {"x": "1"}, "v2")


def test_content_signature_follows_content_not_mtime(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    first = content_signature(tmp_path / "d")
    (tmp_path / "d" / "a.txt").write_text("alpha")  # rewritten, same bytes
    assert content_signature(tmp_path / "d") == first
    (tmp_path / "d" / "a.txt").write_text("alphA")
    assert content_signature(tmp_path / "d") != first
    with pytest.raises(FileNotFoundError, match="no such file"):
        content_signature(tmp_path / "nope")
