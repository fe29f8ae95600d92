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


# --- precision and device -----------------------------------------------------------------------------------


def _bert(width: int) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=50, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=2 * width))


def test_bf16_only_for_wide_models_on_devices_that_have_it(monkeypatch):
    from gplflow.adapters import models

    monkeypatch.setattr(models, "bf16_supported", lambda dev=None: True)
    assert models.width(_bert(64)) == 64 and not models.bf16_pays(_bert(64))  # tiny: stays fp32
    assert models.width(_bert(256)) == 256 and models.bf16_pays(_bert(256))
    assert models.width(torch.nn.Linear(4, 4)) == 0  # no Hugging Face config inside
    wide = models.for_inference(_bert(256).train())
    assert not wide.training and {p.dtype for p in wide.parameters()} == {torch.bfloat16}
    narrow = models.for_inference(_bert(64))
    assert {p.dtype for p in narrow.parameters()} == {torch.float32}
    monkeypatch.setattr(models, "bf16_supported", lambda dev=None: False)
    assert {p.dtype for p in models.for_inference(_bert(256)).parameters()} == {torch.float32}


def test_gplflow_device_keeps_a_host_on_the_cpu(monkeypatch):
    from gplflow.adapters import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("GPLFLOW_DEVICE", raising=False)
    assert models.device() == "cuda"
    monkeypatch.setenv("GPLFLOW_DEVICE", "cpu")
    assert models.device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("GPLFLOW_DEVICE", "cuda")
    assert models.device() == "cpu"  # asking for CUDA where there is none falls back to the CPU


def test_tokenizer_threads_default_per_device_and_an_explicit_setting_wins(monkeypatch):
    from gplflow.adapters import models

    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    models.tokenizer_threads("cuda")
    assert models.os.environ["TOKENIZERS_PARALLELISM"] == "true"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    models.tokenizer_threads("cuda")
    assert models.os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    models.tokenizer_threads("cpu")
    assert models.os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_generate_batch_size_auto_is_per_device():
    from gplflow.tasks.generate import AUTO_BATCH, GenerateConfig

    assert GenerateConfig().batch_for("cpu") == AUTO_BATCH["cpu"] == 64
    assert GenerateConfig().batch_for("cuda") == AUTO_BATCH["cuda"] == 256
    assert GenerateConfig(batch_size=8).batch_for("cuda") == 8
    with pytest.raises(ValueError, match="batch_size must be 'auto' or an integer >= 1, got 0"):
        GenerateConfig(batch_size=0)


def test_a_broken_pipe_while_loading_is_not_reported_as_a_missing_model():
    """A pool shard whose worker was killed while it loaded its model was reported as ``ModelUnavailableError``
    (the write of a log line to the dead worker's pipe is an OSError too); a real load failure still is."""
    from gplflow.adapters.models import ModelUnavailableError, _explain_offline

    with pytest.raises(BrokenPipeError), _explain_offline("some-org/a-model"):
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(ModelUnavailableError, match="cannot load model 'some-org/a-model'"), \
            _explain_offline("some-org/a-model"):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
