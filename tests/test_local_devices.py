"""Local runs on several devices (flows/local_devices.py, adapters/device_workers.py): the shards of generate, mine's
corpus encoding and label run one process per device and give the rows one device gives; a failing or interrupted
device process stops the others and leaves no process behind.

No GPU here: the test seam ``GPLFLOW_FAKE_DEVICES=2`` makes two CPU processes stand in for two devices. Each uses
one thread, as this test process does (conftest), so both sides compute with the same kernels.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from artifact_rows import write_artifact
from stage_calls import generate_inputs, label_inputs, mine_inputs

from gplflow.adapters import device_workers
from gplflow.adapters.device_workers import FAKE_DEVICES_VAR, DeviceFailedError, run_on_devices
from gplflow.adapters.errors import InputError
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.flows import local_devices
from gplflow.flows.config import ExecutionConfig, PipelineConfig
from gplflow.flows.stages import shard_stage
from gplflow.tasks import generate, label, mine

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
    ("d9", "Rainbows", "A rainbow appears when sunlight is refracted by raindrops in the sky."),
    ("d10", "Bicycles", "A bicycle chain turns the rear wheel. The rider pushes the pedals."),
]
SHARD_SIZE = 3  # 11 passages: 4 shards of generate, 4 of mine's encoding
T5 = generate.GenerateConfig(method="t5", queries_per_passage=2, batch_size=4, max_query_length=8, seed=11)
MINE = mine.MineConfig(negatives_per_query=4, batch_size=8, max_seq_length=64)
LABEL = label.LabelConfig(triples=40, seed=9, batch_size=8, max_seq_length=64)
LABEL_SHARD = 16  # distinct pairs per label shard


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models([f"{t} {x}" for _, t, x in DOCS], tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def two_devices(monkeypatch) -> list[str]:
    monkeypatch.setenv(FAKE_DEVICES_VAR, "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the device processes compute as this process does
    return local_devices.devices(ExecutionConfig(devices=2).devices)


def _on_devices(stage: str, inputs, found: list[str]):
    """The stage as the pipeline runs it in local mode: the shards over the devices, then the task's publish."""
    local_devices.spread(shard_stage(stage), inputs, found)
    return {"generate": generate.run_generate, "mine": mine.run_mine, "label": label.run_label}[stage](inputs)


def _shard_pids(artifact) -> list[int]:
    return [s["pid"] for s in artifact.manifest["shards"]["shards"]]


def _computed_by_two_processes(artifact, n_shards: int) -> None:
    pids = _shard_pids(artifact)
    assert len(pids) == n_shards
    assert pids[0::2] == [pids[0]] * len(pids[0::2]) and pids[1::2] == [pids[1]] * len(pids[1::2])  # round-robin
    assert len({pids[0], pids[1], os.getpid()}) == 3  # two device processes, neither this one


def test_generate_mine_and_label_over_two_stand_in_devices_give_the_rows_of_one(tmp_path, tiny, two_devices):
    assert two_devices == ["cpu:0", "cpu:1"]
    one, two = ArtifactStore(tmp_path / "one"), ArtifactStore(tmp_path / "two")
    corpus = {s: write_artifact(s, "corpus", DOCS) for s in (one, two)}
    generator, retrievers, teacher = str(tiny.generator), [(str(tiny.bi_encoder), "cos_sim")], str(tiny.cross_encoder)

    # generate: T5 sampling, seeded per shard
    q1 = generate.run_generate(generate_inputs(T5, one, corpus[one], generator, SHARD_SIZE))
    q2 = _on_devices("generate", generate_inputs(T5, two, corpus[two], generator, SHARD_SIZE), two_devices)
    _computed_by_two_processes(q2, 4)
    assert q2.read_pandas().values.tolist() == q1.read_pandas().values.tolist() and q1.rows == 22
    assert q2.fingerprint == q1.fingerprint and q2.counters == q1.counters

    # mine: the corpus encoding is sharded; doc_ids exactly, scores within float tolerance
    n1 = mine.run_mine(mine_inputs(MINE, one, corpus[one], q1, retrievers, SHARD_SIZE))
    n2 = _on_devices("mine", mine_inputs(MINE, two, corpus[two], q2, retrievers, SHARD_SIZE), two_devices)
    _computed_by_two_processes(n2, 4)
    a, b = n2.read_pandas(), n1.read_pandas()
    assert a[["query_id", "retriever"]].values.tolist() == b[["query_id", "retriever"]].values.tolist()
    assert [list(x) for x in a["doc_ids"]] == [list(x) for x in b["doc_ids"]] and len(a) == 22
    assert np.allclose(np.concatenate(a["scores"].to_list()), np.concatenate(b["scores"].to_list()), atol=1e-6)

    # label: teacher scores of the distinct pairs, sharded
    t1 = label.run_label(label_inputs(LABEL, one, corpus[one], q1, n1, teacher, 40, LABEL_SHARD))
    t2 = _on_devices("label", label_inputs(LABEL, two, corpus[two], q2, n2, teacher, 40, LABEL_SHARD), two_devices)
    shards = t2.manifest["shards"]["count"]
    assert shards >= 3
    _computed_by_two_processes(t2, shards)
    a, b = t2.read_pandas(), t1.read_pandas()
    ids = ["query_id", "pos_doc_id", "neg_doc_id"]
    assert a[ids].values.tolist() == b[ids].values.tolist() and len(a) == 40
    for column in ("pos_score", "neg_score", "margin"):
        assert np.allclose(a[column], b[column], atol=1e-5), column
    assert t2.counters == t1.counters


