"""PipelineConfig: YAML + --set overrides, unknown keys rejected, the interface keys present."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gplflow.flows.config import ConfigError, PipelineConfig, apply_override

ROOT = Path(__file__).resolve().parent.parent

INTERFACE_KEYS = [
    "corpus.path", "corpus.format", "models.generator", "models.cross_encoder", "models.base",
    "models.retrievers", "generate.queries_per_passage", "generate.batch_size", "generate.seed",
    "mine.negatives_per_query", "mine.bm25", "label.triples", "label.seed", "train.loss", "train.steps",
    "train.batch_size", "train.max_seq_length", "evaluate.qrels",
]


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


@pytest.mark.parametrize("name", ["demo.yaml", "gpl-paper.yaml", "demo-tsdae.yaml"])
def test_shipped_configs_load_and_have_the_interface_keys(name: str) -> None:
    data = PipelineConfig.load(ROOT / "configs" / name).to_dict()
    for key in INTERFACE_KEYS:
        _get(data, key)  # KeyError if the interface lost a key


def test_demo_tsdae_is_the_demo_with_tsdae_pretraining() -> None:
    demo, tsdae = (PipelineConfig.load(ROOT / "configs" / n) for n in ("demo.yaml", "demo-tsdae.yaml"))
    assert tsdae.pretrain.method == "tsdae" and demo.pretrain.method == "none"
    for section in ("models", "generate", "mine", "label", "train", "evaluate"):
        assert getattr(tsdae, section) == getattr(demo, section), section


def test_paper_defaults() -> None:
    cfg = PipelineConfig.load(ROOT / "configs" / "gpl-paper.yaml")
    assert cfg.generate.top_k == 25 and cfg.generate.top_p == 0.95
    assert cfg.generate.queries_per_passage == "auto"
    assert cfg.mine.negatives_per_query == 50
    assert cfg.train.steps == 140_000 and cfg.train.batch_size == 32 and cfg.train.max_seq_length == 350
    assert [r.name for r in cfg.models.retrievers] == [
        "sentence-transformers/msmarco-distilbert-base-v3", "sentence-transformers/msmarco-MiniLM-L-6-v3"]


def test_overrides_are_typed_and_dotted(tmp_path: Path) -> None:
    cfg = PipelineConfig.load(ROOT / "configs" / "demo.yaml", [
        "train.steps=7", "mine.bm25=true", "label.triples=100", "evaluate.qrels=null",
        "models.retrievers=[{name: a, score: dot}, {name: b}]", "generate.queries_per_passage=auto"])
    assert cfg.train.steps == 7 and cfg.mine.bm25 is True and cfg.label.triples == 100
    assert cfg.evaluate.qrels is None
    assert [(r.name, r.score) for r in cfg.models.retrievers] == [("a", "dot"), ("b", "cos_sim")]


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text("corpus: {path: ../data/corpus.jsonl}\nevaluate: {qrels: q/test.tsv}\n")
    cfg = PipelineConfig.load(path)
    assert cfg.corpus.path == str(tmp_path / "data" / "corpus.jsonl")
    assert cfg.evaluate.qrels == str(tmp_path / "sub" / "q" / "test.tsv")


@pytest.mark.parametrize(("override", "message"), [
    ("train.stepz=3", "unknown key 'train.stepz'"),
    ("nonsense=1", "unknown key 'nonsense'"),
    ("train.loss=triplet", "'train.loss': got 'triplet', expected 'margin_mse', 'kl', 'kl+margin_mse', 'mnrl', "
                           "'cosent', 'cosine' or 'angle'"),
    ("train.temperature=0", "'train.temperature': got 0, expected greater than 0"),
    ("label.negatives_per_example=21", "label.negatives_per_example 21 is more than mine.negatives_per_query 20"),
    ("train.remine_every=200", "train.remine_every 200 is not below train.steps 200"),
    ("train.steps=0", "'train.steps': got 0"),
    ("generate.queries_per_passage=many", "'generate.queries_per_passage': got 'many'"),
    ("models.retrievers=[{name: a, score: l2}]", "models.retrievers.0.score"),
    # a true/false value for a number is an error, not 1/0 (pydantic's lax mode would take it)
    ("train.steps=true", "'train.steps': got True, expected a number"),
    ("train.learning_rate=false", "'train.learning_rate': got False, expected a number"),
    ("generate.queries_per_passage=yes", "'generate.queries_per_passage': got True, expected a number"),
    ("evaluate.heldout_fraction=true", "'evaluate.heldout_fraction': got True, expected a number"),
])
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        PipelineConfig.load(ROOT / "configs" / "demo.yaml", [override])
    assert str(err.value).startswith(f"--set {override}: ")  # the key came from --set, not from demo.yaml
    assert message in str(err.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.remine_every=50", "label.triples=64"], "train.remine_every 50: each round labels remine_every x "
                                                    "batch_size examples (one epoch); leave label.triples at auto"),
    (["flow=genq", "train.loss=mnrl", "train.remine_every=50"], "train.remine_every 50: re-mining rounds relabel "
                                                                "with the teacher, so they need flow gpl"),
])
def test_remining_rounds_only_where_they_can_run(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        PipelineConfig.load(ROOT / "configs" / "demo.yaml", overrides)
    assert PipelineConfig.load(ROOT / "configs" / "demo.yaml", ["train.remine_every=50"]).n_triples == 50 * 32


def test_a_boolean_stays_a_boolean_and_a_number_a_number() -> None:
    cfg = PipelineConfig.load(ROOT / "configs" / "demo.yaml", ["mine.bm25=true", "train.steps=3",
                                                               "generate.queries_per_passage=auto"])
    assert cfg.mine.bm25 is True and cfg.train.steps == 3 and cfg.generate.queries_per_passage == "auto"


def test_bad_values_from_the_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("corpus: {path: x}\ntrain: {steps: 0}\n")
    with pytest.raises(ConfigError) as err:
        PipelineConfig.load(path, ["train.loss=triplet"])
    assert f"{path}: 'train.steps': got 0" in str(err.value)
    assert "--set train.loss=triplet: 'train.loss': got 'triplet'" in str(err.value)


def test_malformed_override_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override({}, "train.steps")
    with pytest.raises(ConfigError, match="'train' is not a section"):
        apply_override({"train": 3}, "train.steps=1")
    with pytest.raises(ConfigError, match="config file not found"):
        PipelineConfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        PipelineConfig.load(bad)
    with pytest.raises(ConfigError, match="missing key 'corpus'"):
        PipelineConfig.load(None, [])


def test_tiny_profile_fills_unset_model_slots() -> None:
    cfg = PipelineConfig.from_dict({"profile": "tiny", "corpus": {"path": "x"}, "models": {"base": "b"}})
    assert (cfg.models.generator, cfg.models.cross_encoder, cfg.models.base) == ("tiny", "tiny", "b")
    assert [r.name for r in cfg.models.retrievers] == ["tiny"]


def test_config_is_frozen() -> None:
    cfg = PipelineConfig.from_dict({"corpus": {"path": "x"}})
    with pytest.raises(ValueError, match="frozen"):
        cfg.train.steps = 3  # type: ignore[misc]


def test_a_config_is_validated_once_per_file_version_and_overrides(tmp_path, monkeypatch):
    """The CLI, the flow and the flow-run name all load the config: one validation serves them while the file is
    unchanged; an edited file or other overrides are read again."""
    path = tmp_path / "c.yaml"
    path.write_text("name: one\ncorpus: {path: docs}\n")
    calls = []
    original = PipelineConfig.model_validate.__func__

    def counting(cls, data, *args, **kwargs):
        calls.append(1)
        return original(cls, data, *args, **kwargs)

    monkeypatch.setattr(PipelineConfig, "model_validate", classmethod(counting))
    first = PipelineConfig.load(path, ["train.steps=7"])
    assert PipelineConfig.load(path, ["train.steps=7"]) is first and len(calls) == 1
    assert PipelineConfig.load(path, ["train.steps=8"]).train.steps == 8 and len(calls) == 2
    path.write_text("name: two\ncorpus: {path: docs}\n")
    assert PipelineConfig.load(path, ["train.steps=7"]).name == "two" and len(calls) == 3
