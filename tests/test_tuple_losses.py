"""The teacher's losses over n-tuples: KL (DistillKLDivLoss), MarginMSE over the n margins and their weighted sum,
computed here by hand from the student's embeddings and compared with the trainer's; and a KL training on
n-tuples resumed after a crash ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from crash import CrashAt
from sentence_transformers import SentenceTransformer
from stage_calls import run_train

from gplflow.adapters import artifacts
from gplflow.adapters import trainer as st_trainer
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.tasks.train import TrainConfig

PASSAGES = [(f"d{i}", "", text) for i, text in enumerate([
    "Lava flows from the crater when a volcano erupts.", "Honey bees store honey in wax combs.",
    "A glacier carves deep valleys in the mountain.", "The violin has four strings and a bow.",
    "Ocean tides rise and fall with the moon.", "Bakers knead dough and bake bread.",
    "Solar panels turn sunlight into electricity.", "The knight moves in an L shape in chess."])]
QUERIES = [("q0", "d0", "what happens when a volcano erupts"), ("q1", "d1", "how do bees make honey"),
           ("q2", "d2", "how glaciers carve valleys"), ("q3", "d3", "how many strings does a violin have")]
# (query, positive, its score, three negatives and their scores): a hand-made teacher
EXAMPLES = [("q0", "d0", 4.0, ["d4", "d5", "d6"], [1.0, -2.0, 0.5]),
            ("q1", "d1", 2.5, ["d7", "d2", "d4"], [3.0, -1.0, 0.0]),
            ("q2", "d2", 1.0, ["d3", "d0", "d5"], [-0.5, 2.0, 1.5]),
            ("q3", "d3", 3.0, ["d6", "d1", "d7"], [0.0, 0.0, -3.0])]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    texts = [t for *_, t in PASSAGES] + [q for *_, q in QUERIES]
    return build_tiny_models(texts, tmp_path_factory.mktemp("tiny"), seed=0).bi_encoder


def _table() -> pa.Table:
    rows = [{"query_id": q, "pos_doc_id": p, "pos_score": ps, "neg_doc_ids": negs, "neg_scores": ns}
            for q, p, ps, negs, ns in EXAMPLES]
    return pa.Table.from_pylist(rows, schema=artifacts.TUPLES_SCHEMA)


def _by_hand(model: SentenceTransformer, temperature: float) -> tuple[float, float]:
    """(KL, MarginMSE) of the examples as one batch, from the student's embeddings, in numpy."""
    text = {d: t for d, _, t in PASSAGES} | {q: t for q, _, t in QUERIES}
    q = model.encode([text[e[0]] for e in EXAMPLES])
    docs = [model.encode([text[d] for d in [e[1], *e[3]]]) for e in EXAMPLES]
    student = np.array([d @ qv for qv, d in zip(q, docs, strict=True)], dtype=np.float64)  # (4, 1 + 3)
    teacher = np.array([[e[2], *e[4]] for e in EXAMPLES])

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    p_teacher = np.exp(log_softmax(teacher / temperature))
    kl = (p_teacher * (np.log(p_teacher) - log_softmax(student / temperature))).sum() / len(EXAMPLES)
    margins = lambda s: s[:, :1] - s[:, 1:]  # noqa: E731
    return kl * temperature**2, float(np.mean((margins(student) - margins(teacher)) ** 2))


@pytest.mark.parametrize("loss, temperature", [("kl", 1.0), ("kl", 2.5), ("margin_mse", 1.0),
                                               ("kl+margin_mse", 0.5)])
def test_the_trainers_loss_matches_one_computed_by_hand(student, loss, temperature):
    model = SentenceTransformer(str(student), device="cpu").eval()
    texts = {d: t for d, _, t in PASSAGES}
    dataset = st_trainer.tuples_dataset(_table(), st_trainer.query_texts(pa.table(
        {"query_id": [q for q, *_ in QUERIES], "text": [t for *_, t in QUERIES]})),
        st_trainer.passage_lookup(pa.table({"doc_id": list(texts), "title": [""] * len(texts),
                                            "text": list(texts.values())})))
    batch = dataset[:]
    columns = ["query", "positive", "negative_1", "negative_2", "negative_3"]
    assert list(batch) == [*columns, "label"]
    fn = st_trainer.make_loss(loss, model, "dot", temperature=temperature, margin_mse_weight=0.3)
    with torch.no_grad():
        got = fn([model.preprocess(batch[c]) for c in columns], torch.tensor(batch["label"])).item()
    kl, mse = _by_hand(model, temperature)
    expected = {"kl": kl, "margin_mse": mse, "kl+margin_mse": kl + 0.3 * mse}[loss]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert kl > 0.01 and mse > 0.1  # neither side is trivially zero


