"""Pretraining (TSDAE, MLM, SimCSE, CT) on tiny models: the loss falls, the output loads, a crash resumes,
no network."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_rows import write_artifact
from prefect.logging import disable_run_logger
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from stage_calls import pretrain_fingerprint, pretrain_inputs, run_pretrain
from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

from gplflow.adapters import pretraining
from gplflow.adapters.corpus_readers import iter_documents
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import TinyModels, build_tiny_models
from gplflow.tasks import progress as progress_module
from gplflow.tasks.pretrain import PretrainConfig, pretrain_task

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "data" / "demo" / "corpus.jsonl"
# Fast settings for the tiny model: a high learning rate so a few dozen steps visibly lower the loss.
FAST = {"steps": 40, "batch_size": 8, "learning_rate": 1e-3, "max_seq_length": 64, "seed": 0, "log_every": 5}


def _inline_passages() -> list[tuple[str, str]]:
    """About 48 sentences in 12 passages, for a checkout without the demo corpus."""
    subjects = ["The queen", "A worker bee", "The beekeeper", "A drone"]
    actions = ["inspects the brood frames", "carries nectar to the hive", "seals cells with wax"]
    places = ["in early spring.", "before the honey flow.", "on warm afternoons.", "after a long winter."]
    sentences = [f"{s} {a} {p}" for s, a, p in itertools.product(subjects, actions, places)]
    return [(f"Passage {i}", " ".join(sentences[i * 4 : i * 4 + 4])) for i in range(12)]


@pytest.fixture(scope="module")
def passages() -> list[tuple[str, str]]:
    if DEMO_CORPUS.is_file():
        return [(d.title, d.text) for d in iter_documents(DEMO_CORPUS)]
    return _inline_passages()


@pytest.fixture(scope="module")
def tiny(passages, tmp_path_factory) -> TinyModels:
    return build_tiny_models([f"{t} {x}" for t, x in passages], tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (the Hugging Face Hub, a model-card lookup) fails the test."""

    def refuse(self, address, *args):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def make_corpus(root: Path, passages: list[tuple[str, str]]):
    store = ArtifactStore(root)
    return store, write_artifact(store, "corpus", [(f"d{i}", title, text) for i, (title, text) in enumerate(passages)])


def _window_means(history: list, width: int = 2) -> tuple[float, float]:
    losses = [loss for _, loss in history]
    return float(np.mean(losses[:width])), float(np.mean(losses[-width:]))


def _encode_tokens(model: SentenceTransformer, texts: list[str]) -> list[torch.Tensor]:
    return model.encode(texts, output_value="token_embeddings", convert_to_numpy=False)


TEXTS = ["Bees store honey in wax cells.", "The queen lays eggs.", "Smoke calms a colony before inspection."]


def test_tsdae_lowers_its_loss_and_saves_a_cls_pooled_model(tmp_path, passages, tiny):
    store, corpus = make_corpus(tmp_path, passages)
    seen = []
    artifact = run_pretrain(PretrainConfig(method="tsdae", **FAST), store, corpus, str(tiny.bi_encoder),
                            on_progress=lambda step, total, loss: seen.append((step, total)))
    info = artifact.manifest["pretrain"]
    assert (info["method"], info["pooling"], info["steps"]) == ("tsdae", "cls", 40)
    assert info["resumed_from_step"] is None
    assert [step for step, _ in info["loss_history"]] == list(range(5, 41, 5))
    assert seen == [(step, 40) for step in range(5, 41, 5)]
    first, last = _window_means(info["loss_history"])
    assert last < first - 0.3, info["loss_history"]
    assert artifact.counters["examples"] == min(40 * 8, artifact.counters["sentences"])

    model = SentenceTransformer(store.url("pretrain"), device="cpu")
    assert model[1].pooling_mode == "cls"
    embeddings = model.encode(TEXTS, convert_to_numpy=True)
    assert embeddings.shape == (3, 64)
    cls = np.stack([tokens[0].cpu().numpy() for tokens in _encode_tokens(model, TEXTS)])
    np.testing.assert_allclose(embeddings, cls, atol=1e-5)
    base = SentenceTransformer(str(tiny.bi_encoder), device="cpu")
    base_cls = np.stack([tokens[0].cpu().numpy() for tokens in _encode_tokens(base, TEXTS)])
    assert not np.allclose(embeddings, base_cls, atol=1e-3)  # the encoder itself was trained


