"""Shard-level resume: a stage killed mid-way keeps its finished shards, and the rerun computes only the others
and ends with exactly the rows (and counters) of an uninterrupted run.

The kill tests run the stage in a real subprocess and SIGKILL it. To kill it at a known point, the child
wraps one step (in the script below, not in the library): from shard ``STALL_FROM`` on, a shard first
sleeps, so the test kills the child while that shard is in flight, after the earlier shards were recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from artifact_rows import write_artifact
from stage_calls import GenerateJob, LabelJob, MineJob, run_generate, run_label, run_mine, run_train
from transformers import TrainerCallback

from gplflow.adapters.staging import ShardStaging
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.flows.status import stage_status
from gplflow.tasks import generate, label, mine, train
from gplflow.tasks.generate import GenerateConfig
from gplflow.tasks.label import LabelConfig
from gplflow.tasks.mine import MineConfig

DOCS = [
    ("d0", "Volcanoes", "Lava flows from the crater when a volcano erupts. Ash covers the valley."),
    ("d1", "", "Honey bees collect nectar from flowers. They store honey in wax combs inside the hive."),
    ("d2", "Glaciers", "A glacier carves deep valleys. The ice slowly moves down the mountain."),
    ("d3", "", "The violin has four strings. It is played with a bow made of horse hair."),
    ("d4", "Tides", "Ocean tides rise and fall twice a day. The pull of the moon causes them."),
    ("d5", "Bread", "Bakers knead the dough and let the yeast rise. Then they bake it in a hot oven."),
    ("d6", "", "Solar panels turn sunlight into electricity. Their cells are made of silicon."),
    ("d7", "Chess", "In chess the knight moves in an L shape. It can jump over other pieces."),
    ("d8", "Coffee", "Coffee beans are roasted and ground. Hot water brews them into espresso."),
    ("d9", "", "   "),
    ("d10", "Rainbows", "A rainbow appears when sunlight is refracted by raindrops in the sky."),
    ("d11", "Bicycles", "A bicycle chain turns the rear wheel. The rider pushes the pedals."),
    ("d12", "Penguins", "Penguins cannot fly. They swim fast in cold water to catch fish and krill."),
    ("d13", "", "Tea leaves are picked, withered and dried. Green tea is steamed soon after picking."),
]
SHARD_SIZE = 3  # 14 passages: 5 shards
STALL_FROM = 2
T5 = {"method": "t5", "queries_per_passage": 2, "batch_size": 4, "max_query_length": 8, "seed": 11}
KILL_WAIT_S = 120.0

CHILD = r"""
import json, sys, time
import torch
from gplflow.adapters.store import ArtifactStore
from gplflow.tasks import generate as gen

run_dir, generator, cfg, shard_size, stall_from = sys.argv[1:6]
torch.set_num_threads(1)
original = gen.GenerateJob._run

def stalling(self, k, shard, progress):
    if k >= int(stall_from):
        time.sleep(600)  # a long shard: the test SIGKILLs the process here
    return original(self, k, shard, progress)

gen.GenerateJob._run = stalling
store = ArtifactStore(run_dir)
gen.run_generate(gen.GenerateInputs(run_dir=run_dir, cfg=gen.GenerateConfig(**json.loads(cfg)),
                                    corpus=store.require("corpus").ref, generator=generator,
                                    shard_size=int(shard_size)))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models([f"{t} {x}" for _, t, x in DOCS], tmp_path_factory.mktemp("tiny"), seed=0)


def _corpus(run_dir: Path) -> ArtifactStore:
    store = ArtifactStore(run_dir)
    write_artifact(store, "corpus", DOCS)
    return store


def _rows(artifact) -> list[list]:
    return artifact.read_pandas().values.tolist()


def _shard_pids(artifact) -> list[int]:
    return [s["pid"] for s in artifact.manifest["shards"]["shards"]]


def _spy(monkeypatch, cls, method: str) -> list[int]:
    """Record the shard numbers ``cls.method(self, k, ...)`` is called with."""
    calls: list[int] = []
    original = getattr(cls, method)

    def spy(self, k, *args, **kwargs):
        calls.append(k)
        return original(self, k, *args, **kwargs)

    monkeypatch.setattr(cls, method, spy)
    return calls


def _wait_for_records(staging: ShardStaging, shards: list[int], child: subprocess.Popen) -> None:
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        if all(staging.record(k) is not None for k in shards):
            return
        if child.poll() is not None:
            raise AssertionError(f"the child exited ({child.returncode}) before shards {shards} were recorded")
        time.sleep(0.2)
    raise AssertionError(f"shards {shards} not recorded within {KILL_WAIT_S} s")


