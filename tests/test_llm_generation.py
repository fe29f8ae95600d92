"""generate.method llm with a local causal LM: the tiny Llama built offline, seeded, sharded, log-probs kept."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from artifact_rows import write_artifact

from gplflow.adapters.llm_base import Sampling
from gplflow.adapters.llm_generation import CausalGenerator, load_causal_lm
from gplflow.adapters.llm_prompts import build_prompt
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.tasks.base import Ref
from gplflow.tasks.generate import GenerateConfig, GenerateInputs, run_generate

DOCS = [
    ("d1", "Coral reefs", "Coral reefs are built by colonies of tiny animals. They grow slowly in warm water."),
    ("d2", "", "Dense retrieval encodes queries and passages into vectors and ranks passages by dot product."),
    ("d3", "Volcanoes", "A volcano is an opening in the crust. Magma rises through it."),
    ("d4", "", "   "),
    ("d5", "Tea", "Green tea and black tea come from the same plant, processed differently."),
    ("d6", "Bees", "Honey bees communicate the location of flowers with a waggle dance inside the hive."),
]
LLM = {"method": "llm", "queries_per_passage": 3, "batch_size": 2, "max_query_length": 6, "seed": 7,
       "prompt": "zero_shot"}


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory) -> str:
    tiny = build_tiny_models([f"{t} {x}" for _, t, x in DOCS], tmp_path_factory.mktemp("tiny"), seed=0)
    return str(tiny.causal_lm)


def generate(run_dir, generator, shard_size=10_000, **cfg):
    store = ArtifactStore(run_dir)
    corpus = write_artifact(store, "corpus", DOCS)
    inputs = GenerateInputs(run_dir=str(run_dir), cfg=GenerateConfig(**{**LLM, **cfg}),
                            corpus=Ref("corpus", corpus.fingerprint), generator=generator, shard_size=shard_size)
    return run_generate(inputs)


def rows(artifact):
    return artifact.read_table().to_pylist()


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory, causal_lm):
    return generate(tmp_path_factory.mktemp("llm"), causal_lm)


def test_tiny_causal_lm_has_a_chat_template(causal_lm):
    tokenizer, model = load_causal_lm(causal_lm)
    assert tokenizer.padding_side == "left" and tokenizer.chat_template
    gen = CausalGenerator(tokenizer, model, build_prompt("zero_shot"), Sampling(2, 1.0, 1.0, 4), 32, 4)
    ids = gen.encode("Coral reefs grow slowly.")
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2  # system, user, assistant's start
    text = tokenizer.decode(ids)  # the tiny tokenizer lower-cases and has no newline token
    assert "coral reefs grow slowly." in text and text.rsplit("<|im_start|>", 1)[1].strip().startswith("assistant")
    assert gen.encode("   ") is None


def test_local_llm_rows_logprobs_and_counters(llm_run):
    found = rows(llm_run)
    schema = pq.read_schema(llm_run.part_paths()[0])
    assert schema.names == ["query_id", "doc_id", "text", "logprob"]
    assert {r["doc_id"] for r in found} <= {"d1", "d2", "d3", "d5", "d6"} and found
    for r in found:
        assert r["text"] and r["query_id"].startswith(r["doc_id"] + "-q")
        assert r["logprob"] is not None and r["logprob"] < 0  # mean log-prob of the sampled tokens
    c = llm_run.counters
    assert c["empty_passage"] == 1
    dropped = sum(c[k] for k in ("empty_queries", "copied_passage", "too_long_queries", "duplicate_queries"))
    assert llm_run.rows == 5 * 3 - dropped
    assert c["prompt_tokens"] > 5 * 20 and 0 < c["completion_tokens"] <= 5 * 3 * 6
    extra = llm_run.manifest  # the writer's extra keys are top-level manifest keys
    assert extra["llm"]["backend"] == "local"
    assert extra["llm"]["prompt"]["name"] == "zero_shot" and "{passage}" in extra["llm"]["prompt"]["template"]


def test_same_seed_same_rows_other_seed_other_rows(tmp_path, causal_lm, llm_run):
    again = generate(tmp_path / "again", causal_lm)
    assert rows(again) == rows(llm_run)
    other = generate(tmp_path / "other", causal_lm, seed=8)
    assert [r["text"] for r in rows(other)] != [r["text"] for r in rows(llm_run)]


def test_shards_and_what_the_fingerprint_hashes(tmp_path, causal_lm):
    sharded = generate(tmp_path / "sharded", causal_lm, shard_size=2)
    assert sharded.manifest["shards"]["count"] == 3
    assert len(rows(sharded)) == sharded.rows > 0
    t5 = GenerateConfig(method="t5")
    assert "endpoint" not in t5.fingerprinted() and "temperature" not in t5.fingerprinted()
    assert GenerateConfig(method="t5", temperature=0.5).fingerprinted() == t5.fingerprinted()
    llm = GenerateConfig(**LLM)
    assert "top_k" not in llm.fingerprinted() and llm.fingerprinted()["temperature"] == 1.0
    assert set(llm.prompt_inputs()) == {"prompt"} and t5.prompt_inputs() == {}


def test_split_carries_the_logprob(tmp_path, causal_lm):
    from gplflow.tasks.evaluate import EvaluateConfig
    from gplflow.tasks.split import SplitInputs, run_split

    queries = generate(tmp_path, causal_lm)
    found = run_split(SplitInputs(run_dir=str(tmp_path), cfg=EvaluateConfig(heldout_fraction=0.4),
                                  queries=Ref("queries", queries.fingerprint)))
    parts = [rows(found[name]) for name in ("heldout", "queries-train")]
    assert all(parts) and all(set(r) == {"query_id", "doc_id", "text", "logprob"} for p in parts for r in p)
    by_id = {r["query_id"]: r for r in rows(queries)}
    assert sorted(r["query_id"] for p in parts for r in p) == sorted(by_id)
    assert all(r == by_id[r["query_id"]] for p in parts for r in p)
