"""Tiny, offline, deterministic models of the real architectures, for tests and the demo.

The pipeline's default models live on the Hugging Face Hub, which these machines cannot reach. This module
builds stand-ins from a corpus and a seed: a BPE tokenizer trained on the corpus, a random-init T5 query
generator, a BERT cross-encoder (one raw logit), a BERT + mean-pooling bi-encoder, and a Llama-architecture causal
LM with a ChatML chat template (the local back-end of LLM query generation). They are saved as
ordinary Hugging Face / sentence-transformers folders, so every loader in the project runs its real code
path on them. Same texts + seed give byte-identical folders; a finished build is cached and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import string
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from sentence_transformers import CrossEncoder, SentenceTransformer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

try:  # sentence-transformers >= 5.4 moved the modules; the old path still works there but warns.
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.models import Pooling, Transformer

logger = logging.getLogger(__name__)

# Bump when anything below changes what gets built, so stale cached folders are not reused.
BUILDER_VERSION = "2"  # 2: the causal LM

VOCAB_SIZE = 3000
MAX_LENGTH = 512
BI_ENCODER_MAX_SEQ_LENGTH = 256
# One shared vocabulary. pad/eos/unk come first with T5's own ids (pad 0 is T5's decoder start token);
# the BERT specials follow.
PAD, EOS, UNK, CLS, SEP, MASK = "[PAD]", "</s>", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, EOS, UNK, CLS, SEP, MASK]
# Characters every tokenizer knows, so queries with letters unseen in a small corpus are not [UNK].
BASE_ALPHABET = list(string.ascii_lowercase + string.digits + string.punctuation)
BERT_DIMS = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": MAX_LENGTH,
    # 10x BERT's 0.02: at the usual scale a random tiny BERT gives almost the same score to every pair
    # (std ~1e-4), which would make the demo's margins and rankings meaningless; 0.2 gives std ~0.2.
    "initializer_range": 0.2,
}
LLAMA_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 2048}
# ChatML, as Qwen models ship it: the chat markers are special tokens, and the answer ends with <|im_end|>.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + IM_END + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)
T5_DIMS = {"d_model": 64, "d_kv": 32, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 2}
BUILD_INFO = "tiny_models.json"


@dataclass(frozen=True)
class TinyModels:
    """Folders of one tiny-model build; each loads with the ordinary Hugging Face / ST loader."""

    root: Path  # the folder holding all five
    tokenizer: Path  # BERT-style tokenizer ([CLS] a [SEP] b [SEP], has [MASK]): AutoTokenizer loads it
    generator: Path  # T5ForConditionalGeneration + T5-style tokenizer (appends </s>)
    cross_encoder: Path  # BertForSequenceClassification, one logit; CrossEncoder(path).predict is raw
    bi_encoder: Path  # SentenceTransformer: BERT + mean pooling, max_seq_length 256
    causal_lm: Path  # LlamaForCausalLM + a tokenizer with a ChatML chat template (eos <|im_end|>, pad [PAD])


def default_cache_dir() -> Path:
    """Where tiny models are cached: $GPLFLOW_CACHE_DIR, else ~/.cache/gplflow."""
    env = os.environ.get("GPLFLOW_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gplflow"


def build_tiny_models(texts: Iterable[str], cache_dir: str | Path, seed: int = 0) -> TinyModels:
    """Build (or reuse) tiny models for `texts` and `seed` under `cache_dir`.

    The folder name carries a hash of (texts, seed, BUILDER_VERSION). A build is written to a temporary
    folder and renamed into place when complete, so a crashed build never looks finished.
    """
    corpus = [t for t in texts if t and t.strip()]
    if not corpus:
        raise ValueError("build_tiny_models: texts holds no non-empty text; the tokenizer needs a corpus")
    digest = _build_hash(corpus, seed)
    root = Path(cache_dir).expanduser().resolve() / f"tiny-{digest[:12]}"
    if (root / BUILD_INFO).is_file():
        logger.info("Reusing tiny models at %s", root)
        return _layout(root)
    if root.exists():
        logger.warning("Removing incomplete tiny-model folder %s", root)
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        _build_into(tmp, corpus, seed, digest)
        _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Built tiny models at %s in %.1f s", root, time.perf_counter() - start)
    return _layout(root)


def _layout(root: Path) -> TinyModels:
    return TinyModels(
        root=root,
        tokenizer=root / "tokenizer",
        generator=root / "generator",
        cross_encoder=root / "cross-encoder",
        bi_encoder=root / "bi-encoder",
        causal_lm=root / "causal-lm",
    )


def _build_hash(corpus: list[str], seed: int) -> str:
    """sha256 of the builder version, the seed and every text (length-prefixed, so joins cannot collide)."""
    h = hashlib.sha256(f"gplflow-tiny-models:{BUILDER_VERSION}:{seed}\n".encode())
    for text in corpus:
        data = text.encode("utf-8")
        h.update(f"{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def _publish(tmp: Path, root: Path) -> None:
    """Rename the finished build into place; if a concurrent build won the race, keep theirs."""
    try:
        tmp.rename(root)
    except OSError:
        if not (root / BUILD_INFO).is_file():
            raise
        logger.info("Another process finished %s first; using its build", root)


def _build_into(out: Path, corpus: list[str], seed: int, digest: str) -> None:
    """Write all five models into `out`; the build-info file goes last and marks the build complete."""
    layout = _layout(out)
    backend = train_tokenizer(corpus)
    bert_tok = _bert_tokenizer(backend)
    t5_tok = _t5_tokenizer(backend)
    bert_tok.save_pretrained(layout.tokenizer)
    _save_generator(layout.generator, t5_tok, seed)
    _save_cross_encoder(layout.cross_encoder, bert_tok, seed, scratch=out / "_scratch-ce")
    _save_bi_encoder(layout.bi_encoder, bert_tok, seed, scratch=out / "_scratch-bi")
    _save_causal_lm(layout.causal_lm, _chat_tokenizer(backend), seed)
    info = {"builder_version": BUILDER_VERSION, "seed": seed, "texts": len(corpus), "hash": digest}
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a lower-cased, SentencePiece-style BPE tokenizer on `corpus`.

    BPE rather than WordPiece because the `tokenizers` WordPiece (and Unigram) trainers number tokens in
    hash-map order, which changes from process to process; plain BPE over Metaspace is reproducible.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=BASE_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    logger.debug("Trained a BPE tokenizer with %d tokens", tok.get_vocab_size())
    return tok


def _wrap(
    backend: Tokenizer, post: processors.TemplateProcessing, **kwargs: object
) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer over a copy of `backend` with the given framing and special tokens."""
    tok = Tokenizer.from_str(backend.to_str())  # a copy, so the two wrappers do not share state
    tok.post_processor = post
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LENGTH, **kwargs)


