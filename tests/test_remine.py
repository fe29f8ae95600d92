"""Re-mining rounds (train.remine_every): the student re-mines between rounds, only new pairs are scored, a
frozen student changes nothing, and a run killed in the middle of round 2 ends as an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from uuid import uuid4

import pytest
import torch
from artifact_rows import write_artifact
from crash import CrashAt
from sentence_transformers import CrossEncoder, SentenceTransformer
from stage_calls import run_label, run_mine

from gplflow.adapters.device_workers import FAKE_DEVICES_VAR
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.flows import local_devices, shards
from gplflow.flows.config import PipelineConfig
from gplflow.flows.status import run_status
from gplflow.tasks.base import spreading
from gplflow.tasks.label import LabelConfig
from gplflow.tasks.mine import MineConfig
from gplflow.tasks.remine import Rounds
from gplflow.tasks.train import TrainConfig, TrainInputs, run_train

TOPICS = ["bees honey hive", "volcano lava ash", "glacier ice valley", "violin strings bow", "tides moon sea",
          "bread yeast oven", "solar panel light", "chess knight board", "coffee beans roast", "penguin ice fish"]
CORPUS = [(f"d{i}", "", f"The {t} story number {i % 3} tells of {t.split()[0]} and more.")
          for i, t in enumerate(TOPICS * 2)]
QUERIES = [(f"q{i}", f"d{i}", f"what about {t.split()[i % 3]}") for i, t in enumerate(TOPICS)]
MINE = MineConfig(negatives_per_query=5, batch_size=8, max_seq_length=32)
LABEL = LabelConfig(batch_size=8, max_seq_length=64, negatives_per_example=2)


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("GPLFLOW_NO_BF16", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models([t for *_, t in CORPUS + QUERIES], tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    """corpus, queries, the mine stage's negatives (the student's base as the retriever) and round 1's labels."""
    store = ArtifactStore(tmp_path_factory.mktemp("prepared"))
    corpus, queries = write_artifact(store, "corpus", CORPUS), write_artifact(store, "queries", QUERIES)
    negatives = run_mine(MINE, store, corpus, queries, [(str(tiny.bi_encoder), "dot")])
    run_label(LABEL, store, corpus, queries, negatives, str(tiny.cross_encoder), 2 * 4)
    return store.root


def _run(prepared, tiny, root, callbacks=(), shard_size=1000, **overrides):
    shutil.copytree(prepared, root, dirs_exist_ok=True)
    store = ArtifactStore(root)
    cfg = TrainConfig(**{"loss": "kl", "steps": 4, "remine_every": 2, "batch_size": 4, "learning_rate": 5e-3,
                         "warmup_steps": 0, "checkpoint_every": 1, "max_seq_length": 32, "seed": 5, **overrides})
    rounds = Rounds(mine=MINE, label=LABEL, teacher=str(tiny.cross_encoder), negatives=store.require("negatives").ref,
                    shard_size=shard_size)
    inputs = TrainInputs(run_dir=str(root), cfg=cfg, base_model=str(tiny.bi_encoder),
                         corpus=store.require("corpus").ref, queries=store.require("queries").ref,
                         triples=store.require("triples").ref, rounds=rounds)
    return store, run_train(inputs, callbacks)


def _pairs(artifact):
    pairs = set()
    for row in artifact.read_table().to_pylist():
        pairs |= {(row["query_id"], row["pos_doc_id"])} | {(row["query_id"], d) for d in row["neg_doc_ids"]}
    return pairs


def _counting(monkeypatch):
    calls: list[tuple[str, str]] = []
    original = CrossEncoder.predict

    def counting(self, inputs, *args, **kwargs):
        calls.extend(tuple(p) for p in inputs)
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(CrossEncoder, "predict", counting)
    return calls


