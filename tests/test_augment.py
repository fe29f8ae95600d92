"""Flow augmented_sbert (tasks/augment.py): the cross-encoder learns the gold pairs, sampling finds new pairs
(never a gold pair, each once), the silver manifest says how many and how they score, and the flow runs end to
end, is Cached on rerun and shows in ``gplflow status``.

Stage functions run on the tiny models and a slice of the demo data (plain functions, no Prefect); one flow
test runs the whole pipeline on Prefect's local API.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from demo_slice import beir_slice
from scipy.stats import spearmanr
from sentence_transformers.cross_encoder import CrossEncoder
from stage_calls import run_cross_encoder, run_ingest, run_pairs, run_sample, run_silver, run_train_pairs
from typer.testing import CliRunner

from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.text import passage_texts
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.flows.config import ConfigError, PipelineConfig
from gplflow.tasks.augment import AugmentConfig, CrossEncoderTrainConfig, select_pairs
from gplflow.tasks.ingest import IngestConfig
from gplflow.tasks.pairs import PairsConfig
from gplflow.tasks.train import TrainConfig

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
N_DOCS = 36
N_GOLD = 40


def _slice(root: Path, n_docs: int = N_DOCS, n_pairs: int = N_GOLD) -> tuple[Path, Path]:
    """The first demo passages (BEIR folder with the qrels judged on them) and the first gold pairs."""
    corpus, _ = beir_slice(root, n_docs)
    pairs = root / "pairs.tsv"
    pairs.write_text("\n".join((DEMO / "pairs.tsv").read_text().splitlines()[: n_pairs + 1]) + "\n")
    return corpus, pairs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A run directory with the corpus slice and the gold pairs read, and the tiny models built from them."""
    root = tmp_path_factory.mktemp("augment")
    corpus_dir, pairs_path = _slice(root)
    store = ArtifactStore(root / "run")
    corpus = run_ingest(IngestConfig(path=str(corpus_dir)), store)
    pairs = run_pairs(PairsConfig(path=str(pairs_path)), store)
    texts = [row["text"] for row in corpus.read_table(["text"]).to_pylist()]
    texts += pairs.read_table(["sentence1"])["sentence1"].to_pylist()
    tiny = build_tiny_models(texts, root / "tiny-models", seed=0)
    return store, corpus, pairs, tiny


CROSS = CrossEncoderTrainConfig(steps=24, batch_size=8, learning_rate=1e-3, warmup_ratio=0.0, max_seq_length=64,
                                seed=3)
AUGMENT = AugmentConfig(cross_encoder=CROSS, top_k=3, silver_per_gold=2, corpus_passages=24, batch_size=16, seed=5)


@pytest.fixture(scope="module")
def cross_encoder(data):
    store, _, pairs, tiny = data
    return run_cross_encoder(AUGMENT, store, str(tiny.cross_encoder), pairs)


@pytest.fixture(scope="module")
def candidates(data):
    store, corpus, pairs, tiny = data
    return run_sample(AUGMENT, store, corpus, pairs, str(tiny.bi_encoder))


def _gold(pairs) -> list[tuple[str, str, float]]:
    table = pairs.read_table(["sentence1", "sentence2", "score"])
    return list(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))


def test_the_cross_encoder_trained_on_gold_pairs_fits_and_ranks_them_better(data, cross_encoder):
    _, _, pairs, tiny = data
    fit = cross_encoder.manifest["train"]["gold_fit"]
    assert fit["after"]["bce"] < fit["before"]["bce"] - 0.05
    assert fit["after"]["spearman"] > fit["before"]["spearman"] + 0.2
    assert cross_encoder.manifest["train"]["steps"] == 24
    assert cross_encoder.manifest["inputs"]["pairs"] == pairs.fingerprint

    # checked apart from the stage: the saved folder predicts in [0, 1] (Sigmoid saved) and ranks the gold
    # pairs better than the model it started from
    gold = _gold(pairs)
    texts, scores = [(a, b) for a, b, _ in gold], [s for *_, s in gold]
    trained = CrossEncoder(str(cross_encoder.local_dir()), device="cpu").predict(texts, show_progress_bar=False)
    start = CrossEncoder(str(tiny.cross_encoder), device="cpu").predict(texts, show_progress_bar=False)
    assert ((trained >= 0) & (trained <= 1)).all()
    assert spearmanr(trained, scores).statistic > spearmanr(start, scores).statistic + 0.2
    assert spearmanr(trained, scores).statistic == pytest.approx(fit["after"]["spearman"], abs=1e-3)


