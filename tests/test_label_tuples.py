"""Label with n negatives per example: each distinct pair scored once, distinct negatives per example, the n = 1
artifact and fingerprint as before n existed, and the diagnostics of the positive's rank."""

from __future__ import annotations

import numpy as np
import pytest
from artifact_rows import write_artifact
from sentence_transformers import CrossEncoder
from stage_calls import label_inputs, run_label

from gplflow.adapters import artifacts
from gplflow.adapters.gpl_format import GplFormatError, export_gpl
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.tasks.base import stage_fingerprint
from gplflow.tasks.label import CODE_VERSION, LabelConfig, draw_examples
from gplflow.tasks.label_diagnostics import label_diagnostics

CORPUS = [(f"d{i}", "", text) for i, text in enumerate([
    "Bees make honey from nectar.", "Hives have one queen.", "A volcano erupts under pressure.",
    "Lava cools into basalt.", "Python blocks use indentation.", "A list comprehension builds lists.",
    "Green tea is steamed after picking.", "Coffee beans are roasted seeds.", "Rivers carve valleys.",
    "Glaciers grind rock into flour."])]
QUERIES = [("q1", "d0", "how do bees make honey"), ("q2", "d2", "why does a volcano erupt"),
           ("q3", "d4", "python indentation")]
NEGATIVES = [("q1", "dense", ["d1", "d7", "d6", "d8"]), ("q1", "bm25", ["d7", "d9", "d3"]),  # union: 6
             ("q2", "dense", ["d3", "d9", "d8", "d5", "d1"]),  # 5
             ("q3", "dense", ["d5", "d6", "d7"])]  # 3: too few for 4 negatives per example
UNION = {"q1": {"d1", "d7", "d6", "d8", "d9", "d3"}, "q2": {"d3", "d9", "d8", "d5", "d1"}}


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("GPLFLOW_NO_BF16", "1")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    texts = [x for *_, x in CORPUS] + [t for *_, t in QUERIES]
    return str(build_tiny_models(texts, tmp_path_factory.mktemp("tiny")).cross_encoder)


def _label(tmp_path, teacher, examples, per):
    store = ArtifactStore(tmp_path)
    corpus, queries = write_artifact(store, "corpus", CORPUS), write_artifact(store, "queries", QUERIES)
    negatives = write_artifact(store, "negatives", [(q, r, d, [1.0] * len(d)) for q, r, d in NEGATIVES])
    return run_label(LabelConfig(batch_size=4, negatives_per_example=per), store, corpus, queries, negatives,
                     teacher, examples)


def test_n_negatives_per_example_score_each_distinct_pair_once(tmp_path, teacher, monkeypatch):
    calls: list[tuple[str, str]] = []
    original = CrossEncoder.predict

    def counting(self, inputs, *args, **kwargs):
        calls.extend(tuple(p) for p in inputs)
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(CrossEncoder, "predict", counting)
    artifact = _label(tmp_path, teacher, 6, per=4)
    table = artifact.read_table()
    assert table.schema.equals(artifacts.TUPLES_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == 6 and {r["query_id"] for r in rows} == {"q1", "q2"}  # q3 has 3 negatives, fewer than 4
    pairs = set()
    for r in rows:
        assert len(r["neg_doc_ids"]) == len(set(r["neg_doc_ids"])) == len(r["neg_scores"]) == 4
        assert set(r["neg_doc_ids"]) <= UNION[r["query_id"]]
        pairs |= {(r["query_id"], r["pos_doc_id"])} | {(r["query_id"], d) for d in r["neg_doc_ids"]}
    assert len(calls) == len(set(calls)) == len(pairs) < 6 * 5  # 6 examples x 5 pairs, many shared
    assert artifact.counters["scored_pairs"] == artifact.counters["distinct_pairs"] == len(pairs)
    assert artifact.counters["examples"] == 6 and artifact.counters["queries_with_too_few_negatives"] == 1
    assert artifact.manifest["negatives_per_example"] == 4
    # a pair's score is the same in every example holding it
    score: dict[tuple[str, str], float] = {}
    for r in rows:
        for d, s in [(r["pos_doc_id"], r["pos_score"]), *zip(r["neg_doc_ids"], r["neg_scores"], strict=True)]:
            assert score.setdefault((r["query_id"], d), s) == s
    rank = artifact.manifest["diagnostics"]["positive_rank"]
    expect = [1 + sum(s > r["pos_score"] for s in r["neg_scores"]) for r in rows]
    assert rank["mean"] == pytest.approx(np.mean(expect)) and len(rank["shares"]) == 5
    with pytest.raises(GplFormatError, match="4 negatives per example"):
        export_gpl(ArtifactStore(tmp_path), str(tmp_path / "export"))


def test_one_negative_per_example_keeps_the_triples_and_their_fingerprint(tmp_path, teacher):
    artifact = _label(tmp_path, teacher, 5, per=1)
    assert artifact.read_table().schema.equals(artifacts.TRIPLES_SCHEMA)
    assert "negatives_per_example" not in artifact.manifest and artifact.counters["triples"] == 5
    inputs = label_inputs(LabelConfig(batch_size=4), "", "c", "q", "n", "t", 5)
    config, refs = inputs.fingerprint_parts()
    before = {k: v for k, v in config.items() if k != "negatives_per_example"}  # the config as it was before n
    assert inputs.fingerprint() == stage_fingerprint("triples", before, refs, CODE_VERSION)
    assert label_inputs(LabelConfig(batch_size=4, negatives_per_example=2), "", "c", "q", "n", "t", 5).fingerprint() \
        != inputs.fingerprint()


def test_draw_examples_spreads_queries_and_keeps_negatives_distinct():
    sizes = np.array([6, 2, 3, 0])
    query, at = draw_examples(sizes, 7, seed=3, per=3)
    assert sorted(np.bincount(query, minlength=4)) == [0, 0, 3, 4] and set(query) == {0, 2}
    assert all(len(set(row)) == 3 and (row < sizes[q]).all() for q, row in zip(query, at, strict=True))
    _, one_at = draw_examples(sizes, 7, seed=3, per=1)
    assert one_at.shape == (7, 1)


def test_diagnostics_rank_the_positive_among_its_negatives():
    pos = np.array([3.0, 1.0, 0.0])
    neg = np.array([[1.0, 2.0], [2.0, 0.5], [1.0, 2.0]])  # ranks 1, 2, 3
    found = label_diagnostics(np.array([0, 1, 1]), pos, neg)
    assert found["positive_rank"] == {"mean": 2.0, "shares": pytest.approx([1 / 3, 1 / 3, 1 / 3])}
    assert found["outscored_share"] == pytest.approx(2 / 3)
    assert found["negative_share"] == pytest.approx(3 / 6)  # margins 2, 1, -1, 0.5, -1, -2
    assert found["teacher_agreement"] == pytest.approx(1 / 2)  # query 0 yes, query 1 no
