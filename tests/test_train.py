"""Train stage: MarginMSE (GPL) and MNRL (GenQ) on a tiny bi-encoder, plain HF bases, crash and resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from artifact_rows import write_artifact
from crash import CrashAt
from sentence_transformers import SentenceTransformer, util
from sentence_transformers.sentence_transformer import losses
from stage_calls import run_train, train_fingerprint
from transformers import TrainerCallback

from gplflow.adapters import trainer as st_trainer
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.tasks.train import TrainConfig

PASSAGES = [
    ("d0", "Volcanoes", "Lava flows from the crater when a volcano erupts and ash covers the valley."),
    ("d1", "", "Honey bees collect nectar from flowers and store honey in wax combs inside the hive."),
    ("d2", "Glaciers", "A glacier carves deep valleys as the ice slowly moves down the mountain."),
    ("d3", "", "The violin has four strings and is played with a bow made of horse hair."),
    ("d4", "Tides", "Ocean tides rise and fall twice a day because of the pull of the moon."),
    ("d5", "Bread", "Bakers knead the dough, let the yeast rise, then bake the bread in a hot oven."),
    ("d6", "", "Solar panels turn sunlight into electricity using cells made of silicon."),
    ("d7", "Chess", "In chess the knight moves in an L shape and can jump over other pieces."),
    ("d8", "Coffee", "Coffee beans are roasted, ground and brewed with hot water to make espresso."),
    ("d9", "", "Penguins cannot fly but swim fast in cold water to catch fish and krill."),
    ("d10", "Rainbows", "A rainbow appears when sunlight is refracted by raindrops in the sky."),
    ("d11", "Bicycles", "A bicycle chain turns the rear wheel when the rider pushes the pedals."),
]
QUERIES = [
    ("q0a", "d0", "what happens when a volcano erupts"), ("q0b", "d0", "lava and ash from the crater"),
    ("q1a", "d1", "how do bees make honey"), ("q1b", "d1", "wax combs in a hive"),
    ("q2a", "d2", "how glaciers carve valleys"), ("q2b", "d2", "moving ice on a mountain"),
    ("q3a", "d3", "how many strings does a violin have"), ("q3b", "d3", "bow made of horse hair"),
    ("q4a", "d4", "why do ocean tides rise"), ("q4b", "d4", "the moon pulls the sea"),
    ("q5a", "d5", "how to bake bread"), ("q5b", "d5", "yeast makes dough rise"),
    ("q6a", "d6", "how do solar panels work"), ("q6b", "d6", "silicon cells sunlight electricity"),
    ("q7a", "d7", "how does the knight move in chess"), ("q7b", "d7", "chess piece that jumps"),
    ("q8a", "d8", "how is espresso made"), ("q8b", "d8", "roasted coffee beans"),
    ("q9a", "d9", "can penguins fly"), ("q9b", "d9", "birds that swim in cold water"),
    ("q10a", "d10", "why does a rainbow appear"), ("q10b", "d10", "sunlight refracted by raindrops"),
    ("q11a", "d11", "how does a bicycle chain work"), ("q11b", "d11", "pedals turn the rear wheel"),
]


def _passage(doc_id: str) -> str:
    _, title, text = next(p for p in PASSAGES if p[0] == doc_id)
    return f"{title} {text}" if title else text


def _triples() -> list[tuple[str, str, str, float, float, float]]:
    """Two negatives per query; a consistent teacher: the positive scores +3, negatives -3 scaled by rank."""
    rows = []
    for index, (qid, pos, _) in enumerate(QUERIES):
        for rank, step in enumerate((3, 7)):
            neg = PASSAGES[(int(pos[1:]) + step + index % 2) % len(PASSAGES)][0]
            pos_score, neg_score = 3.0, -3.0 * (1 + rank) / 2
            rows.append((qid, pos, neg, pos_score, neg_score, pos_score - neg_score))
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [f"{title} {text}" for _, title, text in PASSAGES] + [q for _, _, q in QUERIES]
    return build_tiny_models(texts, tmp_path_factory.mktemp("tiny-models"), seed=0)


def _inputs(store: ArtifactStore) -> ArtifactStore:
    """The corpus, queries and triples the tests train on."""
    for stage, rows in (("corpus", PASSAGES), ("queries", QUERIES), ("triples", _triples())):
        write_artifact(store, stage, rows)
    return store


@pytest.fixture()
def store(tmp_path):
    return _inputs(ArtifactStore(tmp_path / "run"))


def _train(store, base, callbacks=(), **overrides):
    cfg = TrainConfig(**{"steps": 30, "batch_size": 8, "learning_rate": 5e-4, "warmup_steps": 3, "seed": 7,
                         "max_seq_length": 64, **overrides})
    triples = store.require("triples") if cfg.loss == "margin_mse" else None
    return cfg, run_train(cfg, store, str(base), store.require("corpus"), store.require("queries"), triples,
                          callbacks=callbacks)


def _loss(model_path, loss_name: str, score=None, margin_scale: float = 1.0) -> float:
    """The loss of a saved model on every training row as one batch, computed independently: eval, no grad."""
    model = SentenceTransformer(str(model_path), device="cpu").eval()
    if loss_name == "margin_mse":
        rows = _triples()
        query_text = {qid: text for qid, _, text in QUERIES}
        columns = [[query_text[r[0]] for r in rows], [_passage(r[1]) for r in rows], [_passage(r[2]) for r in rows]]
        labels = torch.tensor([r[5] * margin_scale for r in rows])
        loss_fn = losses.MarginMSELoss(model, **({"similarity_fct": score} if score else {}))
    else:  # one query per passage, so no in-batch duplicate positives
        firsts = QUERIES[::2]
        columns, labels = [[q for _, _, q in firsts], [_passage(d) for _, d, _ in firsts]], None
        loss_fn = losses.MultipleNegativesRankingLoss(model)
    with torch.no_grad():
        return loss_fn([model.preprocess(column) for column in columns], labels).item()


def _weights(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in SentenceTransformer(str(path), device="cpu").state_dict().items()}


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_passage_lookup_joins_title_and_text():
    table = pa.table({"doc_id": ["a", "b", "c"], "title": ["T", "", None], "text": ["x y", "z", "w"]})
    assert st_trainer.passage_lookup(table)["passage"] == ["T x y", "z", "w"]


def test_margin_mse_rows_resolve_ids_to_texts(store):
    triples = store.require("triples").read_table()
    passages = st_trainer.passage_lookup(store.require("corpus").read_table())
    queries = st_trainer.query_texts(store.require("queries").read_table())
    rows = st_trainer.margin_mse_dataset(triples, queries, passages)
    first = rows[0]
    assert list(first) == ["query", "positive", "negative", "label"]
    assert first["query"] == QUERIES[0][2]
    assert first["positive"] == _passage(_triples()[0][1]) == "Volcanoes " + PASSAGES[0][2]
    assert first["negative"] == _passage(_triples()[0][2])
    assert first["label"] == pytest.approx(_triples()[0][5])
    assert len(rows) == 2 * len(QUERIES)


def test_unknown_passage_id_is_a_clear_error(store):
    triples = store.require("triples").read_table()
    broken = triples.set_column(2, "neg_doc_id", pa.array(["d1"] * 5 + ["nope"] + ["d1"] * (len(triples) - 6)))
    passages = st_trainer.passage_lookup(store.require("corpus").read_table())
    queries = st_trainer.query_texts(store.require("queries").read_table())
    with pytest.raises(ValueError, match=r"triples row 5: neg_doc_id 'nope'"):
        st_trainer.margin_mse_dataset(broken, queries, passages)


def test_margin_mse_training_lowers_loss_and_changes_weights(store, tiny):
    cfg, model = _train(store, tiny.bi_encoder)
    assert model.fingerprint == train_fingerprint(cfg, str(tiny.bi_encoder), store.require("triples").fingerprint,
                                                  store.require("corpus").fingerprint)
    info = model.manifest["train"]
    assert info["steps"] == 30 and info["resumed_from_step"] is None and info["steps_this_run"] == 30
    assert len(info["loss_history"]) == 30 and info["loss_last"] < info["loss_first"]
    base_loss, trained_loss = _loss(tiny.bi_encoder, "margin_mse"), _loss(store.url("model"), "margin_mse")
    assert trained_loss < 0.8 * base_loss
    before, after = _weights(tiny.bi_encoder), _weights(store.url("model"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trained = SentenceTransformer(store.url("model"), device="cpu")
    assert trained.encode(["how do bees make honey", "lava"]).shape == (2, 64)
    assert trained.similarity_fn_name == "dot"  # MarginMSE fits dot-product margins
    assert not (Path(store.root) / ".checkpoints" / f"model-{model.fingerprint}").exists()  # cleaned up
    assert _train(store, tiny.bi_encoder)[1].manifest == model.manifest  # same inputs: reused, not retrained


def test_margin_mse_with_cosine_similarity_fits_cosine_margins(store, tiny):
    """A bi-encoder teacher's margins are cosine differences (within ±2): a cosine student can fit them."""
    scaled = [(*row[:3], row[3] / 10, row[4] / 10, row[5] / 10) for row in _triples()]
    write_artifact(store, "triples", scaled)
    _, model = _train(store, tiny.bi_encoder, similarity="cos_sim", steps=30)
    assert model.manifest["inputs"]["triples"] == store.require("triples").fingerprint
    before, after = (_loss(m, "margin_mse", util.pairwise_cos_sim, 0.1) for m in (tiny.bi_encoder, store.url("model")))
    assert after < 0.85 * before
    assert SentenceTransformer(store.url("model"), device="cpu").similarity_fn_name == "cosine"
    assert model.manifest["config"]["similarity"] == "cos_sim"


