"""Generate stage: T5 sampling with a tiny offline T5, extractive pseudo-queries, QPP rule, reuse."""

from __future__ import annotations

import random

import numpy as np
import pytest
from artifact_rows import write_artifact
from prefect.logging import disable_run_logger
from pydantic import ValidationError
from stage_calls import generate_fingerprint, generate_inputs, run_generate
from transformers import AutoTokenizer

from gplflow.adapters import models
from gplflow.adapters.generation import QueryGenerator
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.text import split_sentences
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.tasks import generate as gen
from gplflow.tasks.generate import GenerateConfig, extractive_queries, generate_task, queries_per_passage

# (doc_id, title, text): odd ids on purpose, one blank passage, single- and multi-sentence passages.
DOCS = [
    ("d1", "Coral reefs", "Coral reefs are built by colonies of tiny animals. They grow slowly in warm water. "
                          "Bleaching happens when the water gets too hot."),
    ("d2", "", "Dense retrieval encodes queries and passages into vectors and ranks passages by dot product."),
    ("d2-q0", "Trick id", "This id looks like a query id of d2. It must still give unique query ids here."),
    ("doc/ü 4", "Volcanoes", "A volcano is an opening in the crust. Magma rises through it. Eruptions can be "
                             "explosive or effusive, e.g. the eruptions of Kilauea."),
    ("d5", "", "Short."),
    ("d6", "Tea", "Green tea and black tea come from the same plant, Camellia sinensis, processed differently."),
    ("d7", "Rivers", "The Nile is long. The Amazon carries the most water. Rivers shape valleys over time."),
    ("d8", "", "   "),
    ("d9", "Bees", "Honey bees communicate the location of flowers with a waggle dance inside the hive."),
    ("d10", "Chess", "The queen is the strongest piece. Castling moves the king two squares toward a rook."),
    ("d11", "Glaciers", "Glaciers store most of the fresh water on Earth and move under their own weight."),
    ("d12", "", "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plants."),
]
DOC_IDS = {d for d, _, _ in DOCS}
T5 = {"method": "t5", "queries_per_passage": 3, "batch_size": 4, "max_query_length": 8, "seed": 7}
EXTRACTIVE = {"method": "extractive", "queries_per_passage": 3, "seed": 7}


def make_corpus(run_dir, docs=DOCS):
    store = ArtifactStore(run_dir)
    return store, write_artifact(store, "corpus", docs)


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> str:
    tiny = build_tiny_models([f"{t} {x}" for _, t, x in DOCS], tmp_path_factory.mktemp("tiny"), seed=0)
    return str(tiny.generator)


def generate(run_dir, generator, docs=DOCS, shard_size=10_000, **cfg):
    store, corpus = make_corpus(run_dir, docs)
    return run_generate(GenerateConfig(**cfg), store, corpus, generator, shard_size=shard_size)


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, generator):
    return generate(tmp_path_factory.mktemp("t5"), generator, **T5)


def rows(artifact):
    return artifact.read_pandas()[["query_id", "doc_id", "text"]].values.tolist()


def check_counts(artifact, used_passages, qpp):
    c = artifact.counters
    assert c["queries_per_passage"] == qpp
    expected = (used_passages - c["empty_passage"]) * qpp - c["duplicate_queries"] - c["empty_queries"]
    assert artifact.rows == expected
    df = artifact.read_pandas()
    assert not df.duplicated(["doc_id", "text"]).any()
    assert df["query_id"].is_unique
    assert set(df["doc_id"]) <= DOC_IDS
    assert (df["text"].str.strip() != "").all()


def test_t5_counts_ids_and_order(t5_run):
    c = t5_run.counters
    assert c["passages"] == len(DOCS) and "sampled_passages" not in c
    assert c["empty_passage"] == 1  # d8 is blank
    check_counts(t5_run, len(DOCS), 3)
    df = t5_run.read_pandas()
    assert "d8" not in set(df["doc_id"])
    # corpus order, then k; ids are f"{doc_id}-q{k}" over the kept queries
    order = [d for d, _, _ in DOCS]
    assert df["doc_id"].map(order.index).is_monotonic_increasing
    expected_ids = [f"{d}-q{k}" for d, group in df.groupby("doc_id", sort=False) for k in range(len(group))]
    assert df["query_id"].tolist() == expected_ids
    assert t5_run.manifest["inputs"]["generator"]


