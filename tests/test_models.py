"""Model references: the truncated student copy (``models.base_layers``)."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from gplflow.adapters.models import truncated_copy
from gplflow.adapters.tiny_models import build_tiny_models

TEXTS = [f"passage {i} about queens, drones, brood frames and varroa mites in hive {i % 7}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_models(TEXTS, tmp_path_factory.mktemp("tiny-models"), seed=0)


def test_truncated_copy_keeps_the_first_layers_and_their_weights(tiny, tmp_path):
    source = SentenceTransformer(str(tiny.bi_encoder), device="cpu")
    assert source[0].auto_model.config.num_hidden_layers == 2
    path = truncated_copy(str(tiny.bi_encoder), 1, tmp_path)
    student = SentenceTransformer(str(path), device="cpu")
    encoder = student[0].auto_model
    assert encoder.config.num_hidden_layers == 1 and len(encoder.encoder.layer) == 1
    kept, full = encoder.state_dict(), source[0].auto_model.state_dict()
    assert all(torch.equal(kept[k], full[k]) for k in kept)  # layer 0, embeddings (and pooler) unchanged
    assert not any(k.startswith("encoder.layer.1.") for k in kept)
    assert student.encode(["queen cells on the frame"]).shape == (1, source.get_embedding_dimension())


def test_truncated_copy_is_built_once_and_reused(tiny, tmp_path):
    first = truncated_copy(str(tiny.bi_encoder), 1, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert truncated_copy(str(tiny.bi_encoder), 1, tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind


def test_more_layers_than_the_model_has_is_a_clear_error(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"models.base_layers: 3 is not between 1 and the 2 layers"):
        truncated_copy(str(tiny.bi_encoder), 3, tmp_path)
    assert list(tmp_path.iterdir()) == []