def test_mnrl_training_lowers_mnrl_loss(store, tiny):
    _, model = _train(store, tiny.bi_encoder, loss="mnrl", steps=20)
    assert model.manifest["inputs"]["queries"] == store.require("queries").fingerprint
    assert "triples" not in model.manifest["inputs"]
    assert model.manifest["train"]["steps"] == 20 and model.manifest["train"]["examples"] == len(QUERIES)
    assert _loss(store.url("model"), "mnrl") < _loss(tiny.bi_encoder, "mnrl")
    assert SentenceTransformer(store.url("model"), device="cpu").similarity_fn_name == "cosine"


def test_plain_hugging_face_encoder_gets_mean_pooling(store, tiny, tmp_path):
    bi_encoder = SentenceTransformer(str(tiny.bi_encoder), device="cpu")
    plain = tmp_path / "plain-bert"
    bi_encoder[0].auto_model.save_pretrained(plain)
    bi_encoder.tokenizer.save_pretrained(plain)
    assert not (plain / "modules.json").exists()
    texts = ["how do bees make honey", "a rainbow in the sky"]
    from_plain = SentenceTransformer(str(plain), device="cpu").encode(texts)
    assert from_plain == pytest.approx(bi_encoder.encode(texts), abs=1e-5)  # the same BERT + mean pooling
    _, model = _train(store, plain, steps=10)
    trained = SentenceTransformer(store.url("model"), device="cpu")
    assert trained[1].get_config_dict()["pooling_mode"] == "mean"
    assert trained.max_seq_length == 64
    assert trained.encode(texts).shape == (2, 64)
    assert model.manifest["train"]["steps"] == 10