def test_a_frozen_student_remines_the_same_negatives_and_scores_nothing(prepared, tiny, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    store, model = _run(prepared, tiny, tmp_path / "run", learning_rate=0.0)
    rounds = model.manifest["train"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["steps"] == [3, 4]
    assert rounds[1]["negatives_changed"] == 0 and rounds[1]["new_pairs_scored"] == 0 and calls == []
    assert _pairs(store.require("triples-round-2")) == _pairs(store.require("triples"))


def test_rounds_remine_with_the_student_score_only_new_pairs_and_resume_mid_round(prepared, tiny, tmp_path,
                                                                                   monkeypatch):
    calls = _counting(monkeypatch)
    store, model = _run(prepared, tiny, tmp_path / "straight")
    rounds = model.manifest["train"]["rounds"]
    assert [r["steps"] for r in rounds] == [[1, 2], [3, 4]]
    first, labels = _pairs(store.require("triples")), store.require("triples-round-2")
    new = _pairs(labels) - first
    assert rounds[1]["new_pairs_scored"] == labels.counters["scored_pairs"] == len(new) > 0
    assert rounds[1]["reused_pairs"] == len(_pairs(labels) & first) > 0
    assert rounds[1]["negatives_changed"] > 0  # the student moved: its negatives are not the base's
    assert len(calls) == len(set(calls)) == len(new)  # the teacher scored the new pairs, each once
    assert all(r["loss_first"] is not None for r in rounds)

    with pytest.raises(RuntimeError, match="simulated crash before step 4"):
        _run(prepared, tiny, tmp_path / "killed", callbacks=[CrashAt(4)])
    listed = {row.stage: row for row in run_status(ArtifactStore(tmp_path / "killed"))}
    names = list(listed)
    assert names.index("triples") < names.index("negatives-round-2") < names.index("triples-round-2") \
        < names.index("model")  # gplflow status shows the rounds where training makes them
    assert listed["triples-round-2"].state == "complete" and listed["triples-round-2"].rows == 2 * 4
    assert listed["model"].state == "partial" and "step 3" in listed["model"].rerun
    killed, resumed = _run(prepared, tiny, tmp_path / "killed")
    assert resumed.manifest["train"]["resumed_from_step"] == 3  # in the middle of round 2 (steps 3-4)
    for name in ("negatives-round-2", "triples-round-2"):
        assert killed.require(name).fingerprint == store.require(name).fingerprint
        assert killed.require(name).read_table().equals(store.require(name).read_table())
    a = SentenceTransformer(str(killed.url("model")), device="cpu").state_dict()
    b = SentenceTransformer(str(store.url("model")), device="cpu").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["loss_last"] for r in resumed.manifest["train"]["rounds"]] == pytest.approx(
        [r["loss_last"] for r in rounds], abs=1e-6)


class InProcessPool:
    """A stand-in for the pool's dispatcher: each shard run is ``shard_flow`` called here, on its parameters as the
    API hands them to a worker (JSON), two in flight."""

    def __init__(self):
        self.runs: list[dict] = []

    def check(self):
        pass

    def capacity(self):
        return 2

    def submit(self, shard, parameters):
        parameters = json.loads(json.dumps(parameters))
        self.runs.append(parameters)
        shards.shard_flow.fn(**parameters)
        return shards.Attempt(shard, uuid4(), f"{parameters['stage']} shard {shard}", state="COMPLETED")

    def poll(self, attempts):
        return list(attempts)

    def cancel(self, attempts, why):
        return []


def test_a_rounds_encoding_and_labelling_spread_over_devices_and_the_pool_give_one_process_rows(
        prepared, tiny, tmp_path, monkeypatch):
    store, _ = _run(prepared, tiny, tmp_path / "straight", shard_size=6)
    made = ("negatives-round-2", "triples-round-2")

    monkeypatch.setenv(FAKE_DEVICES_VAR, "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the device processes compute as this process does (conftest)
    found = local_devices.devices(2)
    spread: list[str] = []

    def on_devices(job):
        spread.append(job.stage)
        local_devices.spread_job(job, found, job.stage)

    with spreading(on_devices):
        devices, _ = _run(prepared, tiny, tmp_path / "devices", shard_size=6)
    assert spread == list(made)

    pool, cfg = InProcessPool(), PipelineConfig.load(None, ["corpus.path=c.jsonl", "execution.mode=pool"])
    monkeypatch.setattr(shards, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(shards, "_label_flow_run", lambda: None)
    monkeypatch.setattr(shards, "device_limits", lambda devices: [shards.limit_name(d) for d in devices])
    monkeypatch.setattr(shards, "concurrency", lambda *args, **kwargs: contextlib.nullcontext())
    with spreading(lambda job: shards.fan_out_job(cfg, job, dispatcher=pool)):
        pooled, _ = _run(prepared, tiny, tmp_path / "pool", shard_size=6)
    assert sorted({run["stage"] for run in pool.runs}) == sorted(made)
    assert all(run["job"]["inputs"]["run_dir"] == str((tmp_path / "pool").resolve()) for run in pool.runs)

    for name in made:
        expected = store.require(name)
        n_shards = expected.manifest["shards"]["count"] if "shards" in expected.manifest else None
        for other in (devices, pooled):
            assert other.require(name).fingerprint == expected.fingerprint
            assert other.require(name).read_table().equals(expected.read_table())
        assert len([run for run in pool.runs if run["stage"] == name]) == n_shards > 1
        pids = {s["pid"] for s in devices.require(name).manifest["shards"]["shards"]}
        assert len(pids) == 2 and os.getpid() not in pids  # each device's process computed its shards
