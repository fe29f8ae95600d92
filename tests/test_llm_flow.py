"""The GPL flow end to end with LLM-generated queries and the filter on: the tiny causal LM (built offline, with a
chat template) writes the queries of a demo slice, the filter drops some by reason, and mining, labelling,
training, evaluation and the report follow, in-process on Prefect's local API."""

from __future__ import annotations

import math

import pytest
import yaml
from demo_slice import beir_slice

from gplflow.adapters.llm_prompts import build_prompt
from gplflow.adapters.store import ArtifactStore
from gplflow.flows.config import PipelineConfig
from gplflow.flows.pipeline import gpl_pipeline
from gplflow.flows.report import report_markdown
from gplflow.tasks.filter import words

N_DOCS = 16
QPP = 3
RULES = {"max_words": 6, "dedup": "exact", "logprob_fraction": 0.75}

pytestmark = pytest.mark.slow


def test_a_gpl_flow_on_llm_queries_with_the_filter_generates_filters_labels_trains_and_evaluates(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    _, judged = beir_slice(tmp_path, N_DOCS)
    assert judged >= 2, "the slice must keep a few judged queries"
    cfg = {"name": "llm-flow", "profile": "tiny", "corpus": {"path": "corpus/corpus.jsonl"},
           "generate": {"method": "llm", "prompt": "zero_shot", "queries_per_passage": QPP, "batch_size": 8,
                        "max_query_length": 8, "max_passage_length": 64, "seed": 5},
           "filter": RULES,
           "mine": {"negatives_per_query": 3, "batch_size": 16, "max_seq_length": 64},
           "label": {"triples": 16, "seed": 5, "batch_size": 16, "max_seq_length": 64},
           "train": {"steps": 2, "batch_size": 4, "max_seq_length": 64, "warmup_steps": 0},
           "evaluate": {"qrels": "corpus/qrels/test.tsv", "heldout_fraction": 0.25, "max_seq_length": 64}}
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    with prefect_test_harness(server_startup_timeout=60):
        summary = gpl_pipeline(str(path), [], str(run_dir))
    store = ArtifactStore(run_dir)

    queries = store.require("queries")  # generated: every passage asked for QPP samples, parse drops counted
    parse_drops = sum(queries.counters[k] for k in ("empty_queries", "copied_passage", "too_long_queries",
                                                    "duplicate_queries"))
    assert queries.rows == N_DOCS * QPP - parse_drops - QPP * queries.counters.get("empty_passage", 0) > 0
    rows = queries.read_table().to_pylist()
    assert all(r["logprob"] is not None and r["logprob"] < 0 for r in rows)
    assert queries.manifest["llm"]["backend"] == "local" and queries.manifest["llm"]["prompt"]["name"] == "zero_shot"

    train, filtered = store.require("queries-train"), store.require("queries-filtered")
    heldout = store.require("heldout")
    assert heldout.rows > 0 and heldout.rows + train.rows == queries.rows  # the filter never sees held-out ones
    c = filtered.counters
    assert c["queries_in"] == train.rows and filtered.rows == c["kept"] > 0
    too_long = sum(len(words(r["text"])) > RULES["max_words"] for r in train.read_table().to_pylist())
    assert c["dropped_too_long"] == too_long > 0
    duplicates = c["dropped_duplicate_in_passage"] + c["dropped_duplicate_across_corpus"]
    alive = train.rows - c["dropped_too_long"] - duplicates  # what reaches the log-prob rule
    assert c["dropped_low_logprob"] == alive - math.ceil(RULES["logprob_fraction"] * alive) > 0
    assert c["kept"] == alive - c["dropped_low_logprob"]

    kept = set(filtered.read_table(["query_id"]).column(0).to_pylist())
    negatives, triples = store.require("negatives"), store.require("triples")
    assert set(negatives.read_table(["query_id"]).column(0).to_pylist()) <= kept  # mined from what the filter kept
    assert triples.rows == 16 and set(triples.read_table(["query_id"]).column(0).to_pylist()) <= kept
    model = store.require("model")
    assert model.manifest["train"]["steps"] == 2 and model.manifest["inputs"]["triples"] == triples.fingerprint
    evaluations = summary["metrics"]["evaluations"]
    assert {"qrels", "heldout"} <= set(evaluations)
    assert set(evaluations["qrels"]["models"]) == {"base", "adapted"}
    assert evaluations["heldout"]["counts"]["queries"] == heldout.rows

    report = report_markdown(PipelineConfig.load(path), store, summary)
    assert f"```text\n{build_prompt('zero_shot').template}\n```" in report
    # the drop reasons in the order the rules apply: the length rule, then duplicates, then log-probs
    length, logprob = f"dropped too_long {c['dropped_too_long']}, ", f"low_logprob {c['dropped_low_logprob']}"
    assert length in report and logprob in report and report.index(length) < report.index(logprob)
    assert "dropped by the filter" in report and "(log-prob -" in report