def test_crashed_training_resumes_from_its_last_checkpoint(store, tiny, tmp_path):
    settings = {"steps": 4, "checkpoint_every": 2, "batch_size": 4}
    with pytest.raises(RuntimeError, match="simulated crash before step 3"):
        _train(store, tiny.bi_encoder, callbacks=[CrashAt(3)], **settings)
    assert store.load("model") is None  # nothing published
    checkpoints = list((Path(store.root) / ".checkpoints").glob("model-*/checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-2"]

    counter = _CountSteps()
    _, model = _train(store, tiny.bi_encoder, callbacks=[counter], **settings)
    info = model.manifest["train"]
    assert counter.steps == [3, 4]  # only the steps the crash lost
    assert (info["steps"], info["resumed_from_step"], info["steps_this_run"]) == (4, 2, 2)
    assert [step for step, _ in info["loss_history"]] == [1, 2, 3, 4]  # history carried over from the checkpoint

    # The resumed run ends exactly where an uninterrupted one does (optimizer, schedule, data order, RNG).
    fresh = _inputs(ArtifactStore(tmp_path / "fresh"))
    _, uninterrupted = _train(fresh, tiny.bi_encoder, **settings)
    assert uninterrupted.fingerprint == model.fingerprint
    resumed, straight = _weights(store.url("model")), _weights(fresh.url("model"))
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in resumed)


def test_crash_after_the_last_step_publishes_without_training_again(store, tiny):
    class _CrashAtEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash while saving")

    settings = {"steps": 4, "checkpoint_every": 2, "batch_size": 4}
    with pytest.raises(RuntimeError, match="simulated crash while saving"):
        _train(store, tiny.bi_encoder, callbacks=[_CrashAtEnd()], **settings)
    final = next((Path(store.root) / ".checkpoints").glob("model-*/checkpoint-4"))
    expected = _weights(final)
    counter = _CountSteps()
    _, model = _train(store, tiny.bi_encoder, callbacks=[counter], **settings)
    assert counter.steps == []  # not one step past the configured 4
    info = model.manifest["train"]
    assert (info["steps"], info["resumed_from_step"], info["steps_this_run"]) == (4, 4, 0)
    assert len(info["loss_history"]) == 4
    published = _weights(store.url("model"))
    assert all(torch.equal(published[k], expected[k]) for k in expected)


def test_remote_run_dir_checkpoints_locally(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("GPLFLOW_CACHE_DIR", str(tmp_path / "cache"))
    remote = _inputs(ArtifactStore("memory://gplflow-train-test"))
    seen = []

    class _Where(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append(Path(args.output_dir))

    try:
        _, model = _train(remote, tiny.bi_encoder, steps=2, callbacks=[_Where()])
        assert seen and all(p.parent == tmp_path / "cache" / "checkpoints" for p in seen)
        assert not seen[0].exists()  # removed once the model was published
        local = model.local_dir()
        assert SentenceTransformer(str(local), device="cpu").encode(["penguins"]).shape == (1, 64)
        shutil.rmtree(local)
    finally:
        remote.remove("corpus"), remote.remove("queries"), remote.remove("triples"), remote.remove("model")
