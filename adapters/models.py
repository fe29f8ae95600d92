"""Model loading: hub name, local folder, ``tiny`` (built offline) or the packaged all-MiniLM-L6-v2.

Every model a stage uses comes through here, so device and dtype choice and the offline error live in one
place. Nothing is loaded at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from gplflow.adapters.errors import InputError
from gplflow.adapters.model_refs import TINY, ModelUnavailableError, packaged_minilm_path, resolve  # noqa: F401

logger = logging.getLogger(__name__)

# Narrower models are not matmul-bound: bf16 only costs them accuracy (the 64-wide tiny models gained nothing).
BF16_MIN_WIDTH = 256


def device() -> str:
    """CUDA when present, else CPU; ``GPLFLOW_DEVICE=cpu`` keeps a CUDA host on the CPU."""
    forced = os.environ.get("GPLFLOW_DEVICE", "").strip().lower()
    if forced in ("cpu", "cuda"):
        return forced if forced == "cpu" or torch.cuda.is_available() else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(dev: str | None = None) -> bool:
    """Whether the device computes in bf16 natively: GPUs, and CPUs with AVX512-BF16/AMX (``GPLFLOW_NO_BF16``
    switches it off)."""
    dev = dev or device()
    if os.environ.get("GPLFLOW_NO_BF16"):
        return False
    if dev == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def width(model: torch.nn.Module) -> int:
    """The hidden size of the first Hugging Face model inside ``model`` (0 when there is none)."""
    for module in model.modules() if isinstance(model, torch.nn.Module) else ():
        config = getattr(module, "config", None)
        size = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if isinstance(size, int):
            return size
    return 0


def bf16_pays(model: torch.nn.Module, dev: str | None = None) -> bool:
    """bf16 for ``model`` on ``dev``: the device supports it and the model is wide enough to be matmul-bound.

    Measured (benchmarks/README.md, 2 CPU cores with AMX): MiniLM-L6 encodes ~2.6x faster, a MiniLM-sized
    cross-encoder scores ~2.2x faster; the 64-wide tiny models gained nothing, so they stay in fp32.
    """
    return bf16_supported(dev) and width(model) >= BF16_MIN_WIDTH


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, with the weights in bf16 where that pays: half the memory, and no per-call weight casts."""
    model.eval()
    if bf16_pays(model):
        model.to(torch.bfloat16)
    return model


@contextlib.contextmanager
def inference(dev: str | None = None, bf16: bool | None = None) -> Iterator[None]:
    """``torch.inference_mode`` plus bf16 autocast (on by default where the device supports it).

    Autocast stays on around bf16 weights: it keeps softmax, norms and reductions in fp32.
    """
    dev = dev or device()
    use_bf16 = bf16_supported(dev) if bf16 is None else bf16
    with torch.inference_mode(), torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=use_bf16):
        yield


def tokenizer_threads(dev: str | None = None) -> None:
    """Let fast tokenizers use their own threads on GPU hosts, where tokenizing would otherwise keep the GPU
    waiting; on a CPU the cores are the model's (an explicit TOKENIZERS_PARALLELISM always wins)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if (dev or device()) == "cuda" else "false")


@contextlib.contextmanager
def _explain_offline(ref: str) -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # a write to a dead reader (a killed worker's stderr) is not the model's fault
        raise
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelUnavailableError(
            f"cannot load model {ref!r}: it is not a local folder and the Hugging Face Hub "
            f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'}. Fix: pass a local "
            f"folder (a saved model) in the config, or download it once where the hub is reachable and set "
            f"HF_HUB_OFFLINE=1. ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err


def load_bi_encoder(ref: str, tiny_path: Path | None = None, max_seq_length: int | None = None,
                    inference: bool = False):
    """A SentenceTransformer; a plain Hugging Face encoder folder gets mean pooling added.

    ``inference=True`` (encoding, scoring, evaluation): bf16 weights where that pays (see ``for_inference``);
    training keeps fp32 weights.
    """
    from sentence_transformers import SentenceTransformer

    name = resolve(ref, tiny_path)
    tokenizer_threads()
    with _explain_offline(ref):
        model = SentenceTransformer(name, device=device())
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return for_inference(model) if inference else model


def load_cross_encoder(ref: str, tiny_path: Path | None = None, max_length: int | None = None,
                       inference: bool = True):
    """A CrossEncoder that returns raw logits (identity activation: margins need logits, not sigmoids).

    ``inference=True``: ready for inference (bf16 weights where that pays). ``inference=False`` (training): fp32
    weights and one output logit; a folder holding a plain encoder gets a new, randomly initialised head.
    """
    from sentence_transformers import CrossEncoder

    name = resolve(ref, tiny_path)
    tokenizer_threads()
    with _explain_offline(ref):
        model = CrossEncoder(name, device=device(), max_length=max_length, activation_fn=torch.nn.Identity(),
                             num_labels=None if inference else 1)
    return for_inference(model) if inference else model


def load_seq2seq(ref: str, tiny_path: Path | None = None):
    """A (tokenizer, model) pair for query generation, on the chosen device, ready for inference."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    name = resolve(ref, tiny_path)
    tokenizer_threads()
    with _explain_offline(ref):
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSeq2SeqLM.from_pretrained(name)
    return tokenizer, for_inference(model.to(device()))


_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layers", "num_layers")


def truncated_copy(ref: str, layers: int, cache_dir: Path) -> Path:
    """A copy of bi-encoder ``ref`` that keeps only its first ``layers`` transformer layers.

    A shallower student initialised from its teacher's lower layers is the usual start for distilling a large
    bi-encoder into a small one. Built once into ``cache_dir`` (keyed by the source's content) and reused.
    """
    from gplflow.adapters.store import content_signature

    name = resolve(ref)
    key = content_signature(name) if Path(name).exists() else name.replace("/", "--")
    target = cache_dir / f"truncated-{key}-{layers}l"
    if (target / "modules.json").exists():
        return target
    model = load_bi_encoder(name)
    encoder = model[0].auto_model
    stacks = [(path, mod) for path, mod in encoder.named_modules()
              if isinstance(mod, torch.nn.ModuleList) and path.rsplit(".", 1)[-1] in ("layer", "layers")]
    if len(stacks) != 1:
        raise InputError(f"models.base_layers: cannot find the layer stack of {ref!r} "
                         f"({type(encoder).__name__}); leave base_layers unset for this model")
    path, stack = stacks[0]
    if not 0 < layers <= len(stack):
        raise InputError(f"models.base_layers: {layers} is not between 1 and the {len(stack)} layers of {ref!r}")
    parent = encoder.get_submodule(path.rsplit(".", 1)[0]) if "." in path else encoder
    setattr(parent, path.rsplit(".", 1)[-1], stack[:layers])
    for attr in _LAYER_COUNT_KEYS:
        if hasattr(encoder.config, attr):
            setattr(encoder.config, attr, layers)
    model.model_card_data.local_files_only = True
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{target.name}.tmp-{os.getpid()}"
    model.save(str(tmp))
    os.replace(tmp, target)
    logger.info("kept the first %d layers of %s in %s", layers, ref, target)
    return target