def test_mlm_lowers_its_loss_and_saves_a_mean_pooled_model(tmp_path, passages, tiny):
    store, corpus = make_corpus(tmp_path, passages)
    artifact = run_pretrain(PretrainConfig(method="mlm", **FAST), store, corpus, str(tiny.bi_encoder))
    info = artifact.manifest["pretrain"]
    assert (info["method"], info["pooling"], info["steps"]) == ("mlm", "mean", 40)
    first, last = _window_means(info["loss_history"])
    assert last < first - 0.3, info["loss_history"]
    assert artifact.counters["passages"] == len(passages)
    assert artifact.counters["examples"] >= min(len(passages), 320)

    model = SentenceTransformer(store.url("pretrain"), device="cpu")
    assert model[1].pooling_mode == "mean"
    embeddings = model.encode(TEXTS, convert_to_numpy=True)
    assert embeddings.shape == (3, 64)
    means = np.stack([tokens.mean(0).cpu().numpy() for tokens in _encode_tokens(model, TEXTS)])
    np.testing.assert_allclose(embeddings, means, atol=1e-5)
    base = SentenceTransformer(str(tiny.bi_encoder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert not np.allclose(embeddings, base, atol=1e-3)  # the trained encoder, not the base, was saved


class Crash(RuntimeError):
    pass


def _crash_at(step: int, cfg, store, corpus, base: str):
    """Run pretraining until it is killed at ``step``; the folder its checkpoints went to."""

    def crash(done, total, loss):
        if done == step:
            raise Crash("killed")

    with pytest.raises(Crash):
        run_pretrain(cfg, store, corpus, base, on_progress=crash)
    return Path(store.root) / ".checkpoints" / f"pretrain-{pretrain_fingerprint(cfg, corpus.fingerprint, base)}"


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_at_the_configured_steps(tmp_path, passages, tiny):
    cfg = PretrainConfig(method="tsdae", **{**FAST, "steps": 30}, checkpoint_every=10)
    store, corpus = make_corpus(tmp_path / "run", passages)
    checkpoints = _crash_at(15, cfg, store, corpus, str(tiny.bi_encoder))
    assert store.load("pretrain") is None
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-10.pt"]

    seen = []
    artifact = run_pretrain(cfg, store, corpus, str(tiny.bi_encoder), lambda s, t, loss: seen.append(s))
    info = artifact.manifest["pretrain"]
    assert seen == [15, 20, 25, 30] and info["steps"] == 30 and info["resumed_from_step"] == 10
    assert not checkpoints.exists()

    # The resumed run took exactly the steps an uninterrupted run takes.
    store2, corpus2 = make_corpus(tmp_path / "clean", passages)
    clean = run_pretrain(cfg, store2, corpus2, str(tiny.bi_encoder)).manifest["pretrain"]
    steps = [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in info["loss_history"]] == [s for s, _ in clean["loss_history"]] == steps
    np.testing.assert_allclose([v for _, v in info["loss_history"]], [v for _, v in clean["loss_history"]],
                               rtol=1e-4)


def test_reuse_fingerprint_and_user_errors(tmp_path, passages, tiny):
    store, corpus = make_corpus(tmp_path, passages)
    cfg = PretrainConfig(method="mlm", **{**FAST, "steps": 2, "log_every": 1})
    first = run_pretrain(cfg, store, corpus, str(tiny.bi_encoder))
    calls = []
    again = run_pretrain(cfg, store, corpus, str(tiny.bi_encoder), lambda *a: calls.append(a))
    assert again.fingerprint == first.fingerprint == pretrain_fingerprint(cfg, corpus.fingerprint,
                                                                           str(tiny.bi_encoder))
    assert calls == []  # reused, not retrained
    other = PretrainConfig(method="mlm", **{**FAST, "steps": 3})
    assert pretrain_fingerprint(other, corpus.fingerprint, str(tiny.bi_encoder)) != first.fingerprint
    assert pretrain_fingerprint(cfg, "another-corpus", str(tiny.bi_encoder)) != first.fingerprint

    with pytest.raises(ValueError, match="method is 'none'"):
        run_pretrain(PretrainConfig(), store, corpus, str(tiny.bi_encoder))
    with pytest.raises(ValueError, match="no training example"):
        run_pretrain(PretrainConfig(method="tsdae", min_sentence_words=500, **FAST), store, corpus,
                     str(tiny.bi_encoder))


def test_tsdae_on_an_encoder_without_a_decoder_class_says_to_use_mlm(tmp_path, passages, tiny):
    folder = tmp_path / "distilbert"
    tokenizer = AutoTokenizer.from_pretrained(tiny.tokenizer)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                              pad_token_id=tokenizer.pad_token_id)
    DistilBertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    store, corpus = make_corpus(tmp_path / "run", passages)
    with pytest.raises(ValueError, match=r"DistilBertModel has none\. Use pretrain method 'mlm'"):
        run_pretrain(PretrainConfig(method="tsdae", **FAST), store, corpus, str(folder))
    assert store.load("pretrain") is None


def test_tsdae_from_a_plain_hugging_face_encoder_folder(tmp_path, passages, tiny):
    folder = tmp_path / "bert"
    SentenceTransformer(str(tiny.bi_encoder), device="cpu").transformers_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny.tokenizer).save_pretrained(folder)
    store, corpus = make_corpus(tmp_path / "run", passages)
    cfg = PretrainConfig(method="tsdae", **{**FAST, "steps": 3})
    artifact = run_pretrain(cfg, store, corpus, str(folder))
    assert artifact.manifest["pretrain"]["steps"] == 3
    model = SentenceTransformer(store.url("pretrain"), device="cpu")
    assert model[1].pooling_mode == "cls" and model.encode(TEXTS).shape == (3, 64)