def test_t5_same_seed_same_rows_other_seed_other_rows(tmp_path, generator, t5_run):
    again = generate(tmp_path / "again", generator, **T5)
    assert rows(again) == rows(t5_run)
    other = generate(tmp_path / "other", generator, **{**T5, "seed": 8})
    assert other.fingerprint != t5_run.fingerprint
    assert {r[2] for r in rows(other)} != {r[2] for r in rows(t5_run)}


def test_t5_length_sorted_batches_do_not_depend_on_corpus_order(tmp_path, generator, t5_run):
    shuffled = DOCS[:]
    random.Random(3).shuffle(shuffled)
    result = generate(tmp_path, generator, docs=shuffled, **T5)
    assert sorted(rows(result)) == sorted(rows(t5_run))
    order = [d for d, _, _ in shuffled]
    assert result.read_pandas()["doc_id"].map(order.index).is_monotonic_increasing


def test_t5_passage_empty_after_truncation_is_skipped(tmp_path, generator):
    # With a prefix, a budget of prefix tokens + </s> leaves no passage token: every passage is empty,
    # so the stage fails with a one-line error and publishes nothing.
    prefix = "generate query:"
    budget = len(AutoTokenizer.from_pretrained(generator)(prefix, add_special_tokens=False)["input_ids"]) + 1
    store, corpus = make_corpus(tmp_path)
    cfg = GenerateConfig(**{**T5, "prefix": prefix, "max_passage_length": budget})
    with pytest.raises(ValueError, match="no queries"):
        run_generate(cfg, store, corpus, generator)
    assert store.load("queries") is None
    # One more token of budget and every non-blank passage is used again.
    ok = generate(tmp_path / "ok", generator, **{**T5, "prefix": prefix, "max_passage_length": budget + 1})
    assert ok.counters["empty_passage"] == 1
    assert set(ok.read_pandas()["doc_id"]) == DOC_IDS - {"d8"}
    check_counts(ok, len(DOCS), 3)


def test_t5_duplicate_and_empty_queries_are_dropped_and_counted(tmp_path, generator, t5_run, monkeypatch):
    real = QueryGenerator.generate

    def repeat_and_blank(self, batch, n, seed):  # keep sample 0, then a copy of it and an empty one
        return [[qs[0], qs[0], ""] for qs in real(self, batch, n, seed)]

    monkeypatch.setattr(QueryGenerator, "generate", repeat_and_blank)
    result = generate(tmp_path, generator, **T5)
    c = result.counters
    assert (c["duplicate_queries"], c["empty_queries"], result.rows) == (11, 11, 11)
    check_counts(result, len(DOCS), 3)
    first = t5_run.read_pandas().query("query_id.str.endswith('-q0')")
    assert rows(result) == first[["query_id", "doc_id", "text"]].values.tolist()


def test_reuse_does_not_load_the_generator(tmp_path, generator, monkeypatch):
    store, corpus = make_corpus(tmp_path)
    first = run_generate(GenerateConfig(**T5), store, corpus, generator)

    def boom(*_args, **_kwargs):
        raise AssertionError("the generator must not be loaded when the artifact is reused")

    monkeypatch.setattr(models, "load_seq2seq", boom)
    second = run_generate(GenerateConfig(**T5), store, corpus, generator)
    assert second.fingerprint == first.fingerprint
    assert second.manifest["timings"] == first.manifest["timings"]
    with pytest.raises(AssertionError, match="must not be loaded"):  # a new seed does need the generator
        run_generate(GenerateConfig(**{**T5, "seed": 99}), store, corpus, generator)


def test_fingerprint_inputs():
    t5, ext = GenerateConfig(**T5), GenerateConfig(**EXTRACTIVE)
    assert generate_fingerprint(t5, "c1", "gen-a") != generate_fingerprint(t5, "c1", "gen-b")
    assert generate_fingerprint(t5, "c1", "gen-a") != generate_fingerprint(t5, "c2", "gen-a")
    # extractive ignores the generator and the T5-only settings, but not its own
    assert generate_fingerprint(ext, "c1", "gen-a") == generate_fingerprint(ext, "c1", "gen-b")
    assert generate_fingerprint(ext, "c1", "") == generate_fingerprint(
        GenerateConfig(**EXTRACTIVE, top_k=5, batch_size=2), "c1", "")
    assert generate_fingerprint(ext, "c1", "") != generate_fingerprint(
        GenerateConfig(**{**EXTRACTIVE, "seed": 1}), "c1", "")