def test_devices_compute_only_the_shards_a_killed_run_left(tmp_path, two_devices):
    extractive = generate.GenerateConfig(method="extractive", queries_per_passage=2, seed=3)  # no model to load
    store, fresh = ArtifactStore(tmp_path / "run"), ArtifactStore(tmp_path / "fresh")
    inputs = generate_inputs(extractive, store, write_artifact(store, "corpus", DOCS), "", SHARD_SIZE)
    job = generate.GenerateJob(inputs)
    job.prepare()
    for k in (0, 2):  # what a killed run finished
        job.run_shard(k)
    resumed = _on_devices("generate", inputs, two_devices)
    pids = _shard_pids(resumed)
    assert pids[0] == pids[2] == os.getpid() and len({pids[1], pids[3], os.getpid()}) == 3  # 1 and 3: one each
    straight = generate.run_generate(generate_inputs(extractive, fresh, write_artifact(fresh, "corpus", DOCS), "",
                                                     SHARD_SIZE))
    assert resumed.read_pandas().values.tolist() == straight.read_pandas().values.tolist() and resumed.rows > 15


def test_a_stage_published_of_one_shard_or_on_a_server_starts_no_process(tmp_path, two_devices, monkeypatch):
    store = ArtifactStore(tmp_path)
    corpus = write_artifact(store, "corpus", DOCS)
    started = []
    monkeypatch.setattr(device_workers, "run_on_devices", lambda *a, **k: started.append(a))
    extractive = generate.GenerateConfig(method="extractive", queries_per_passage=2, seed=3)
    local_devices.spread(shard_stage("generate"), generate_inputs(extractive, store, corpus, "", 100), two_devices)
    inputs = generate_inputs(extractive, store, corpus, "", SHARD_SIZE)
    generate.run_generate(inputs)
    local_devices.spread(shard_stage("generate"), inputs, two_devices)
    # an LLM behind a server: its max_concurrency bounds the requests in flight, N processes would multiply it
    remote = generate.GenerateConfig(method="llm", queries_per_passage=2,
                                     endpoint=generate.EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    local_devices.spread(shard_stage("generate"), generate_inputs(remote, ArtifactStore(tmp_path / "llm"), corpus,
                                                                  "", SHARD_SIZE), two_devices)
    assert started == []


def test_devices_auto_and_n_and_too_many(monkeypatch):
    monkeypatch.delenv(FAKE_DEVICES_VAR, raising=False)
    monkeypatch.setenv("GPLFLOW_DEVICE", "cpu")
    assert local_devices.devices("auto") == ["cpu"] and local_devices.devices(1) == ["cpu"]
    with pytest.raises(InputError, match=r"execution.devices 2: this process sees no GPU; .* at most 1"):
        local_devices.devices(2)
    assert local_devices.problem("auto") is None and "at most 1" in local_devices.problem(2)
    monkeypatch.setenv(FAKE_DEVICES_VAR, "3")
    assert local_devices.devices("auto") == ["cpu:0", "cpu:1", "cpu:2"] and local_devices.devices(2) == ["cpu:0",
                                                                                                           "cpu:1"]
    monkeypatch.setenv(FAKE_DEVICES_VAR, "two")
    with pytest.raises(InputError, match="GPLFLOW_FAKE_DEVICES='two': expected a positive integer"):
        local_devices.devices("auto")


def test_execution_devices_is_auto_or_a_positive_count():
    assert ExecutionConfig().devices == "auto" and ExecutionConfig(devices=4).devices == 4
    for bad, why in (("0", "must be 'auto' or an integer >= 1, got 0"), ("all", "got 'all', expected a valid integer"),
                     ("true", "got True, expected a number")):
        with pytest.raises(ValueError) as caught:
            PipelineConfig.load(None, ["corpus.path=x", f"execution.devices={bad}"])
        assert str(caught.value).startswith(f"--set execution.devices={bad}: 'execution.devices': ")
        assert why in str(caught.value)


def test_a_pinned_process_sees_its_one_gpu_or_the_cpu(monkeypatch):
    assert device_workers.pinned_env("cuda:3", 4) == {"CUDA_VISIBLE_DEVICES": "3"}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = device_workers.pinned_env("cpu:1", 2)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["GPLFLOW_DEVICE"] == "cpu"
    assert cpu["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))


def _workers() -> list[psutil.Process]:
    """This process's device processes still alive."""
    found = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    return [p for p in found if p.status() != psutil.STATUS_ZOMBIE and device_workers.__name__ in " ".join(p.cmdline())]


@pytest.mark.serial
def test_a_failing_device_stops_the_others_with_one_line_naming_it(tmp_path):
    started = time.monotonic()
    # cpu:0 sleeps for 10 minutes; cpu:1 fails at once (time.sleep of a string)
    with pytest.raises(DeviceFailedError) as caught:
        run_on_devices(tmp_path, "time:sleep", {"cpu:0": 600, "cpu:1": "x"}, what="label shards")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("label shards: the process on cpu:1 (one of 2 devices, pid ")
    assert message.endswith("failed: TypeError: 'str' object cannot be interpreted as an integer")
    assert _workers() == []  # cpu:0 was stopped
    assert time.monotonic() - started < 30


def test_a_user_error_on_a_device_comes_back_as_one_input_error_naming_the_device(tmp_path):
    missing = str(tmp_path / "no-model")
    with pytest.raises(InputError) as caught:
        run_on_devices(tmp_path / "job", "gplflow.adapters.model_refs:resolve", {"cpu:0": missing, "cpu:1": missing},
                       what="mine shards")
    assert re.fullmatch(rf"mine shards: on cpu:[01]: model folder '{re.escape(missing)}' does not exist",
                        str(caught.value))
    assert _workers() == []


@pytest.mark.serial
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_or_killed_launcher_leaves_no_device_process(tmp_path, how):
    """Ctrl-C stops the device processes; a launcher killed outright takes them with it (parent-death signal)."""
    script = ("import sys; from pathlib import Path; from gplflow.adapters.device_workers import run_on_devices; "
              "run_on_devices(Path(sys.argv[1]), 'time:sleep', {'cpu:0': 600, 'cpu:1': 600}, what='generate')")
    # SIGINT's default handling, as a foreground command has it (a suite started in the background ignores it)
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "job")], start_new_session=True,
                              stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        family: list[psutil.Process] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(family) < 2:
            time.sleep(0.2)
            family = [p for p in psutil.Process(parent.pid).children() if p.is_running()]
        assert len(family) == 2, "the device processes did not start"
        parent.send_signal(how)
        assert parent.wait(timeout=30) != 0
        _, alive = psutil.wait_procs(family, timeout=15)
        assert alive == []
        if how == signal.SIGINT:
            assert b"KeyboardInterrupt" in parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_plan_spreads_the_shardable_stages_over_the_devices(two_devices):
    from gplflow.flows.plan import on_devices, planned_stages
    from gplflow.tasks.planning import Measured, StagePlan

    cfg = PipelineConfig.from_dict({"corpus": {"path": "corpus.jsonl"}})
    details = {s.stage: s.detail for s in planned_stages(cfg, 100)}
    for stage in ("generate", "mine", "label"):
        assert "; shards on 2 devices: one device's rate x2" in details[stage], stage
    assert "(its sharded part)" in details["mine"] and "devices" not in details["train"]
    pool = PipelineConfig.from_dict({"corpus": {"path": "corpus.jsonl"}, "execution": {"mode": "pool"}})
    assert "devices" not in {s.stage: s.detail for s in planned_stages(pool, 100)}["generate"]
    served = PipelineConfig.from_dict({"corpus": {"path": "corpus.jsonl"}, "generate": {
        "method": "llm", "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}})
    details = {s.stage: s.detail for s in planned_stages(served, 100)}
    assert "devices" not in details["generate"] and "shards on 2 devices" in details["label"]

    plan = StagePlan(100, "texts", "x", measure=lambda _resolved, _passages: 10.0)
    assert on_devices(plan, 2).measure({}, []) == Measured(20.0)
    assert on_devices(plan, 1) is plan
    # mine: 60 of 100 texts are the corpus encoding, sharded; the queries are not: 100 / (40 + 30) texts per unit time
    mined = on_devices(StagePlan(100, "texts", "x", measure=lambda _r, _p: Measured(10.0, 5.0, "index"), sharded=60), 2)
    assert mined.measure({}, []).rate == pytest.approx(10.0 * 100 / 70) and mined.measure({}, []).beside == 5.0