def test_pretrain_task_reports_progress(tmp_path, passages, tiny, monkeypatch):
    store, corpus = make_corpus(tmp_path, passages)
    updates = []
    monkeypatch.setattr(progress_module, "in_task_run", lambda: True)
    monkeypatch.setattr(progress_module, "create_progress_artifact", lambda progress, key, description: "id1")
    monkeypatch.setattr(progress_module, "update_progress_artifact",
                        lambda artifact_id, progress: updates.append((artifact_id, progress)))
    cfg = PretrainConfig(method="mlm", **{**FAST, "steps": 4, "log_every": 2})
    with disable_run_logger():
        fp = pretrain_task.fn(pretrain_inputs(cfg, str(tmp_path), corpus, str(tiny.bi_encoder)))
        with pytest.raises(FileNotFoundError, match="the stage that makes it must run first"):
            pretrain_task.fn(pretrain_inputs(cfg, str(tmp_path), "not-the-corpus", str(tiny.bi_encoder)))
    assert fp == store.require("pretrain").fingerprint == pretrain_fingerprint(cfg, corpus.fingerprint,
                                                                               str(tiny.bi_encoder))
    assert updates == [("id1", 50.0), ("id1", 100.0)]  # at most every 5 %; 100 % once
    params = {"inputs": pretrain_inputs(cfg, str(tmp_path), corpus, str(tiny.bi_encoder))}
    assert pretrain_task.cache_policy.compute_key(None, params, {}) == f"gplflow-pretrain-{fp}"


def test_tsdae_can_keep_mean_pooling(tmp_path, passages, tiny):
    store, corpus = make_corpus(tmp_path, passages)
    artifact = run_pretrain(PretrainConfig(method="tsdae", pooling="mean", **{**FAST, "steps": 3}), store, corpus,
                            str(tiny.bi_encoder))
    assert artifact.manifest["pretrain"]["pooling"] == "mean"
    model = SentenceTransformer(store.url("pretrain"), device="cpu")
    assert model[1].pooling_mode == "mean"
    tokens = _encode_tokens(model, TEXTS)
    means = np.stack([t.cpu().numpy().mean(axis=0) for t in tokens])
    np.testing.assert_allclose(model.encode(TEXTS), means, atol=1e-5)


# --- SimCSE and Contrastive Tension ------------------------------------------------------------------------

CONTRASTIVE = ["simcse", "ct", "ct_inbatch"]
# The contrastive losses are noisy from batch to batch on the whole demo corpus; on four passages (about 16
# sentences) the batches recur and 20 steps lower the loss clearly.
SMALL = {**FAST, "steps": 20, "max_seq_length": 32}