def test_sampled_pairs_are_new_deduplicated_and_say_how_they_were_found(data, candidates, tmp_path):
    _, corpus, pairs, tiny = data
    rows = candidates.read_pandas()
    keys = [tuple(sorted(pair)) for pair in zip(rows["sentence1"], rows["sentence2"], strict=True)]
    gold = {tuple(sorted((a, b))) for a, b, _ in _gold(pairs)}
    assert len(rows) == candidates.manifest["target"] == 2 * N_GOLD
    assert len(set(keys)) == len(keys)  # each pair once, in either order
    assert not set(keys) & gold
    assert (rows["sentence1"] != rows["sentence2"]).all()
    assert set(rows["sampler"]) == {"bm25", "semantic"}
    assert candidates.manifest["sampled"] == rows["sampler"].value_counts().to_dict()
    pool = candidates.manifest["pool"]
    assert pool["corpus_passages"] == 24 and pool["texts"] <= pool["gold_sentences"] + 24
    passages = set(passage_texts(corpus.read_table(["title", "text"])))
    assert passages & (set(rows["sentence1"]) | set(rows["sentence2"]))  # the corpus sample is in the pool
    assert candidates.manifest["inputs"].keys() == {"corpus", "pairs", "bi_encoder"}

    again = run_sample(AUGMENT, ArtifactStore(tmp_path / "again"), corpus, pairs, str(tiny.bi_encoder))
    assert again.read_pandas().equals(rows)  # seeded: the same pairs in the same order
    bm25_only = run_sample(AUGMENT.model_copy(update={"sampling": "bm25"}), ArtifactStore(tmp_path / "bm25"), corpus,
                           pairs, str(tiny.bi_encoder))
    assert set(bm25_only.read_pandas()["sampler"]) == {"bm25"}
    assert bm25_only.manifest["inputs"].keys() == {"corpus", "pairs"}  # no bi-encoder: its changes do not matter


def test_select_pairs_skips_gold_reversed_and_repeated_pairs_and_stops_at_the_target():
    pool = ["a", "b", "c", "d"]
    # each text's neighbours, itself first (-1: no neighbour, as BM25 gives for no shared word)
    bm25 = np.array([[0, 1, 2], [1, 0, 3], [2, 3, -1], [3, 2, 0]])
    semantic = np.array([[0, 3, 1], [1, 2, 0], [2, 1, 0], [3, 0, 1]])
    rows, dropped = select_pairs(pool, {"bm25": bm25, "semantic": semantic}, {("a", "b")}, top_k=2, target=100,
                                 seed=0)
    keys = [tuple(sorted((r["sentence1"], r["sentence2"]))) for r in rows]
    assert sorted(keys) == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert dropped["dropped_gold"] >= 2 and dropped["dropped_duplicate"] >= 1
    first_two, _ = select_pairs(pool, {"bm25": bm25, "semantic": semantic}, {("a", "b")}, top_k=2, target=2, seed=0)
    assert first_two == rows[:2]