def _bert_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """BERT framing: [CLS] a [SEP] (b [SEP]), with token type ids 0/1."""
    ids = {t: backend.token_to_id(t) for t in (CLS, SEP)}
    post = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=list(ids.items()),
    )
    return _wrap(
        backend,
        post,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
    )


def _t5_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """T5 framing: a </s> (b </s>). The BERT specials stay special, so decoding skips them too."""
    post = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, backend.token_to_id(EOS))]
    )
    extra = [CLS, SEP, MASK]
    return _wrap(
        backend,
        post,
        model_input_names=["input_ids", "attention_mask"],
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=extra,
    )


def _seeded(seed: int, name: str) -> int:
    """A per-model seed, so the two BERTs of one build differ while staying reproducible."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _init(model_cls: type, config: object, seed: int, name: str) -> torch.nn.Module:
    """Random-init `model_cls(config)` from a derived seed, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seeded(seed, name))
        model = model_cls(config)
    return model.eval()


def _save_generator(out: Path, tok: PreTrainedTokenizerFast, seed: int) -> None:
    """T5ForConditionalGeneration; pad (id 0) starts decoding, as in the real T5 checkpoints."""
    config = T5Config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        feed_forward_proj="relu",
        **T5_DIMS,
    )
    model = _init(T5ForConditionalGeneration, config, seed, "generator")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _bert_config(tok: PreTrainedTokenizerFast, **extra: object) -> BertConfig:
    return BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **BERT_DIMS, **extra)


def _save_cross_encoder(out: Path, tok: PreTrainedTokenizerFast, seed: int, scratch: Path) -> None:
    """BERT with one output logit, saved through CrossEncoder with an Identity activation.

    CrossEncoder applies a Sigmoid to single-logit models unless the folder names another activation;
    GPL's margins need raw logits (as cross-encoder/ms-marco-MiniLM-L-6-v2 ships), so Identity is saved.
    """
    model = _init(BertForSequenceClassification, _bert_config(tok, num_labels=1), seed, "cross-encoder")
    model.save_pretrained(scratch)
    tok.save_pretrained(scratch)
    ce = CrossEncoder(str(scratch), activation_fn=torch.nn.Identity(), device="cpu", local_files_only=True)
    ce.save(str(out), create_model_card=False)
    shutil.rmtree(scratch)


def _save_bi_encoder(out: Path, tok: PreTrainedTokenizerFast, seed: int, scratch: Path) -> None:
    """BERT + mean pooling as a SentenceTransformer folder."""
    model = _init(BertModel, _bert_config(tok), seed, "bi-encoder")
    model.save_pretrained(scratch)
    tok.save_pretrained(scratch)
    transformer = Transformer(str(scratch), max_seq_length=BI_ENCODER_MAX_SEQ_LENGTH)
    pooling = Pooling(model.config.hidden_size, pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out), create_model_card=False)
    shutil.rmtree(scratch)


def _chat_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Causal-LM framing (none: the chat template writes the markers) with ChatML's markers as special tokens."""
    post = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tok = _wrap(backend, post, model_input_names=["input_ids", "attention_mask"], pad_token=PAD, eos_token=IM_END,
                unk_token=UNK, additional_special_tokens=[IM_START, IM_END])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = LLAMA_DIMS["max_position_embeddings"]  # few-shot prompts run past BERT's 512
    return tok


def _save_causal_lm(out: Path, tok: PreTrainedTokenizerFast, seed: int) -> None:
    """A Llama-architecture decoder; generation ends at <|im_end|>, and [PAD] pads."""
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=True, **LLAMA_DIMS)
    model = _init(LlamaForCausalLM, config, seed, "causal-lm")
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