def test_auto_qpp_rule():
    auto = GenerateConfig()
    assert queries_per_passage(auto, 1000) == (250, None)
    assert queries_per_passage(auto, 999) == (251, None)  # ceil, as UKPLab gpl
    assert queries_per_passage(auto, 83_334) == (3, None)
    assert queries_per_passage(auto, 83_335) == (3, 83_334)
    assert queries_per_passage(auto, 100_000) == (3, 83_334)
    assert queries_per_passage(auto, 1) == (250_000, None)
    assert queries_per_passage(GenerateConfig(target_queries=10), 1000) == (3, None)  # never below 3
    assert queries_per_passage(GenerateConfig(queries_per_passage=5), 100_000) == (5, None)
    with pytest.raises(ValueError, match="no passages"):
        queries_per_passage(auto, 0)
    with pytest.raises(ValidationError, match="queries_per_passage"):
        GenerateConfig(queries_per_passage=0)


def test_extractive_counts_and_word_sequences(tmp_path):
    result = generate(tmp_path, "unused", **EXTRACTIVE)
    check_counts(result, len(DOCS), 3)
    c = result.counters
    assert c["empty_passage"] == 1 and c["duplicate_queries"] > 0  # d5 "Short." gives one distinct span
    assert result.manifest["inputs"]["generator"] == ""
    texts = {d: x.split() for d, _, x in DOCS}
    for doc_id, query in result.read_pandas()[["doc_id", "text"]].values:
        words, q = texts[doc_id], query.split()
        assert any(words[i : i + len(q)] == q for i in range(len(words))), (doc_id, query)
    df = result.read_pandas()
    assert set(df[df.doc_id == "d1"]["text"]) == set(split_sentences(DOCS[0][2]))  # 3 sentences, QPP 3


def test_extractive_independent_of_shard_size_and_corpus_order(tmp_path):
    whole = generate(tmp_path / "whole", "", **EXTRACTIVE)
    shuffled = DOCS[:]
    random.Random(5).shuffle(shuffled)
    sharded = generate(tmp_path / "sharded", "", docs=shuffled, shard_size=1, **EXTRACTIVE)
    assert sorted(rows(sharded)) == sorted(rows(whole))
    parts = [name for name in sharded.manifest["files"] if name.startswith("part-")]
    assert parts == [f"part-{i:05d}.parquet" for i in range(len(DOCS))]
    assert sharded.manifest["shard_size"] == 1
    other_seed = generate(tmp_path / "seed", "", **{**EXTRACTIVE, "seed": 8})
    assert sorted(rows(other_seed)) != sorted(rows(whole))


def test_extractive_auto_samples_the_corpus(tmp_path):
    cfg = {"method": "extractive", "target_queries": 15, "max_passages": 5, "seed": 3}
    first = generate(tmp_path / "a", "", **cfg)
    assert first.counters["sampled_passages"] == 5 and first.counters["queries_per_passage"] == 3
    sampled = set(first.read_pandas()["doc_id"])
    assert 1 <= len(sampled) <= 5
    check_counts(first, 5, 3)
    assert rows(generate(tmp_path / "b", "", **cfg)) == rows(first)


def test_extractive_spans():
    words = [f"w{i:02d}" for i in range(14)]
    spans = extractive_queries(" ".join(words), 50, np.random.default_rng(0), max_words=350)
    assert all(6 <= len(s.split()) <= 14 and s in " ".join(words) for s in spans)
    assert extractive_queries(" ".join(words), 3, np.random.default_rng(0), max_words=4) == ["w00 w01 w02 w03"] * 3
    assert extractive_queries(" \n ", 3, np.random.default_rng(0), max_words=350) is None


def test_bad_shard_size_is_an_error(tmp_path):
    store, corpus = make_corpus(tmp_path)
    with pytest.raises(ValueError, match="shard_size"):
        run_generate(GenerateConfig(**EXTRACTIVE), store, corpus, "", shard_size=0)


def test_generate_task_wrapper(tmp_path):
    store, corpus = make_corpus(tmp_path)
    cfg = GenerateConfig(**EXTRACTIVE)
    with disable_run_logger():
        fp = generate_task.fn(generate_inputs(cfg, str(tmp_path), corpus, "ignored", shard_size=4))
    assert fp == generate_fingerprint(cfg, corpus.fingerprint, "") == store.require("queries").fingerprint
    params = {"inputs": generate_inputs(cfg, str(tmp_path), corpus, "x")}
    assert generate_task.cache_policy.compute_key(None, params, {}) == f"gplflow-queries-{fp}"  # the artifact is valid
    with pytest.raises(FileNotFoundError, match="the stage that makes it must run first"):
        generate_task.fn(generate_inputs(cfg, str(tmp_path), "not-the-corpus", "", shard_size=4))
    assert gen.STAGE == "queries"
