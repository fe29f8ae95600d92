"""Labelled pairs (flow supervised): every format reads the same rows, bad rows fail with file:line, the
``pairs/`` artifact round-trips them, and supervised training lowers its loss on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import losses
from stage_calls import run_pairs, run_train_pairs

from gplflow.adapters.corpus_readers import CorpusError
from gplflow.adapters.pair_readers import iter_pairs
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.flows.config import ConfigError, PipelineConfig
from gplflow.tasks.pairs import PairsConfig
from gplflow.tasks.train import TrainConfig

DEMO_PAIRS = Path(__file__).resolve().parents[1] / "data" / "demo" / "pairs.tsv"
SCORED = [
    ("Varroa mites breed under the brood cappings.", "Mites reproduce in capped brood cells.", 0.9),
    ("A queen excluder keeps the queen out of the supers.", "The excluder keeps her from laying in the supers.", 0.85),
    ('Oxalic acid, applied in "broodless" winter, kills mites.', "Treat with oxalic acid when there is no brood.", 0.8),
    ("Swarm cells hang from the bottom edge of the frames.", "Heather honey must be pressed, not spun.", 0.0),
    ("Bees collect propolis from tree buds.", "Propolis is resin gathered from plants.", 1.0),
    ("Radial extractors spin both sides of a frame.", "A mouse guard keeps rodents out in winter.", 0.05),
]
RANKING = [
    ("how do bees make wax", "Wax is secreted by glands under the worker's abdomen.", "Drones die after mating."),
    ("when to treat for varroa", "Treat for mites in late summer, after the honey comes off.", "Comb honey is sealed."),
    ("what is propolis", "Propolis is plant resin bees use to seal gaps.", "Queens are marked by year colour."),
    ("how far do foragers fly", "Foragers usually fly within three kilometres.", "Fondant feeds bees in winter."),
]


def _write(path: Path, rows: list[tuple], columns: list[str]) -> Path:
    frame = pd.DataFrame(rows, columns=columns)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    elif path.suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False, quoting=3)  # csv.QUOTE_NONE: IANA TSV
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_every_format_reads_the_same_scored_rows(tmp_path, suffix):
    path = _write(tmp_path / f"pairs{suffix}", SCORED, ["sentence1", "sentence2", "score"])
    rows = list(iter_pairs(path, "scored"))
    assert [(r["sentence1"], r["sentence2"], r["score"]) for r in rows] == SCORED


def test_columns_are_mapped_and_scores_scaled(tmp_path):
    rows = [(a, b, s * 5) for a, b, s in SCORED]
    path = _write(tmp_path / "sts.csv", rows, ["s1", "s2", "label"])
    found = list(iter_pairs(path, "scored", columns={"sentence1": "s1", "sentence2": "s2", "score": "label"},
                            score_max=5))
    assert [r["score"] for r in found] == pytest.approx([s for *_, s in SCORED])


def test_ranking_rows_take_the_negative_only_when_the_file_has_it(tmp_path):
    with_neg = _write(tmp_path / "r.jsonl", RANKING, ["anchor", "positive", "negative"])
    assert next(iter_pairs(with_neg, "ranking")) == dict(zip(("anchor", "positive", "negative"), RANKING[0],
                                                                  strict=True))
    without = _write(tmp_path / "r.tsv", [r[:2] for r in RANKING], ["anchor", "positive"])
    assert set(next(iter_pairs(without, "ranking"))) == {"anchor", "positive"}


@pytest.mark.parametrize(("name", "content", "message"), [
    ("p.tsv", "sentence1\tscore\na\t0.5\n", "p.tsv line 1: no sentence2 column 'sentence2' for scored pairs"),
    ("p.tsv", "sentence1\tsentence2\tscore\na\tb\t0.5\nc\td\thigh\n",
     "p.tsv row 2: field 'score' (the score) must be a number, got 'high'"),
    ("p.tsv", "sentence1\tsentence2\tscore\na\tb\t0.5\nc\td\t1.5\n", "p.tsv row 2: score '1.5' is outside [0, 1]"),
    ("p.tsv", "sentence1\tsentence2\tscore\na\tb\t-0.1\n", "p.tsv row 1: score '-0.1' is outside [0, 1]"),
    ("p.tsv", "sentence1\tsentence2\tscore\na\tb\tnan\n", "p.tsv row 1: score 'nan' is outside [0, 1]"),
    ("p.tsv", "sentence1\tsentence2\tscore\na\tb\t0.5\n \tb\t0.5\n",
     "p.tsv row 2: field 'sentence1' (the sentence1) is empty"),
    ("p.tsv", "sentence1\tsentence2\tscore\na\tb\n", "p.tsv row 1: expected 3 fields as in the header, found 2"),
    ("p.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 0.2}\n{"sentence1": "a", "score": 0.2}\n',
     "p.jsonl line 2: missing field 'sentence2' (the sentence2)"),
    ("p.jsonl", '{"sentence1": "a", "sentence2": "b", "score": true}\n',
     "p.jsonl line 1: field 'score' (the score) must be a number, got boolean"),
    ("p.jsonl", '{"sentence1": "a", "sentence2": "b", "score": 2}\n', "p.jsonl line 1: score 2 is outside [0, 1]"),
    ("p.jsonl", '\n{"sentence1": "a", "sentence2": 7, "score": 1}\n',
     "p.jsonl line 2: field 'sentence2' (the sentence2) must be a string, got number"),
    ("p.csv", 'sentence1,sentence2,score\na,b,0.1\n"an open quote,b,0.2\nc,d,0.3\n',
     "p.csv line 3: quoted field never closed"),
    ("p.tsv", "sentence1\tsentence2\tscore\n", "p.tsv: no pairs found"),
])
def test_bad_rows_are_rejected_with_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CorpusError) as err:
        list(iter_pairs(path, "scored"))
    assert str(err.value).startswith(f"{tmp_path}/{message}"), str(err.value)


def test_missing_anchor_column_names_the_file(tmp_path):
    path = _write(tmp_path / "r.parquet", [r[1:] for r in RANKING], ["positive", "negative"])
    with pytest.raises(CorpusError, match=r"r\.parquet: no anchor column 'anchor' for ranking pairs"):
        list(iter_pairs(path, "ranking"))


def test_tsv_quotes_are_text(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('sentence1\tsentence2\tscore\n"open quote\tclosed" later\t0.5\n')
    assert next(iter_pairs(path, "scored"))["sentence1"] == '"open quote'


def test_artifact_round_trips_the_rows_and_records_the_score_spread(tmp_path):
    path = _write(tmp_path / "pairs.csv", SCORED, ["sentence1", "sentence2", "score"])
    store = ArtifactStore(tmp_path / "run")
    artifact = run_pairs(PairsConfig(path=str(path)), store)
    table = artifact.read_table()
    assert table.column_names == ["sentence1", "sentence2", "score"]
    assert [tuple(r.values()) for r in table.to_pylist()] == [(a, b, pytest.approx(s)) for a, b, s in SCORED]
    manifest = artifact.manifest
    assert manifest["kind"] == "scored" and manifest["format"] == "csv" and manifest["rows"] == len(SCORED)
    assert manifest["scores"]["histogram"] == [2, 0, 0, 0, 4] and manifest["scores"]["max"] == 1.0
    assert run_pairs(PairsConfig(path=str(path)), store).fingerprint == artifact.fingerprint  # reused
    ranking = run_pairs(PairsConfig(path=str(_write(tmp_path / "r.tsv", [r[:2] for r in RANKING],
                                                    ["anchor", "positive"])), kind="ranking"), store)
    assert ranking.read_table().column_names == ["anchor", "positive"] and ranking.manifest["kind"] == "ranking"


def test_a_bad_file_publishes_nothing(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("sentence1\tsentence2\tscore\na\tb\t0.5\nc\td\t9\n")
    store = ArtifactStore(tmp_path / "run")
    with pytest.raises(CorpusError, match=r"bad\.tsv row 2"):
        run_pairs(PairsConfig(path=str(path)), store)
    assert store.read_manifest("pairs") is None


def test_demo_pairs_are_valid_and_spread():
    rows = list(iter_pairs(DEMO_PAIRS, "scored"))
    scores = [r["score"] for r in rows]
    assert 60 <= len(rows) <= 120
    assert sum(s <= 0.2 for s in scores) >= 15 and sum(s >= 0.8 for s in scores) >= 15


def test_supervised_config_defaults_and_checks(tmp_path):
    pairs = {"path": str(DEMO_PAIRS)}
    cfg = PipelineConfig.from_dict({"flow": "supervised", "corpus": {"path": "c"}, "pairs": pairs})
    assert cfg.train.loss == "cosent"
    ranking = PipelineConfig.from_dict({"flow": "supervised", "corpus": {"path": "c"},
                                        "pairs": {**pairs, "kind": "ranking"}})
    assert ranking.train.loss == "mnrl"
    with pytest.raises(ConfigError, match=r"trains scored pairs with train\.loss cosent or cosine or angle, not mnrl"):
        PipelineConfig.from_dict({"flow": "supervised", "corpus": {"path": "c"}, "pairs": pairs,
                                  "train": {"loss": "mnrl"}})
    with pytest.raises(ConfigError, match="needs the key 'pairs'"):
        PipelineConfig.from_dict({"flow": "supervised", "corpus": {"path": "c"}})
    with pytest.raises(ConfigError, match="'pairs' is read by flows 'supervised' and 'augmented_sbert' only"):
        PipelineConfig.from_dict({"corpus": {"path": "c"}, "pairs": pairs})
    with pytest.raises(ConfigError, match=r"train\.loss cosine trains on labelled pairs"):
        PipelineConfig.from_dict({"corpus": {"path": "c"}, "train": {"loss": "cosine"}})
    with pytest.raises(ConfigError, match=r"unknown key 'pairs\.columns\.sentence3'"):
        PipelineConfig.from_dict({"flow": "supervised", "corpus": {"path": "c"},
                                  "pairs": {**pairs, "columns": {"sentence3": "x"}}})


# --- training on the pairs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [t for a, b, _ in SCORED for t in (a, b)] + [t for row in RANKING for t in row]
    return build_tiny_models(texts, tmp_path_factory.mktemp("tiny-models"), seed=0)


def _scored_loss(model_path, loss_cls) -> float:
    """The loss of a saved model on every scored pair as one batch, computed independently: eval, no grad."""
    model = SentenceTransformer(str(model_path), device="cpu").eval()
    columns = [[a for a, _, _ in SCORED], [b for _, b, _ in SCORED]]
    with torch.no_grad():
        return loss_cls(model)([model.preprocess(c) for c in columns], torch.tensor([s for *_, s in SCORED])).item()


@pytest.mark.parametrize(("loss", "loss_cls"), [("cosent", losses.CoSENTLoss), ("cosine", losses.CosineSimilarityLoss)])
def test_supervised_training_on_scored_pairs_lowers_its_loss(tmp_path, tiny, loss, loss_cls):
    path = _write(tmp_path / "pairs.tsv", SCORED, ["sentence1", "sentence2", "score"])
    store = ArtifactStore(tmp_path / "run")
    pairs = run_pairs(PairsConfig(path=str(path)), store)
    cfg = TrainConfig(loss=loss, steps=20, batch_size=6, learning_rate=1e-3, warmup_steps=0, seed=7,
                      max_seq_length=64)
    model = run_train_pairs(cfg, store, str(tiny.bi_encoder), pairs)
    assert model.manifest["inputs"] == {"base_model": model.manifest["inputs"]["base_model"],
                                        "pairs": pairs.fingerprint}
    assert model.manifest["train"]["examples"] == len(SCORED)
    assert _scored_loss(store.url("model"), loss_cls) < 0.8 * _scored_loss(tiny.bi_encoder, loss_cls)
    assert SentenceTransformer(store.url("model"), device="cpu").similarity_fn_name == "cosine"


def test_supervised_training_on_ranking_pairs_uses_mnrl_and_checks_the_loss(tmp_path, tiny):
    path = _write(tmp_path / "r.jsonl", RANKING, ["anchor", "positive", "negative"])
    store = ArtifactStore(tmp_path / "run")
    pairs = run_pairs(PairsConfig(path=str(path), kind="ranking"), store)
    with pytest.raises(ValueError, match=r"train\.loss 'cosent' does not train on ranking pairs; expected one of mnrl"):
        run_train_pairs(TrainConfig(loss="cosent", steps=1), store, str(tiny.bi_encoder), pairs)
    model = run_train_pairs(TrainConfig(loss="mnrl", steps=4, batch_size=4, warmup_steps=0, max_seq_length=64),
                            store, str(tiny.bi_encoder), pairs)
    assert model.manifest["train"]["steps"] == 4 and model.manifest["train"]["examples"] == len(RANKING)
