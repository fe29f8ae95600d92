"""What every stage shares: the frozen config base, the stage fingerprint, and the artifact-checked cache key."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from gplflow.adapters.store import Artifact, ArtifactStore, fingerprint

logger = logging.getLogger(__name__)


class StageConfig(BaseModel):
    """A stage's settings: frozen, and unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def stage_fingerprint(stage: str, cfg: BaseModel | Mapping[str, Any], inputs: Mapping[str, str], code: str) -> str:
    config = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    return fingerprint(stage, config, inputs, code)


def reuse(store: ArtifactStore, stage: str, fp: str) -> Artifact | None:
    """The stage's published artifact if it was made from exactly these inputs and still validates."""
    artifact = store.load(stage, expect_fingerprint=fp)
    if artifact is not None:
        logger.info("%s: reusing %s (fingerprint %s)", stage, artifact.url, fp)
    return artifact


def artifact_cache_key(stage: str, fingerprint_of) -> Any:
    """A Prefect ``cache_key_fn`` keyed by the stage fingerprint (never by the flow-run id).

    Prefect's cache alone would hand back a cached path even when the artifact behind it was deleted, so
    the flows call a stage with ``refresh_cache=True`` whenever its artifact does not validate.
    """

    def key(_ctx: Any, params: dict[str, Any]) -> str:
        return f"gplflow-{stage}-{fingerprint_of(params)}"

    return key
