"""The stage registry: a new stage is a task plus one entry, and the flow, `gplflow status` and the report see it.

The toy stage counts the words of each passage into ``wordcounts/``. It is added to ``flows.stages.STAGES``
and nowhere else; the test runs a GenQ flow (extractive queries, tiny models) with it and checks the artifact's
values, its status row, its report row, that a rerun serves it from the cache (Cached in Prefect), and that a
deleted part is recomputed. With an ``estimate`` the same entry also shows in ``gplflow run --plan``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from prefect import task

from gplflow.adapters.store import ArtifactStore, fingerprint
from gplflow.flows import stages
from gplflow.flows.config import PipelineConfig
from gplflow.flows.pipeline import genq_pipeline
from gplflow.flows.report import stage_rows
from gplflow.flows.stages import Stage
from gplflow.flows.status import run_status
from gplflow.tasks.base import reuse, stage_cache

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
N_DOCS = 24
TOY = "wordcounts"



# --- the toy stage's task module (what a contributor writes) ------------------------------------------------

def _toy_fingerprint(corpus_fp: str) -> str:
    return fingerprint(TOY, {}, {"corpus": corpus_fp}, "toy-1")


@task(name="count words", persist_result=True,
      cache_policy=stage_cache(TOY, lambda p: _toy_fingerprint(p["corpus_fp"])))
def count_words_task(run_dir: str, corpus_fp: str) -> str:
    store = ArtifactStore(run_dir)
    if (found := reuse(store, TOY, _toy_fingerprint(corpus_fp))) is not None:
        return found.fingerprint
    corpus = store.require("corpus").read_table(["doc_id", "text"])
    counts = pa.table({"doc_id": corpus["doc_id"],
                       "words": pa.array([len(t.split()) for t in corpus["text"].to_pylist()], pa.int64())})
    with store.writer(TOY, config={}, inputs={"corpus": corpus_fp}, code_version="toy-1") as out:
        out.write_part([counts], counts.schema)
    return store.require(TOY).fingerprint


TOY_STAGE = Stage("count words", (TOY,), ("corpus",), count_words_task,
                  params=lambda run: {"run_dir": run.run_dir, "corpus_fp": run.fps["corpus"]},
                  when=lambda run: run.cfg.name.startswith("toy"), condition="the run's name starts with toy")


def _toy_estimate(cfg, n: int):
    from gplflow.flows.plan import StagePlan

    return StagePlan(n, "passages", f"{n} passages split on spaces",
                     measure=lambda resolved, passages: len(passages) / 0.5)


# --- the test ---------------------------------------------------------------------------------------------

@pytest.fixture
def registered():
    """The toy entry in the registry, right after ingest; removed afterwards."""
    stages.STAGES.insert(1, TOY_STAGE)
    try:
        yield
    finally:
        stages.STAGES.remove(TOY_STAGE)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def config(tmp_path) -> Path:
    docs = [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text().splitlines()[:N_DOCS]]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = {"name": "toy-run", "profile": "tiny", "flow": "genq", "corpus": {"path": "corpus.jsonl"},
           "generate": {"method": "extractive", "queries_per_passage": 1, "seed": 1},
           "train": {"loss": "mnrl", "steps": 1, "batch_size": 4, "max_seq_length": 32, "warmup_steps": 0},
           "evaluate": {"heldout_fraction": 0}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _task_states(state) -> dict[str, str]:
    """{task run name: state name} of the flow run behind a returned ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


@pytest.mark.slow
def test_a_stage_added_to_the_registry_alone_runs_in_the_flow_status_and_report(prefect_api, registered, config,
                                                                                tmp_path):
    run_dir = tmp_path / "run"
    store = ArtifactStore(run_dir)
    run_dir.mkdir()
    before = {row.stage: row for row in run_status(store)}
    assert before[TOY].state == "missing" and before[TOY].rerun == "compute, if the run's name starts with toy"

    first = genq_pipeline(str(config), [], str(run_dir), return_state=True)
    counts = store.require(TOY).read_pandas()
    corpus = store.require("corpus").read_pandas()
    assert len(counts) == N_DOCS
    assert counts["words"].tolist() == [len(t.split()) for t in corpus["text"]]
    assert first.result()["fingerprints"][TOY] == store.require(TOY).fingerprint
    assert _task_states(first)["count words"] == "Completed"

    status = {row.stage: row for row in run_status(store)}
    assert status[TOY].state == "complete" and status[TOY].rows == N_DOCS
    assert list(status).index(TOY) == list(status).index("corpus") + 1  # listed where the registry puts it
    report = {row["stage"]: row for row in stage_rows(store)}
    assert report[f"count words → {TOY}"]["rows"] == N_DOCS

    manifest = (run_dir / TOY / "manifest.json").read_bytes()
    second = genq_pipeline(str(config), [], str(run_dir), return_state=True)
    assert _task_states(second)["count words"] == "Cached"
    assert (run_dir / TOY / "manifest.json").read_bytes() == manifest

    (run_dir / TOY / "part-00000.parquet").unlink()  # a stale cache record must not hand back a missing artifact
    third = genq_pipeline(str(config), [], str(run_dir), return_state=True)
    assert _task_states(third)["count words"] == "Completed"
    assert store.require(TOY).read_pandas()["words"].tolist() == counts["words"].tolist()