def _store(root: Path) -> ArtifactStore:
    store = ArtifactStore(root)
    for stage, rows in (("corpus", PASSAGES), ("queries", QUERIES)):
        schema = artifacts.SCHEMAS[stage]
        with store.writer(stage, config={"rows": stage}) as out:
            out.write_part([pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema)],
                           schema)
    with store.writer("triples", config={"rows": "tuples"}) as out:
        out.write_part([_table()], artifacts.TUPLES_SCHEMA)
        out.extra["negatives_per_example"] = 3
    return store


def _train(store, student, callbacks=()):
    cfg = TrainConfig(loss="kl", temperature=2.0, steps=4, batch_size=2, checkpoint_every=2, learning_rate=1e-3,
                      warmup_steps=0, max_seq_length=32, seed=3)
    return run_train(cfg, store, str(student), store.require("corpus"), store.require("queries"),
                     store.require("triples"), callbacks=callbacks)


def _weights(path) -> dict[str, torch.Tensor]:
    return SentenceTransformer(str(path), device="cpu").state_dict()


def test_kl_training_on_tuples_resumes_where_it_stopped(student, tmp_path):
    crashed = _store(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(crashed, student, [CrashAt(3)])
    resumed = _train(crashed, student)
    straight = _train(_store(tmp_path / "b"), student)
    info = resumed.manifest["train"]
    assert (info["steps"], info["resumed_from_step"]) == (4, 2) and info["loss_first"] > 0
    assert info["loss_history"] == straight.manifest["train"]["loss_history"]
    a, b = _weights(crashed.url("model")), _weights(straight.store.url("model"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], _weights(student)[k]) for k in a)  # it trained


def test_settings_a_loss_does_not_read_stay_out_of_the_train_fingerprint():
    """A model trained before temperature, margin_mse_weight and remine_every existed keeps its fingerprint."""
    from gplflow.tasks.train import _fingerprinted

    before = ["batch_size", "checkpoint_every", "learning_rate", "loss", "max_seq_length", "seed", "similarity",
              "steps", "warmup_steps"]  # TrainConfig's fingerprinted keys before the n-tuple losses
    assert sorted(_fingerprinted(TrainConfig(temperature=3.0, margin_mse_weight=2.0))) == before
    assert sorted(_fingerprinted(TrainConfig(loss="kl"))) == sorted([*before, "temperature"])
    assert _fingerprinted(TrainConfig(loss="kl", temperature=2.0)) != _fingerprinted(TrainConfig(loss="kl"))
    assert "remine_every" in _fingerprinted(TrainConfig(steps=10, remine_every=5))


@pytest.mark.serial  # a torchrun job of two processes
def test_kl_on_two_processes_trains_the_one_process_model(student, tmp_path, monkeypatch):
    """DistillKLDivLoss is per example, so 2 gloo ranks with the same global batch give one process's losses and
    model (dropout off: each process would draw its own masks)."""
    import json
    import shutil

    monkeypatch.setenv("GPLFLOW_DEVICE", "cpu")  # CPU processes stand in for devices, on a GPU host too
    quiet = tmp_path / "student"
    shutil.copytree(student, quiet)
    config = json.loads((quiet / "config.json").read_text())
    (quiet / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                   "attention_probs_dropout_prob": 0.0}))
    cfg = TrainConfig(loss="kl", temperature=2.0, steps=4, batch_size=2, checkpoint_every=2, learning_rate=1e-3,
                      warmup_steps=0, max_seq_length=32, seed=3)
    runs = {}
    for devices in (1, 2):
        store = _store(tmp_path / f"devices-{devices}")
        runs[devices] = run_train(cfg.model_copy(update={"devices": devices}), store, str(quiet),
                                  store.require("corpus"), store.require("queries"), store.require("triples"))
    one, two = (runs[n].manifest["train"] for n in (1, 2))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [step for step, _ in two["loss_history"]] == [1, 2, 3, 4]
    assert [loss for _, loss in two["loss_history"]] == pytest.approx([loss for _, loss in one["loss_history"]],
                                                                      abs=1e-5)
    texts = [t for *_, t in PASSAGES]
    a, b = (SentenceTransformer(str(runs[n].local_dir()), device="cpu").encode(texts) for n in (1, 2))
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() >= 0.999
    assert not all(torch.equal(v, _weights(quiet)[k]) for k, v in _weights(runs[1].local_dir()).items())  # it trained
