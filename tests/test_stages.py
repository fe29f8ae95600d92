"""The stage contract: a new stage is one module plus one registry entry, and every part of gplflow sees it.

The toy stage counts, for each passage, its words of at least ``wordcounts.min_length`` characters into
``wordcounts/``. Its module (the block below, as a contributor would write it in ``tasks/wordcounts.py``) holds
its config section, its artifact's schema, its typed inputs, its plain function, its task, its estimate and its
report line; the registry gets one entry (``registered``). No other product file changes: the test fails if the
config rejected the new section, or the flow, ``gplflow status``, the report, ``--plan`` or ``gplflow compare``
needed to be told about the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pytest
import yaml
from pydantic import Field

from gplflow.adapters.store import Artifact, ArtifactStore, Ref
from gplflow.flows import stages
from gplflow.flows.config import ConfigError, PipelineConfig
from gplflow.flows.pipeline import genq_pipeline
from gplflow.flows.report import config_rows, stage_rows
from gplflow.flows.stages import Stage, setting
from gplflow.flows.status import run_status
from gplflow.tasks.base import StageConfig, StageInputs, stage_task
from gplflow.tasks.planning import StagePlan

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
N_DOCS = 24
TOY = "wordcounts"


# --- the toy stage's module (what a contributor writes) -----------------------------------------------------

SCHEMA = pa.schema([("doc_id", pa.string()), ("words", pa.int64())])


class WordcountsConfig(StageConfig):
    min_length: int = Field(default=1, gt=0)  # words shorter than this many characters are not counted


class WordcountsInputs(StageInputs):
    artifact: ClassVar[str] = TOY
    code_version: ClassVar[str] = "wordcounts-1"
    cfg: WordcountsConfig
    corpus: Ref


def run_wordcounts(inputs: WordcountsInputs) -> Artifact:
    if (found := inputs.reuse()) is not None:
        return found
    corpus = inputs.load(inputs.corpus).read_table(["doc_id", "text"])
    words = [sum(len(w) >= inputs.cfg.min_length for w in t.split()) for t in corpus["text"].to_pylist()]
    config, fps = inputs.fingerprint_parts()
    with inputs.store.writer(TOY, config=config, inputs=fps, code_version=inputs.code_version) as out:
        out.write_part([pa.table({"doc_id": corpus["doc_id"], "words": pa.array(words, pa.int64())})], SCHEMA)
    return inputs.store.require(TOY)


@stage_task("count words")
def wordcounts_task(inputs: WordcountsInputs) -> str:
    return run_wordcounts(inputs).fingerprint


def estimate(cfg: Any, n: int) -> StagePlan:
    return StagePlan(n, "passages", f"{n} passages split on spaces",
                     measure=lambda resolved, passages: len(passages) / 0.5)


def settings(cfg: Any) -> str:
    return f"words of at least {cfg.section(TOY).min_length} characters"


# --- the registry entry -----------------------------------------------------------------------------------

TOY_STAGE = Stage("wordcounts", (TOY,), wordcounts_task, section=(TOY, WordcountsConfig), estimate=estimate,
                  settings=settings, when=setting("wordcounts.min_length", ">", 1),
                  inputs=lambda run: WordcountsInputs(run_dir=run.run_dir, cfg=run.cfg.section(TOY),
                                                      corpus=run.ref("corpus")))


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
           "evaluate": {"heldout_fraction": 0}, TOY: {"min_length": 4}}
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
def test_a_stage_added_to_the_registry_alone_runs_in_the_flow_status_report_and_compare(prefect_api, registered,
                                                                                        config, tmp_path):
    from gplflow.flows.compare import run_compare

    run_dir = tmp_path / "run"
    store = ArtifactStore(run_dir)
    run_dir.mkdir()
    assert stages.condition(TOY) == "wordcounts.min_length > 1"  # what `gplflow status` says of a missing one

    first = genq_pipeline(str(config), [], str(run_dir), return_state=True)
    counts = store.require(TOY).read_pandas()
    corpus = store.require("corpus").read_pandas()
    assert len(counts) == N_DOCS
    assert counts["words"].tolist() == [sum(len(w) >= 4 for w in t.split()) for t in corpus["text"]]
    assert counts["words"].tolist() != [len(t.split()) for t in corpus["text"]]  # its setting was applied
    assert first.result()["fingerprints"][TOY] == store.require(TOY).fingerprint
    assert _task_states(first)["count words"] == "Completed"

    status = {row.stage: row for row in run_status(store)}
    assert status[TOY].state == "complete" and status[TOY].rows == N_DOCS
    assert list(status).index(TOY) == list(status).index("corpus") + 1  # listed where the registry puts it
    report = {row["stage"]: row for row in stage_rows(store)}
    assert report[TOY]["rows"] == N_DOCS  # a stage named as its artifact is one name in the table
    assert dict(config_rows(PipelineConfig.load(config)))["wordcounts"] == "words of at least 4 characters"

    manifest = (run_dir / TOY / "manifest.json").read_bytes()
    second = genq_pipeline(str(config), [], str(run_dir), return_state=True)
    assert _task_states(second)["count words"] == "Cached"
    assert (run_dir / TOY / "manifest.json").read_bytes() == manifest

    (run_dir / TOY / "part-00000.parquet").unlink()  # a stale cache record must not hand back a missing artifact
    third = genq_pipeline(str(config), [], str(run_dir), return_state=True)
    assert _task_states(third)["count words"] == "Completed"
    assert store.require(TOY).read_pandas()["words"].tolist() == counts["words"].tolist()

    # gplflow compare: the section travels in each method's overrides, and a sibling adopts the toy artifact
    compare = tmp_path / "compare.yaml"
    compare.write_text(yaml.safe_dump({"name": "toy-compare", "base": str(config), "methods": [
        {"name": "one"}, {"name": "two", "set": ["train.seed=5"]}]}))
    run_compare(compare, str(tmp_path / "compare"))
    one, two = (ArtifactStore(tmp_path / "compare" / m) for m in ("one", "two"))
    assert one.require(TOY).fingerprint == two.require(TOY).fingerprint == store.require(TOY).fingerprint
    assert two.require(TOY).read_pandas()["words"].tolist() == counts["words"].tolist()


def test_a_stage_section_is_checked_like_any_other(registered, config):
    with pytest.raises(ConfigError, match=r"'wordcounts.min_length'"):
        PipelineConfig.load(config, ["wordcounts.min_length=0"])
    with pytest.raises(ConfigError, match=r"wordcounts.colour"):
        PipelineConfig.load(config, ["wordcounts.colour=red"])
    cfg = PipelineConfig.load(config, ["wordcounts.min_length=6"])
    assert cfg.section(TOY).min_length == 6
    assert PipelineConfig.load(None, [f"{k}={json.dumps(v)}" for k, v in cfg.to_dict().items()]) == cfg


def test_without_the_registry_entry_the_section_is_an_unknown_key(config):
    with pytest.raises(ConfigError, match="unknown key 'wordcounts'"):
        PipelineConfig.load(config)


def test_a_stage_added_to_the_registry_with_an_estimate_shows_in_the_plan(registered, config, tmp_path):
    from gplflow.flows.plan import make_plan, planned_stages

    cfg = PipelineConfig.load(config)
    plan = make_plan(cfg, str(tmp_path / "run"), calibrate=False)
    other = planned_stages(PipelineConfig.load(config, ["wordcounts.min_length=1"]), N_DOCS)
    assert [s.stage for s in plan.stages] == ["wordcounts", "generate", "train"]  # registry order, its `when`
    assert plan.stages[0].work == N_DOCS and plan.stages[0].detail == f"{N_DOCS} passages split on spaces"
    assert plan.stages[0].measure(None, ["a", "b"]) == 4.0
    assert [s.stage for s in other] == ["generate", "train"]  # `when` is false: min_length 1 counts every word
    assert not (tmp_path / "run").exists()


def test_the_registry_names_every_artifact_once_and_every_shardable_stage():
    names = stages.artifact_names()
    assert len(names) == len(set(names))
    assert names[:2] == ["corpus", "pairs"] and names[-2:] == ["evaluate", "promoted"]
    assert set(stages.shardable()) == {"generate", "mine", "label"}
    assert stages.shard_stage("label").makes == ("triples",)
    assert stages.made_by("queries-train") == "split"
    with pytest.raises(ValueError, match="not shardable"):
        stages.shard_stage("model")


def _references(path: Path, modules: set[str]) -> set[str]:
    """Every gplflow module ``path`` reaches: imports at module level, inside functions and under TYPE_CHECKING,
    and module names in strings (``lazy("gplflow.adapters.scoring")``, ``"gplflow.tasks.label:label_task"``)."""
    import ast
    import re

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gplflow."):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("gplflow."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(re.findall(r"gplflow\.(?:adapters|tasks|flows)\.[a-z_]+", node.value))
    return found & modules


def test_imports_go_one_way_and_form_no_circle():
    root = Path(__file__).resolve().parents[1]
    paths = {f"gplflow.{p.parent.name}.{p.stem}": p for layer in ("adapters", "tasks", "flows")
             for p in (root / layer).glob("*.py") if p.stem != "__init__"}
    graph = {name: _references(path, set(paths)) - {name} for name, path in paths.items()}
    assert "gplflow.adapters.scoring" in graph["gplflow.tasks.label"]  # a lazy("...") string counts
    assert "gplflow.flows.models" in graph["gplflow.flows.stages"]  # so does an import inside a function
    rank = {"adapters": 0, "tasks": 1, "flows": 2}
    upward = [(a, b) for a, deps in graph.items() for b in deps if rank[b.split(".")[1]] > rank[a.split(".")[1]]]
    assert upward == []

    def circle(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for dep in sorted(graph[node]):
            if dep == start:
                return (*seen, dep)
            if dep not in seen and (found := circle(start, dep, (*seen, dep))):
                return found
        return None

    assert [c for name in graph if (c := circle(name, name, (name,)))] == []


def test_a_model_folder_replaced_in_place_is_a_new_input_of_every_stage_that_uses_it(tmp_path):
    """generate, mine, label, pretrain and train fingerprint a local model folder by content, not by path."""
    from stage_calls import (
        generate_fingerprint,
        label_fingerprint,
        mine_fingerprint,
        pretrain_fingerprint,
        train_fingerprint,
    )

    from gplflow.adapters.model_refs import model_signature
    from gplflow.adapters.store import forget_digests
    from gplflow.tasks.generate import GenerateConfig
    from gplflow.tasks.label import LabelConfig
    from gplflow.tasks.mine import MineConfig
    from gplflow.tasks.pretrain import PretrainConfig
    from gplflow.tasks.train import TrainConfig

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