def test_a_stage_added_to_the_registry_with_an_estimate_shows_in_the_plan(config, tmp_path):
    from gplflow.flows.plan import make_plan, planned_stages

    toy = dataclasses.replace(TOY_STAGE, estimate=_toy_estimate)
    stages.STAGES.insert(1, toy)
    try:
        cfg = PipelineConfig.load(config)
        plan = make_plan(cfg, str(tmp_path / "run"), calibrate=False)
        other = planned_stages(PipelineConfig.load(config, ["name=other"]), N_DOCS)
    finally:
        stages.STAGES.remove(toy)
    assert [s.stage for s in plan.stages] == ["count words", "generate", "train"]  # registry order, its `when`
    assert plan.stages[0].work == N_DOCS and plan.stages[0].detail == f"{N_DOCS} passages split on spaces"
    assert plan.stages[0].measure(None, ["a", "b"]) == 4.0
    assert [s.stage for s in other] == ["generate", "train"]  # `when` is false for a run not named toy…
    assert not (tmp_path / "run").exists()


def test_the_registry_names_every_artifact_once_and_every_shardable_stage():
    names = stages.artifact_names()
    assert len(names) == len(set(names))
    assert names[:2] == ["corpus", "pairs"] and names[-2:] == ["evaluate", "promoted"]
    assert set(stages.shardable()) == {"generate", "mine", "label"}
    assert stages.shard_stage("triples").step == "label"
    assert stages.made_by("queries-train") == "split"
    with pytest.raises(ValueError, match="not shardable"):
        stages.shard_stage("model")


def _module_imports(path: Path) -> set[str]:
    """The gplflow modules ``path`` imports at module level (imports inside functions are deliberate and lazy)."""
    import ast

    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gplflow."):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("gplflow."))
    return found


def test_imports_go_one_way_and_form_no_circle():
    root = Path(__file__).resolve().parents[1]
    modules = {f"gplflow.{p.parent.name}.{p.stem}": p for layer in ("adapters", "tasks", "flows")
               for p in (root / layer).glob("*.py") if p.stem != "__init__"}
    graph = {name: _module_imports(path) & set(modules) for name, path in modules.items()}
    rank = {"adapters": 0, "tasks": 1, "flows": 2}
    upward = [(a, b) for a, deps in graph.items() for b in deps if rank[b.split(".")[1]] > rank[a.split(".")[1]]]
    assert upward == []

    def circle(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for dep in graph[node]:
            if dep == start:
                return (*seen, dep)
            if dep not in seen and (found := circle(start, dep, (*seen, dep))):
                return found
        return None

    assert [c for name in graph if (c := circle(name, name, (name,)))] == []


def test_a_model_folder_replaced_in_place_is_a_new_input_of_every_stage_that_uses_it(tmp_path):
    """generate, mine, label, pretrain and train fingerprint a local model folder by content, not by path."""
    from gplflow.adapters.model_refs import model_signature
    from gplflow.adapters.store import forget_digests
    from gplflow.tasks.generate import GenerateConfig, generate_fingerprint
    from gplflow.tasks.label import LabelConfig, label_fingerprint
    from gplflow.tasks.mine import MineConfig, mine_fingerprint
    from gplflow.tasks.pretrain import PretrainConfig, pretrain_fingerprint
    from gplflow.tasks.train import TrainConfig, train_fingerprint

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"weights one")
    ref = str(folder)

    def fingerprints() -> list[str]:
        forget_digests()  # as a new process would
        return [generate_fingerprint(GenerateConfig(), "c", ref),
                mine_fingerprint(MineConfig(), "c", "q", [(ref, "dot")]),
                label_fingerprint(LabelConfig(), 8, "c", "q", "n", ref),
                pretrain_fingerprint(PretrainConfig(method="tsdae"), "c", ref),
                train_fingerprint(TrainConfig(), ref, "t", "c")]

    before = fingerprints()
    assert fingerprints() == before  # the same folder, the same inputs
    (folder / "model.safetensors").write_bytes(b"weights two")  # retrained and saved over the old one
    after = fingerprints()
    assert all(a != b for a, b in zip(before, after, strict=True)), (before, after)
    assert model_signature("sentence-transformers/not-cached-here").startswith("hub:sentence-transformers/")
    assert model_signature("") == ""