def test_generate_killed_mid_stage_resumes_only_unfinished_shards(tmp_path, tiny, monkeypatch):
    cfg = GenerateConfig(**T5)
    generator = str(tiny.generator)
    store = _corpus(tmp_path / "run")
    job = GenerateJob(cfg, store, store.require("corpus"), generator, SHARD_SIZE)
    assert job.n_shards == 5

    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "run"), generator, json.dumps(T5),
                              str(SHARD_SIZE), str(STALL_FROM)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_records(job.staging, list(range(STALL_FROM)), child)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert store.load(generate.STAGE) is None  # nothing published
    assert job.staging.pending(job.n_shards) == [2, 3, 4]  # shard 2 was in flight: lost, and only it
    status = stage_status(store, generate.STAGE)
    assert (status.state, status.shards, status.rerun) == ("partial", "2 of 5",
                                                           "resume: compute the other 3 shards, then publish")

    ran = _spy(monkeypatch, generate.GenerateJob, "_run")
    resumed = run_generate(cfg, store, store.require("corpus"), generator, SHARD_SIZE)
    assert ran == [2, 3, 4]
    assert _shard_pids(resumed) == [child.pid] * 2 + [os.getpid()] * 3
    assert not store.fs.exists(job.staging.path)  # removed once published

    straight_store = _corpus(tmp_path / "straight")
    straight = run_generate(cfg, straight_store, straight_store.require("corpus"), generator, SHARD_SIZE)
    assert _rows(resumed) == _rows(straight) and resumed.rows > 20
    assert resumed.counters == straight.counters
    assert resumed.counters["empty_passage"] == 1  # d9, in a shard of the killed run: counted once


def test_generate_recomputes_a_shard_whose_file_changed(tmp_path, monkeypatch):
    cfg = GenerateConfig(method="extractive", queries_per_passage=2, seed=3)
    store = _corpus(tmp_path / "run")
    job = GenerateJob(cfg, store, store.require("corpus"), "", SHARD_SIZE)
    job.prepare()
    for k in range(job.n_shards):
        job.run_shard(k)
    with store.fs.open(job.staging.file(1, "parquet"), "ab") as fh:
        fh.write(b"garbage")
    ran = _spy(monkeypatch, generate.GenerateJob, "_run")
    artifact = run_generate(cfg, store, store.require("corpus"), "", SHARD_SIZE)
    assert ran == [1]
    fresh = _corpus(tmp_path / "fresh")
    assert _rows(artifact) == _rows(run_generate(cfg, fresh, fresh.require("corpus"), "", SHARD_SIZE))


def test_generate_with_another_shard_size_starts_over(tmp_path, monkeypatch):
    cfg = GenerateConfig(method="extractive", queries_per_passage=2, seed=3)
    store = _corpus(tmp_path / "run")
    old = GenerateJob(cfg, store, store.require("corpus"), "", SHARD_SIZE)
    old.prepare()
    old.run_shard(0)
    ran = _spy(monkeypatch, generate.GenerateJob, "_run")
    run_generate(cfg, store, store.require("corpus"), "", 5)
    assert ran == [0, 1, 2]


# --- mine and label: resume after a crash between shards --------------------------------------------------

def _queries_and_negatives(store: ArtifactStore, tiny) -> tuple:
    run_generate(GenerateConfig(method="extractive", queries_per_passage=2, seed=5), store,
                 store.require("corpus"), "", 100)
    negatives = run_mine(MineConfig(negatives_per_query=4, batch_size=8, max_seq_length=64), store,
                         store.require("corpus"), store.require("queries"), [(str(tiny.bi_encoder), "cos_sim")], 4)
    return store.require("queries"), negatives