def test_silver_manifest_holds_size_and_label_distribution(data, candidates, cross_encoder):
    store = data[0]
    silver = run_silver(AUGMENT, store, candidates, cross_encoder)
    rows = silver.read_pandas()
    assert silver.rows == len(rows) == candidates.rows
    assert rows[["sentence1", "sentence2", "sampler"]].equals(candidates.read_pandas())
    assert rows["score"].between(0, 1).all() and rows["score"].std() > 0
    scores = silver.manifest["scores"]
    assert scores["count"] == len(rows) and sum(scores["histogram"]) == len(rows)
    q = scores["quantiles"]
    assert scores["min"] <= q["p05"] <= q["p25"] <= q["p50"] <= q["p75"] <= q["p95"] <= scores["max"]
    assert q["p50"] == pytest.approx(float(np.quantile(rows["score"], 0.5)), abs=1e-5)
    by_sampler = silver.manifest["by_sampler"]
    assert {k: v["count"] for k, v in by_sampler.items()} == rows["sampler"].value_counts().to_dict()
    # the labels are the saved cross-encoder's own predictions
    saved = CrossEncoder(str(cross_encoder.local_dir()), device="cpu")
    predicted = saved.predict(list(zip(rows["sentence1"], rows["sentence2"], strict=True)), show_progress_bar=False)
    assert np.allclose(predicted, rows["score"], atol=1e-4)

    model = run_train_pairs(TrainConfig(loss="cosent", steps=2, batch_size=8, warmup_steps=0, max_seq_length=32),
                            store, str(data[3].bi_encoder), data[2], silver=silver)
    assert model.manifest["inputs"]["silver"] == silver.fingerprint
    assert model.manifest["train"]["examples"] == N_GOLD + silver.rows


def test_augmented_config_defaults_and_checks():
    pairs = {"path": str(DEMO / "pairs.tsv")}
    cfg = PipelineConfig.from_dict({"flow": "augmented_sbert", "corpus": {"path": "c"}, "pairs": pairs,
                                    "augment": {"sampling": "bm25", "silver_pairs": 50}})
    assert cfg.train.loss == "cosent" and cfg.trains_on_pairs and not cfg.uses_queries
    assert cfg.augment.silver_target(109) == 50 and AugmentConfig().silver_target(10) == 40
    # a dumped config loads back (pool workers get it so), the default augment section under any flow
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    gpl = PipelineConfig.from_dict({"corpus": {"path": "c"}})
    assert PipelineConfig.from_dict(gpl.to_dict()) == gpl
    with pytest.raises(ConfigError, match="needs scored pairs"):
        PipelineConfig.from_dict({"flow": "augmented_sbert", "corpus": {"path": "c"},
                                  "pairs": {**pairs, "kind": "ranking"}, "train": {"loss": "mnrl"}})
    with pytest.raises(ConfigError, match="flow 'augmented_sbert' needs the key 'pairs'"):
        PipelineConfig.from_dict({"flow": "augmented_sbert", "corpus": {"path": "c"}})
    with pytest.raises(ConfigError, match="'augment' is read by flow 'augmented_sbert' only"):
        PipelineConfig.from_dict({"flow": "supervised", "corpus": {"path": "c"}, "pairs": pairs,
                                  "augment": {"top_k": 2}})
    with pytest.raises(ConfigError, match=r"'augment\.sampling'"):
        PipelineConfig.from_dict({"flow": "augmented_sbert", "corpus": {"path": "c"}, "pairs": pairs,
                                  "augment": {"sampling": "random"}})


