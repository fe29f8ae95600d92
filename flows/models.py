"""Model slots resolved to loadable references: hub names and local folders as they are, ``tiny`` built offline
from the corpus (cached), the pip-packaged all-MiniLM-L6-v2 for its hub name, a truncated copy of the base."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prefect import get_run_logger, task

from gplflow.adapters.model_refs import TINY, packaged_minilm_path
from gplflow.adapters.store import ArtifactStore

_TINY_OF = {"generator": "generator", "cross_encoder": "cross_encoder", "base": "bi_encoder",
            "bi_encoder_teacher": "bi_encoder"}


@task(name="prepare models", task_run_name="prepare models", persist_result=False)
def prepare_models(cfg: Any, run_dir: str) -> dict[str, Any]:
    """Resolve every model slot; ``tiny`` slots get tiny models built offline from the corpus (cached)."""
    resolved = resolve_models(cfg, ArtifactStore(run_dir))
    log = get_run_logger()
    for line in model_lines(cfg, resolved):
        log.info("model %s", line)
    return resolved


def model_lines(cfg: Any, resolved: dict[str, Any]) -> list[str]:
    """One line per model slot: ``slot: configured -> resolved`` (the arrow left out where a slot is used as
    configured); a retriever's line names its similarity, the base's the layers it keeps."""
    lines = []
    for slot, ref in _slots(cfg).items():
        found, layers = resolved[slot], cfg.models.base_layers if slot == "base" else None
        shown = f"{ref} (first {layers} layer{'s' if layers > 1 else ''})" if layers else ref
        lines.append(f"{slot}: {shown}" + (f" -> {found}" if found != ref else ""))
    for i, ((name, score), (found, _)) in enumerate(zip(_retrievers(cfg), resolved["retrievers"], strict=True)):
        lines.append(f"retrievers.{i}: {name} ({score})" + (f" -> {found}" if found != name else ""))
    return lines


def _slots(cfg: Any) -> dict[str, str]:
    """The single-model slots as configured."""
    return {
        "generator": cfg.models.generator,
        "cross_encoder": cfg.models.cross_encoder,
        "base": cfg.models.base,
        # the base is unused then: with BM25-only mining validate_run wants a teacher named or a cross-encoder
        "bi_encoder_teacher": cfg.models.bi_encoder_teacher_ref,
    }


def _retrievers(cfg: Any) -> list[tuple[str, str]]:
    return [(r.name, r.score) for r in cfg.models.retrievers]


def resolve_models(cfg: Any, store: ArtifactStore) -> dict[str, Any]:
    """Each model slot of ``cfg`` (a PipelineConfig: not imported, as the config imports the stage registry, which
    resolves models through here) as a loadable reference; ``tiny`` ones are built from the corpus in ``store``."""
    return dict(ModelSlots(cfg, store))


class ModelSlots(Mapping[str, Any]):
    """The model slots of ``cfg`` (``generator`` ... ``retrievers``), each resolved when first read.

    A pool shard reads only the slots its stage loads (a label shard: the teacher), so it neither builds tiny
    models nor cuts the base it never uses, nor imports torch for them (seconds per shard, hundreds of shards).
    """

    def __init__(self, cfg: Any, store: ArtifactStore):
        self.cfg, self.store = cfg, store
        self._found: dict[str, Any] = {}
        self._tiny: Any = None

    def __getitem__(self, slot: str) -> Any:
        if slot not in self._found:
            self._found[slot] = self._resolve(slot)
        return self._found[slot]

    def __iter__(self) -> Iterator[str]:
        return iter([*_slots(self.cfg), "retrievers"])

    def __len__(self) -> int:
        return len(_slots(self.cfg)) + 1

    def _resolve(self, slot: str) -> Any:
        if slot == "retrievers":
            return [(self._ref(name, "bi_encoder"), score) for name, score in _retrievers(self.cfg)]
        tiny_of = {**_TINY_OF, "generator": "causal_lm"} if self.cfg.generate.method == "llm" else _TINY_OF
        found = self._ref(_slots(self.cfg)[slot], tiny_of[slot])
        if slot == "base" and self.cfg.models.base_layers:
            from gplflow.adapters.models import truncated_copy  # torch: only where a slot needs it
            from gplflow.adapters.tiny_models import default_cache_dir

            found = str(truncated_copy(found, self.cfg.models.base_layers, default_cache_dir()))
        return found

    def _ref(self, ref: str, tiny_kind: str) -> str:
        """``ref`` as a loadable reference; ``tiny`` as the tiny model of that kind, built from the corpus once."""
        if ref != TINY:
            return packaged(ref)
        if self._tiny is None:
            from gplflow.adapters.tiny_models import build_tiny_models, default_cache_dir

            corpus = self.store.require("corpus")
            texts = (row["text"] for batch in corpus.iter_batches(["text"]) for row in batch.to_pylist())
            self._tiny = build_tiny_models(texts, default_cache_dir(), seed=self.cfg.models.tiny_seed)
        return str(getattr(self._tiny, tiny_kind))


def packaged(ref: str) -> str:
    """The pip-packaged all-MiniLM-L6-v2 stands in for its hub name, so it works offline."""
    if ref.lower() in {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "minilm"}:
        path = packaged_minilm_path()
        if path is not None:
            return str(path)
    return ref
