"""Mine with the real all-MiniLM-L6-v2 and BM25 over 16 passages on four topics.

bf16 autocast is switched off (GPLFLOW_NO_BF16=1) while mining, so that mined scores can be checked against
an independent float32 ``SentenceTransformer.encode`` to 1e-4; with bf16 they agree only to about 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
from artifact_rows import write_artifact
from stage_calls import mine_fingerprint, run_mine

from gplflow.adapters.models import packaged_minilm_path
from gplflow.adapters.store import ArtifactStore
from gplflow.tasks.mine import MineConfig

MINILM = str(packaged_minilm_path())
TOPICS = {
    "astro": [
        ("Cosmology", "Astronomers measure the light of distant galaxies to estimate how fast the universe expands."),
        ("Neutron stars", "A neutron star is the collapsed core of a massive star that exploded as a supernova."),
        ("Exoplanets", "The Kepler space telescope searched for planets orbiting other stars by watching them dim."),
        ("Black holes", "Black holes bend light so strongly that nothing escapes from inside the event horizon."),
    ],
    "bake": [
        ("", "Bread dough rises because yeast ferments sugar and releases carbon dioxide gas."),
        ("", "Knead the dough for ten minutes until it is smooth and elastic before the first proof."),
        ("", "A sourdough starter is a culture of wild yeast and lactic bacteria fed with flour and water."),
        ("", "Bake the loaf in a hot oven until the crust is deep brown and sounds hollow when tapped."),
    ],
    "football": [
        ("", "The striker scored twice in the second half to win the championship final."),
        ("", "A penalty kick is awarded when a defender fouls an attacker inside the box."),
        ("", "The goalkeeper is the only player allowed to handle the ball within the penalty area."),
        ("", "The offside rule stops attackers from waiting behind the last defender for a pass."),
    ],
    "volcano": [
        ("", "Magma rises through cracks in the crust and erupts from volcanoes as lava."),
        ("", "Pyroclastic flows are fast avalanches of hot ash and volcanic gas."),
        ("", "Geologists monitor small earthquakes beneath a volcano to forecast eruptions."),
        ("", "Basalt forms when lava cools quickly at the surface."),
    ],
}
DOCS = {f"{topic}{i}": doc for topic, docs in TOPICS.items() for i, doc in enumerate(docs)}
QUERIES = [  # (query_id, positive doc_id, text)
    ("q-astro", "astro1", "what remains after a massive star dies"),
    ("q-bake", "bake0", "why does yeast make bread dough rise"),
    ("q-football", "football1", "when does the referee give a penalty kick"),
    ("q-kepler", "astro0", "what did the Kepler mission discover"),  # "kepler" is in astro2 only
]
N = 5


def _store(root, docs: dict[str, tuple[str, str]], queries=QUERIES):
    store = ArtifactStore(root)
    corpus = write_artifact(store, "corpus", [(doc_id, title, text) for doc_id, (title, text) in docs.items()])
    return store, corpus, write_artifact(store, "queries", queries)


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    store, corpus, queries = _store(tmp_path_factory.mktemp("mine"), DOCS)
    cfg = MineConfig(negatives_per_query=N, bm25=True, batch_size=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPLFLOW_NO_BF16", "1")
        artifact = run_mine(cfg, store, corpus, queries, [(MINILM, "cos_sim")])
    rows = {(r["query_id"], r["retriever"]): r for r in artifact.read_table().to_pylist()}
    return cfg, store, corpus, queries, artifact, rows


def test_one_row_per_query_and_retriever_with_counters(mined):
    _, _, _, _, artifact, rows = mined
    assert artifact.rows == 8
    assert set(rows) == {(q, r) for q, _, _ in QUERIES for r in (MINILM, "bm25")}
    assert artifact.manifest["retrievers"] == [MINILM, "bm25"]
    short = sum(len(r["doc_ids"]) < N for r in rows.values())
    assert artifact.counters == {"queries": 4, "retrievers": 2, "short_lists": short}


def test_negatives_exclude_the_positive_and_are_ranked(mined):
    _, _, _, _, _, rows = mined
    positives = {q: pos for q, pos, _ in QUERIES}
    for (query_id, retriever), row in rows.items():
        assert positives[query_id] not in row["doc_ids"]
        assert len(row["doc_ids"]) == len(row["scores"]) == len(set(row["doc_ids"]))
        assert (np.diff(row["scores"]) <= 0).all(), (query_id, retriever)
        if retriever == MINILM:
            assert len(row["doc_ids"]) == N  # 16 passages: always enough left after removing the positive


def test_dense_negatives_start_with_the_same_topic(mined):
    _, _, _, _, _, rows = mined
    for query_id, positive, topic in [("q-astro", "astro1", "astro"), ("q-bake", "bake0", "bake"),
                                      ("q-football", "football1", "football")]:
        same_topic = {f"{topic}{i}" for i in range(4)} - {positive}
        assert set(rows[(query_id, MINILM)]["doc_ids"][:3]) == same_topic, query_id


def test_dense_scores_equal_an_independent_float32_recomputation(mined):
    from sentence_transformers import SentenceTransformer

    _, _, _, _, _, rows = mined
    model = SentenceTransformer(MINILM, device="cpu")
    for query_id, _, text in QUERIES[:2]:
        row = rows[(query_id, MINILM)]
        q = model.encode([text], normalize_embeddings=True)[0]
        passages = [f"{DOCS[d][0]} {DOCS[d][1]}".strip() for d in row["doc_ids"][:2]]
        want = model.encode(passages, normalize_embeddings=True) @ q
        np.testing.assert_allclose(row["scores"][:2], want, atol=1e-4)


def test_bm25_keeps_only_passages_sharing_a_word(mined):
    _, _, _, _, _, rows = mined
    kepler = rows[("q-kepler", "bm25")]
    assert kepler["doc_ids"] == ["astro2"]  # the only passage with "kepler"; zero-score passages dropped
    assert kepler["scores"][0] > 0
    yeast = rows[("q-bake", "bm25")]  # "yeast" and "dough" are in bake1/bake2 beside the positive bake0
    assert set(yeast["doc_ids"][:2]) == {"bake1", "bake2"}


def test_rerun_reuses_the_artifact_and_the_fingerprint_tracks_retrievers(mined):
    cfg, store, corpus, queries, artifact, _ = mined
    again = run_mine(cfg, store, corpus, queries, [[MINILM, "cos_sim"]])  # lists as Prefect may pass them
    assert again.manifest["timings"] == artifact.manifest["timings"]
    fp = mine_fingerprint(cfg, corpus.fingerprint, queries.fingerprint, [(MINILM, "cos_sim")])
    assert fp == artifact.fingerprint
    assert fp != mine_fingerprint(cfg, corpus.fingerprint, queries.fingerprint, [(MINILM, "dot")])


def test_small_corpus_gives_short_lists(tmp_path):
    docs = {d: DOCS[d] for d in ["astro0", "astro1", "bake0"]}
    store, corpus, queries = _store(tmp_path, docs, QUERIES[:2])
    artifact = run_mine(MineConfig(negatives_per_query=N), store, corpus, queries, [(MINILM, "dot")])
    rows = artifact.read_table().to_pylist()
    assert [len(r["doc_ids"]) for r in rows] == [2, 2]  # 3 passages minus the positive
    assert {d for r in rows for d in r["doc_ids"]} <= set(docs)
    assert artifact.counters["short_lists"] == 2


def test_bad_retrievers_are_clear_errors(tmp_path):
    store, corpus, queries = _store(tmp_path, {"a": ("", "one passage")}, [("q", "a", "a query")])
    with pytest.raises(ValueError, match="score must be one of cos_sim, dot"):
        run_mine(MineConfig(), store, corpus, queries, [(MINILM, "cosine")])
    with pytest.raises(ValueError, match="no retrievers"):
        run_mine(MineConfig(), store, corpus, queries, [])
    with pytest.raises(ValueError, match="listed twice"):
        run_mine(MineConfig(), store, corpus, queries, [(MINILM, "dot"), (MINILM, "cos_sim")])
    assert store.load("negatives") is None