@pytest.mark.parametrize("method", CONTRASTIVE)
def test_contrastive_methods_lower_their_loss_and_save_a_loadable_model(tmp_path, passages, tiny, method):
    store, corpus = make_corpus(tmp_path, passages[:4])
    artifact = run_pretrain(PretrainConfig(method=method, **SMALL), store, corpus, str(tiny.bi_encoder))
    info = artifact.manifest["pretrain"]
    assert (info["method"], info["pooling"], info["steps"]) == (method, "mean", 20)  # the base's pooling
    first, last = _window_means(info["loss_history"])
    assert last < 0.8 * first, info["loss_history"]  # 0.21-0.69 over seeds 0-4
    assert artifact.counters["examples"] == artifact.counters["sentences"]  # fewer than the run could see

    model = SentenceTransformer(store.url("pretrain"), device="cpu")
    assert model[1].pooling_mode == "mean"
    embeddings = model.encode(TEXTS, convert_to_numpy=True)
    assert embeddings.shape == (3, 64)
    base = SentenceTransformer(str(tiny.bi_encoder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert not np.allclose(embeddings, base, atol=1e-3)  # the trained encoder, not the base, was saved


@pytest.mark.parametrize("method", CONTRASTIVE)
def test_contrastive_methods_at_learning_rate_0_publish_the_base_weights(tmp_path, passages, tiny, method):
    """What training starts from is the pretrain output; frozen, that output must be exactly the base."""
    store, corpus = make_corpus(tmp_path, passages[:4])
    cfg = PretrainConfig(method=method, **{**SMALL, "steps": 2, "learning_rate": 0.0})
    run_pretrain(cfg, store, corpus, str(tiny.bi_encoder))
    out = Path(store.url("pretrain"))
    saved, base = load_file(out / "model.safetensors"), load_file(tiny.bi_encoder / "model.safetensors")
    assert saved.keys() == base.keys()
    assert all(torch.equal(saved[k], base[k]) for k in base)
    np.testing.assert_allclose(SentenceTransformer(str(out), device="cpu").encode(TEXTS),
                               SentenceTransformer(str(tiny.bi_encoder), device="cpu").encode(TEXTS), atol=1e-6)


def test_ct_batches_have_one_identical_pair_per_group_and_are_fixed_by_the_step():
    rows = [f"s{i}" for i in range(15)]
    firsts, seconds = pretraining.ct_pairs(rows, pairs=8, negatives=3)
    assert firsts == ["s0", "s1", "s3", "s5", "s7", "s8", "s10", "s12"]
    assert seconds == ["s0", "s2", "s4", "s6", "s7", "s9", "s11", "s13"]  # pairs 0 and 4 identical
    assert pretraining.ct_pairs(rows[:4], pairs=8, negatives=3) == (["s0", "s1"], ["s0", "s2"])  # rows ran out

    cfg = PretrainConfig(method="ct", steps=10, batch_size=8, learning_rate=0.0, max_seq_length=32, seed=3,
                         checkpoint_every=5, log_every=5, ct_negatives=7)
    assert pretraining.rows_per_step(cfg) == 15  # 8 first sentences + 7 second ones for the random pairs
    assert pretraining.rows_per_step(cfg.model_copy(update={"ct_negatives": 3})) == 14
    assert pretraining.rows_per_step(cfg.model_copy(update={"method": "ct_inbatch"})) == 8
    batches = [pretraining._batch(100, cfg, step, {}) for step in range(7)]
    assert all(len(b) == 15 and len(set(b)) == 15 for b in batches)
    assert batches == [pretraining._batch(100, cfg, step, {}) for step in range(7)]  # a resumed run's batches
    assert pretraining.log_every(cfg) == 5 and pretraining.log_every(cfg.model_copy(update={"log_every": None})) == 1
    assert pretraining.log_every(cfg.model_copy(update={"log_every": None, "steps": 1000})) == 10  # ~100 points


def test_ct_saves_the_encoder_the_loss_keeps_for_inference(tmp_path, passages, tiny):
    """sentence-transformers' CT losses train a copy (model1) beside the given encoder (model2), the one kept."""
    cfg = PretrainConfig(method="ct", steps=3, batch_size=8, learning_rate=1e-3, max_seq_length=32, seed=0,
                         checkpoint_every=10, log_every=1)
    base = SentenceTransformer(str(tiny.bi_encoder), device="cpu")
    objective = pretraining.ContrastiveTension(base, cfg, "cpu", "mean")
    sentences = list(pretraining.sentences((text for _, text in passages[:4]), 3, lambda name, n: None))
    pretraining.fit(objective, sentences, cfg, tmp_path / "ckpt", "cpu")
    objective.save(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    kept = objective.module.model2.transformers_model.state_dict()
    other = objective.module.model1.transformers_model.state_dict()
    assert all(torch.equal(saved[k], kept[k]) for k in saved)
    assert any(not torch.equal(saved[k], other[k]) for k in saved)  # the two copies did drift apart


def test_a_crashed_ct_run_resumes_with_the_same_batches(tmp_path, passages, tiny):
    cfg = PretrainConfig(method="ct", **{**SMALL, "steps": 12, "log_every": 2}, checkpoint_every=4)
    store, corpus = make_corpus(tmp_path / "run", passages[:4])
    checkpoints = _crash_at(6, cfg, store, corpus, str(tiny.bi_encoder))
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-4.pt"]
    seen = []
    info = run_pretrain(cfg, store, corpus, str(tiny.bi_encoder), lambda s, t, loss: seen.append(s)
                        ).manifest["pretrain"]
    assert seen == [6, 8, 10, 12] and info["resumed_from_step"] == 4 and not checkpoints.exists()

    store2, corpus2 = make_corpus(tmp_path / "clean", passages[:4])
    clean = run_pretrain(cfg, store2, corpus2, str(tiny.bi_encoder)).manifest["pretrain"]
    assert [s for s, _ in info["loss_history"]] == [s for s, _ in clean["loss_history"]] == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose([v for _, v in info["loss_history"]], [v for _, v in clean["loss_history"]],
                               rtol=1e-4)
    resumed = load_file(Path(store.url("pretrain")) / "model.safetensors")
    uninterrupted = load_file(Path(store2.url("pretrain")) / "model.safetensors")
    assert all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-5) for k in resumed)
