"""Promote: which model a run publishes, the adapted one or its base (``evaluate.promote``, ``evaluate.min_gain``).

``if_better`` (the default) promotes the adapted model only when it beats the base on the primary metric
(nDCG@10) of the primary evaluation (the qrels when given, else the held-out queries) by at least ``min_gain``
(and by more than nothing); ``always`` promotes it whatever the numbers. The evaluate stage makes the decision
(``metrics.json`` and its manifest, ``promotion``); this module also publishes ``promoted/``: a manifest and
``promoted.json`` naming the promoted model (``model``: adapted | base), a reference ``SentenceTransformer(ref)``
loads (the run's ``model/`` folder or the base as configured) and why. ``model/`` always keeps the adapted model.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import task

from gplflow.adapters import artifacts
from gplflow.adapters import metrics as trec
from gplflow.adapters.errors import MissingInputError
from gplflow.adapters.store import Artifact, ArtifactStore, fingerprint
from gplflow.tasks.base import retry_unless_deterministic, stage_cache

logger = logging.getLogger(__name__)

STAGE = artifacts.PROMOTED
FILE = "promoted.json"
CODE_VERSION = "promote-1"
_NAMES = {"qrels": "the judged queries (qrels)", "heldout": "the held-out synthetic queries"}


def decide(rule: str, min_gain: float, evaluation: str | None, results: dict[str, Any] | None) -> dict[str, Any]:
    """The decision and its reason; ``results`` is one evaluation of ``metrics.json`` (None: nothing evaluated)."""
    decision: dict[str, Any] = {"rule": rule, "min_gain": min_gain, "metric": trec.PRIMARY, "evaluation": evaluation}
    if results is None:
        reason = "not evaluated (no evaluate.qrels and no held-out queries): promoted without a check"
        return {**decision, "promoted": "adapted", "reason": reason}
    base, adapted = results["models"]["base"][trec.PRIMARY], results["models"]["adapted"][trec.PRIMARY]
    gain = adapted - base
    numbers = (f"{trec.DISPLAY[trec.PRIMARY]} on {_NAMES.get(evaluation or '', evaluation)}: adapted {adapted:.4f}, "
               f"base {base:.4f} ({gain:+.4f})")
    decision.update(base=base, adapted=adapted, gain=gain)
    if rule == "always":
        return {**decision, "promoted": "adapted", "reason": f"evaluate.promote is 'always'; {numbers}"}
    if gain > 0 and gain >= min_gain:
        return {**decision, "promoted": "adapted", "reason": f"the adapted model beats its base by at least "
                                                             f"min_gain {min_gain:g}; {numbers}"}
    return {**decision, "promoted": "base", "reason": f"the adapted model does not beat its base by more than 0 and "
                                                      f"at least min_gain {min_gain:g}; {numbers}. model/ still "
                                                      "holds the adapted model"}


def _inputs(model_fp: str, evaluate_fp: str | None) -> dict[str, str]:
    return {"model": model_fp, **({"evaluate": evaluate_fp} if evaluate_fp else {})}


def promote_fingerprint(rule: str, min_gain: float, model_fp: str, evaluate_fp: str | None) -> str:
    return fingerprint(STAGE, {"rule": rule, "min_gain": min_gain}, _inputs(model_fp, evaluate_fp), CODE_VERSION)


def publish(store: ArtifactStore, decision: dict[str, Any], refs: dict[str, str], inputs: dict[str, str]) -> Artifact:
    """Publish ``promoted/`` for ``decision`` (reused when the same decision on the same inputs is there)."""
    config = {"rule": decision["rule"], "min_gain": decision["min_gain"]}
    fp = fingerprint(STAGE, config, inputs, CODE_VERSION)
    if (found := store.load(STAGE, expect_fingerprint=fp)) is not None:
        return found
    record = {**decision, "ref": refs[decision["promoted"]]}
    with store.writer(STAGE, config=config, inputs=inputs, code_version=CODE_VERSION) as out:
        out.write_json(FILE, record)
        out.extra["promotion"] = record
    log = logger.info if decision["promoted"] == "adapted" else logger.warning
    log("promoted the %s model: %s", decision["promoted"], decision["reason"])
    return store.require(STAGE)


def read(store: ArtifactStore) -> dict[str, Any] | None:
    """The run's promotion record (``promoted``, ``ref``, ``reason``, …), or None when there is none."""
    manifest = store.read_manifest(STAGE)
    return manifest.get("promotion") if manifest is not None and store.load(STAGE) is not None else None


@task(name="promote model", task_run_name="promote model", retries=0, persist_result=True,
      retry_condition_fn=retry_unless_deterministic,
      cache_policy=stage_cache(STAGE, lambda p: promote_fingerprint(p["rule"], p["min_gain"], p["model_fp"],
                                                                    p["evaluate_fp"])))
def promote_task(rule: str, min_gain: float, run_dir: str, models: dict[str, str], model_fp: str,
                 evaluate_fp: str | None) -> str:
    """Publish ``promoted/``: the evaluate stage's decision, or "adapted, unchecked" when nothing was evaluated."""
    store = ArtifactStore(run_dir)
    evaluated = store.load("evaluate", expect_fingerprint=evaluate_fp) if evaluate_fp else None
    if evaluate_fp and evaluated is None:
        raise MissingInputError(f"{store.url('evaluate')}: no valid evaluation with fingerprint {evaluate_fp}")
    decision = evaluated.manifest["promotion"] if evaluated is not None else decide(rule, min_gain, None, None)
    return publish(store, decision, models, _inputs(model_fp, evaluate_fp)).fingerprint