def test_mine_resumes_corpus_encoding_from_staged_embeddings(tmp_path, tiny, monkeypatch):
    store = _corpus(tmp_path / "run")
    run_generate(GenerateConfig(method="extractive", queries_per_passage=2, seed=5), store,
                 store.require("corpus"), "", 100)
    cfg = MineConfig(negatives_per_query=4, batch_size=8, max_seq_length=64, bm25=True)
    retrievers = [(str(tiny.bi_encoder), "cos_sim"), (str(tiny.bi_encoder) + "/", "dot")]
    job = MineJob(cfg, store, store.require("corpus"), store.require("queries"), retrievers, 4)
    assert job.n_shards == 2 * 4  # two dense retrievers x four corpus slices
    job.prepare()
    for k in (0, 1, 5):
        job.run_shard(k)
    assert job.staging.read_array(5).shape[0] == 4

    ran = _spy(monkeypatch, mine.MineJob, "run_shard")
    resumed = run_mine(cfg, store, store.require("corpus"), store.require("queries"), retrievers, 4)
    assert ran == [2, 3, 4, 6, 7]
    assert [s["rows"] for s in resumed.manifest["shards"]["shards"]] == [4, 4, 4, 2] * 2
    fresh = _corpus(tmp_path / "fresh")
    run_generate(GenerateConfig(method="extractive", queries_per_passage=2, seed=5), fresh,
                 fresh.require("corpus"), "", 100)
    straight = run_mine(cfg, fresh, fresh.require("corpus"), fresh.require("queries"), retrievers, 4)
    a, b = resumed.read_pandas(), straight.read_pandas()
    assert a[["query_id", "retriever"]].values.tolist() == b[["query_id", "retriever"]].values.tolist()
    assert [list(x) for x in a["doc_ids"]] == [list(x) for x in b["doc_ids"]]
    assert np.allclose(np.concatenate(a["scores"].to_list()), np.concatenate(b["scores"].to_list()), atol=1e-5)
    assert resumed.counters == straight.counters


def test_label_resumes_and_scores_each_pair_once(tmp_path, tiny, monkeypatch):
    store = _corpus(tmp_path / "run")
    queries, negatives = _queries_and_negatives(store, tiny)
    cfg = LabelConfig(triples=40, seed=9, batch_size=8, max_seq_length=64)
    teacher = str(tiny.cross_encoder)
    job = LabelJob(cfg, store, store.require("corpus"), queries, negatives, teacher, 40, shard_size=16)
    n = job.n_shards
    assert n >= 3
    job.prepare()
    job.run_shard(0)
    job.run_shard(n - 1)

    ran = _spy(monkeypatch, label.LabelJob, "run_shard")
    resumed = run_label(cfg, store, store.require("corpus"), queries, negatives, teacher, 40, shard_size=16)
    assert ran == list(range(1, n - 1))
    assert resumed.counters["scored_pairs"] == resumed.counters["distinct_pairs"] == len(job.draw.keys)

    fresh = _corpus(tmp_path / "fresh")
    q2, n2 = _queries_and_negatives(fresh, tiny)
    straight = run_label(cfg, fresh, fresh.require("corpus"), q2, n2, teacher, 40, shard_size=16)
    assert resumed.read_pandas().values.tolist() == straight.read_pandas().values.tolist()
    assert resumed.counters == straight.counters


# --- training: SIGKILL after a checkpoint, resume to exactly the configured steps --------------------------

TRAIN_CHILD = r"""
import sys, time
import torch
from transformers import TrainerCallback
from gplflow.adapters.store import ArtifactStore
from gplflow.tasks.train import TrainConfig, TrainInputs, run_train

run_dir, base, stall_at = sys.argv[1:4]
torch.set_num_threads(1)

class Stall(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 >= int(stall_at):
            time.sleep(600)  # the test SIGKILLs the process here

store = ArtifactStore(run_dir)
cfg = TrainConfig(loss="mnrl", steps=4, checkpoint_every=2, batch_size=4, max_seq_length=32, seed=3)
inputs = TrainInputs(run_dir=run_dir, cfg=cfg, base_model=base, corpus=store.require("corpus").ref,
                     queries=store.require("queries").ref)
run_train(inputs, callbacks=[Stall()])
"""


class _Steps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_training_killed_after_a_checkpoint_resumes_to_the_configured_steps(tmp_path, tiny):
    store = _corpus(tmp_path / "run")
    run_generate(GenerateConfig(method="extractive", queries_per_passage=2, seed=5), store,
                 store.require("corpus"), "", 100)
    checkpoints = tmp_path / "run" / ".checkpoints"
    child = subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, str(tmp_path / "run"), str(tiny.bi_encoder), "3"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while not list(checkpoints.glob("model-*/checkpoint-2/trainer_state.json")):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-2 in time"
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert store.load(train.STAGE) is None

    cfg = train.TrainConfig(loss="mnrl", steps=4, checkpoint_every=2, batch_size=4, max_seq_length=32, seed=3)
    steps = _Steps()
    model = run_train(cfg, store, str(tiny.bi_encoder), store.require("corpus"), store.require("queries"), None,
                      callbacks=[steps])
    info = model.manifest["train"]
    assert steps.steps == [3, 4]  # only the steps after the checkpoint; not one more than configured
    assert (info["steps"], info["resumed_from_step"]) == (4, 2)