def test_the_plan_counts_the_augmented_stages(tmp_path):
    from gplflow.flows.plan import make_plan

    corpus_dir, pairs_path = _slice(tmp_path)
    cfg = PipelineConfig.from_dict({"flow": "augmented_sbert", "profile": "tiny", "corpus": {"path": str(corpus_dir)},
                                    "pairs": {"path": str(pairs_path)},
                                    "augment": {"cross_encoder": {"epochs": 2, "batch_size": 16},
                                                "corpus_passages": 10},
                                    "train": {"steps": 5}})
    plan = {s.stage: s for s in make_plan(cfg, str(tmp_path / "run"), calibrate=False).stages}
    assert list(plan) == ["cross-encoder", "sample", "silver", "train-gold-silver"]
    assert plan["cross-encoder"].work == 2 * 3  # 2 epochs of ceil(40 / 16) steps
    assert plan["silver"].work == 4 * N_GOLD
    assert plan["sample"].work <= 2 * N_GOLD + 10
    lines = pairs_path.read_text().splitlines()  # the same file, edited: counted again, not served from memory
    pairs_path.write_text("\n".join(lines[: N_GOLD // 2 + 1]) + "\n")
    again = {s.stage: s for s in make_plan(cfg, str(tmp_path / "run"), calibrate=False).stages}
    assert again["silver"].work == 4 * (N_GOLD // 2)


# --- the flow, end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def _task_states(state) -> dict[str, str]:
    """{task run name: state name} of the flow run behind a returned ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {run.name: run.state.name for run in runs}


AUGMENTED = ("pairs", "cross-encoder", "silver-candidates", "silver", "model")


@pytest.mark.slow
def test_augmented_sbert_flow_end_to_end_then_cached_and_in_status(prefect_api, tmp_path):
    from gplflow.flows.cli import app
    from gplflow.flows.pipeline import augmented_sbert_pipeline
    from gplflow.flows.status import run_status

    corpus_dir, pairs_path = _slice(tmp_path, n_pairs=24)
    cfg = {"name": "augsbert-test", "profile": "tiny", "flow": "augmented_sbert",
           "corpus": {"path": str(corpus_dir / "corpus.jsonl")}, "pairs": {"path": str(pairs_path)},
           "augment": {"cross_encoder": {"steps": 3, "batch_size": 8, "max_seq_length": 48},
                       "silver_per_gold": 2, "corpus_passages": 12, "batch_size": 16},
           "train": {"steps": 3, "batch_size": 8, "max_seq_length": 48, "warmup_steps": 0},
           "evaluate": {"qrels": str(corpus_dir / "qrels" / "test.tsv"), "max_seq_length": 48}}
    config = tmp_path / "augsbert.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"

    result = CliRunner().invoke(app, ["run", str(config), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "labelled pairs: 24 scored pairs" in output and "generator" not in output
    assert "silver pairs: 48 (bm25" in output and "cross-encoder on the gold pairs: BCE" in output
    assert "training: cosent on 72 pairs (gold + silver)" in output
    store = ArtifactStore(run_dir)
    for name in AUGMENTED:
        assert store.load(name) is not None, name
    assert store.require("silver").rows == 48 and "scores" in store.require("silver").manifest
    model = store.require("model").manifest
    assert model["inputs"]["silver"] == store.require("silver").fingerprint
    assert model["train"]["examples"] == 24 + 48
    assert store.load("queries") is None and store.load("triples") is None  # no generation, mining, labelling
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert set(metrics["evaluations"]["qrels"]["models"]) == {"base", "adapted"}

    manifests = {name: (run_dir / name / "manifest.json").read_bytes() for name in (*AUGMENTED, "evaluate")}
    again = augmented_sbert_pipeline(str(config), [], str(run_dir), return_state=True)
    stage_states = {name: state for name, state in _task_states(again).items()
                    if not name.startswith("prepare models")}  # resolving the models is not a stage
    for name in ("train cross-encoder", "sample silver pairs", "label silver pairs", "train bi-encoder on pairs"):
        assert any(found.startswith(name) for found in stage_states), stage_states
    assert set(stage_states.values()) == {"Cached"}, stage_states
    assert {name: (run_dir / name / "manifest.json").read_bytes() for name in manifests} == manifests

    status = CliRunner().invoke(app, ["status", str(run_dir)])
    assert status.exit_code == 0, status.output
    assert "cross-encoder" in status.output and "silver" in status.output
    rows = {row.stage: row for row in run_status(store)}
    for name in ("cross-encoder", "silver-candidates", "silver"):
        assert (rows[name].state, rows[name].rerun) == ("complete", "reuse it"), rows[name]
    assert rows["silver"].rows == 48
    assert list(rows).index("silver") < list(rows).index("model")  # listed in the registry's order


def test_status_lists_the_augmented_stages_and_when_they_run(tmp_path):
    from artifact_rows import write_artifact

    from gplflow.flows.status import run_status

    store = ArtifactStore(tmp_path)
    write_artifact(store, "corpus", [("d1", "", "bees make honey")])  # a run directory: something is in it
    rows = [row for row in run_status(store) if row.stage in AUGMENTED[1:4]]
    assert [row.stage for row in rows] == ["cross-encoder", "silver-candidates", "silver"]
    assert {row.rerun for row in rows} == {"compute, if the flow is augmented_sbert"}
