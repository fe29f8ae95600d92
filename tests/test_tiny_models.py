"""Tiny offline models: they load with the ordinary loaders, behave as the pipeline needs, and reproduce."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import CrossEncoder, SentenceTransformer
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

from gplflow.adapters import tiny_models
from gplflow.adapters.tiny_models import BUILD_INFO, TinyModels, build_tiny_models, default_cache_dir

TEXTS = [
    "Honeybees communicate the location of flowers through a waggle dance.",
    "A colony of bees can contain up to sixty thousand workers in summer.",
    "The queen bee lays as many as two thousand eggs per day.",
    "Worker bees build hexagonal wax cells to store honey and pollen.",
    "Drones are male bees whose main role is to mate with a queen.",
    "Beekeepers use smoke to calm bees before opening a hive.",
    "Pollination by bees is essential for many fruit and vegetable crops.",
    "Varroa mites are parasites that weaken and kill honeybee colonies.",
    "Bees collect nectar and convert it into honey through evaporation.",
    "Royal jelly is fed to larvae that will develop into new queens.",
    "In winter, bees cluster together and shiver to keep the hive warm.",
    "Bumblebees can fly in cooler weather than most honeybees.",
    "Propolis is a resin that bees use to seal small gaps in the hive.",
    "A single bee visits hundreds of flowers on each foraging trip.",
    "Colony collapse disorder has been linked to pesticides and disease.",
    "Solitary bees nest alone in the ground or in hollow plant stems.",
    "Bees see ultraviolet light, which reveals patterns on petals.",
    "Swarming is how a honeybee colony reproduces and splits in two.",
    "Beeswax is used in candles, cosmetics and food wrapping.",
    "The honey stomach lets a forager carry nectar back to the hive.",
]
PAIRS = [
    ("how do bees find flowers", TEXTS[0]),
    ("how many eggs does a queen lay", TEXTS[2]),
    ("what kills honeybee colonies", TEXTS[7]),
]


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(TEXTS, tmp_path_factory.mktemp("tiny-cache"), seed=0)


def test_layout_and_tokenizers(tiny: TinyModels) -> None:
    for folder in (tiny.tokenizer, tiny.generator, tiny.cross_encoder, tiny.bi_encoder):
        assert folder.parent == tiny.root and folder.is_dir()
    assert (tiny.root / BUILD_INFO).is_file()
    bert = AutoTokenizer.from_pretrained(tiny.tokenizer)
    enc = bert("Bees dance", "Queen bee")
    ids = enc["input_ids"]
    assert ids[0] == bert.cls_token_id and ids.count(bert.sep_token_id) == 2
    assert enc["token_type_ids"][0] == 0 and enc["token_type_ids"][-1] == 1
    assert bert.mask_token == "[MASK]" and bert.pad_token_id == 0
    assert 100 < len(bert) <= tiny_models.VOCAB_SIZE
    t5 = AutoTokenizer.from_pretrained(tiny.generator)
    assert (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    ids = t5("Bees collect nectar")["input_ids"]
    assert ids[-1] == t5.eos_token_id and ids.count(t5.eos_token_id) == 1
    assert t5.decode(ids, skip_special_tokens=True) == "bees collect nectar"


def test_generator_samples_queries(tiny: TinyModels) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.generator)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny.generator).eval()
    assert model.config.decoder_start_token_id == tok.pad_token_id == 0
    assert model.config.d_model == 64 and model.config.num_layers == 2
    enc = tok(TEXTS[:2], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=True, top_k=25, top_p=0.95, max_new_tokens=16)
    assert out.shape[0] == 2 and out.shape[1] <= 17
    assert (out[:, 0] == model.config.decoder_start_token_id).all()
    queries = tok.batch_decode(out, skip_special_tokens=True)
    assert all(isinstance(q, str) and q.strip() for q in queries)
    assert not any(s in q for q in queries for s in ("[PAD]", "</s>"))


def test_cross_encoder_predicts_raw_logits(tiny: TinyModels) -> None:
    ce = CrossEncoder(str(tiny.cross_encoder), device="cpu")
    assert isinstance(ce.activation_fn, torch.nn.Identity)
    scores = ce.predict(PAIRS)
    assert scores.shape == (len(PAIRS),) and scores.dtype == np.float32
    tok = AutoTokenizer.from_pretrained(tiny.cross_encoder)
    hf = AutoModelForSequenceClassification.from_pretrained(tiny.cross_encoder).eval()
    assert hf.config.num_labels == 1
    enc = tok([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = hf(**enc).logits[:, 0].numpy()
    np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores, 1 / (1 + np.exp(-logits)))  # no sigmoid on top
    assert len(set(np.round(scores, 6))) == len(PAIRS)


def test_bi_encoder_mean_pools(tiny: TinyModels) -> None:
    st = SentenceTransformer(str(tiny.bi_encoder), device="cpu")
    assert st.max_seq_length == tiny_models.BI_ENCODER_MAX_SEQ_LENGTH
    emb = st.encode(TEXTS[:3], convert_to_numpy=True)
    assert emb.shape == (3, 64)
    tok = AutoTokenizer.from_pretrained(tiny.bi_encoder)
    bert = st[0].model.eval()
    enc = tok(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)


def test_build_is_deterministic(tiny: TinyModels, tmp_path: Path) -> None:
    again = build_tiny_models(TEXTS, tmp_path, seed=0)
    assert again.root != tiny.root and again.root.name == tiny.root.name
    assert _tree_digest(again.root) == _tree_digest(tiny.root)
    a = load_file(tiny.generator / "model.safetensors")
    b = load_file(again.generator / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_seed_gives_other_weights(tiny: TinyModels, tmp_path: Path) -> None:
    other = build_tiny_models(TEXTS, tmp_path, seed=1)
    assert other.root.name != tiny.root.name
    tokenizer_json = (other.tokenizer / "tokenizer.json").read_bytes()
    assert tokenizer_json == (tiny.tokenizer / "tokenizer.json").read_bytes()
    for folder in ("generator", "cross_encoder", "bi_encoder"):
        a = load_file(getattr(tiny, folder) / "model.safetensors")
        b = load_file(getattr(other, folder) / "model.safetensors")
        assert not all(torch.equal(a[k], b[k]) for k in a), folder
    # The two BERTs of one build are seeded apart too.
    ce = load_file(tiny.cross_encoder / "model.safetensors")
    bi = load_file(tiny.bi_encoder / "model.safetensors")
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(ce[f"bert.{key}"], bi[key])


def test_reuses_a_finished_build(tiny: TinyModels, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _tree_digest(tiny.root)
    mtime = (tiny.root / BUILD_INFO).stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached build")

    monkeypatch.setattr(tiny_models, "train_tokenizer", no_training)
    again = build_tiny_models(iter(TEXTS), tiny.root.parent, seed=0)
    assert again == tiny
    assert (tiny.root / BUILD_INFO).stat().st_mtime_ns == mtime
    assert _tree_digest(tiny.root) == before


def test_crashed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_models, "_save_bi_encoder", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_models(TEXTS, tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_folder_is_rebuilt(tiny: TinyModels, tmp_path: Path) -> None:
    stale = tmp_path / tiny.root.name
    (stale / "generator").mkdir(parents=True)
    built = build_tiny_models(TEXTS, tmp_path, seed=0)
    assert built.root == stale
    assert _tree_digest(built.root) == _tree_digest(tiny.root)


def test_rejects_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no non-empty text"):
        build_tiny_models(["", "   "], tmp_path)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPLFLOW_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GPLFLOW_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "gplflow"
