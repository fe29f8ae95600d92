"""Promote: the run's verdict, and which model a run publishes, the adapted one or its base (``evaluate.promote``).

The verdict (``verdicts``, ``deciding``) is the three-way verdict of ``tasks/significance.py`` on the adapted
model's per-query nDCG@10 against the base's:

- with ``evaluate.qrels``, the judged queries' verdict decides;
- without them, the held-out signals decide together (``consensus``): the held-out queries, those of them with
  little word overlap with their passage, and the teacher-judged pool. ``better`` needs at least one signal
  better and none worse, ``worse`` at least one worse and none better; signals that disagree, or none
  conclusive, give ``inconclusive``. A verdict without human judgements should not rest on one noisy signal, and
  the teacher-judged one leans towards the adapted model (which was trained to imitate that teacher).

Promotion follows the verdict: ``if_better`` (the default) promotes the adapted model only when it is better,
``if_not_worse`` also when inconclusive, ``always`` whatever the verdict. The evaluate stage decides
(``metrics.json`` and its manifest, ``promotion``); this module also publishes ``promoted/``: a manifest and
``promoted.json`` naming the promoted model (``model``: adapted | base), a reference ``SentenceTransformer(ref)``
loads (the run's ``model/`` folder or the base as configured) and why. ``model/`` always keeps the adapted model.
``verdict_lines`` is the verdict in words that the CLI summary and the run report both show.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gplflow.adapters import artifacts
from gplflow.adapters import metrics as trec
from gplflow.adapters.store import Artifact, ArtifactStore, fingerprint
from gplflow.tasks.base import Ref, StageInputs, stage_task

logger = logging.getLogger(__name__)

STAGE = artifacts.PROMOTED
FILE = "promoted.json"
CODE_VERSION = "promote-2"
# each evaluation of metrics.json, in words; NO_QRELS: the signals a run without qrels decides on, in this order
NAMES = {"qrels": "the judged queries (qrels)", "heldout": "the held-out synthetic queries",
         "heldout_low_overlap": "the held-out queries with little word overlap with their passage",
         "teacher": "the held-out queries, judged by the teacher on the pooled passages"}
SHORT = {"qrels": "qrels", "heldout": "held-out", "heldout_low_overlap": "held-out low-overlap",
         "teacher": "teacher-judged"}
NO_QRELS = ("heldout", "heldout_low_overlap", "teacher")
_FOLLOWS = {"if_better": "better", "if_not_worse": "better or inconclusive"}


def verdicts(evaluations: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The verdict with qrels (``qrels``) and without them (``no_qrels``), each when its evaluations ran."""
    found = {}
    if "qrels" in evaluations:
        found["qrels"] = {"evaluation": "qrels", **_essentials(evaluations["qrels"]["comparisons"]["adapted"])}
    signals = {name: evaluations[name]["comparisons"]["adapted"] for name in NO_QRELS if name in evaluations}
    if signals:
        found["no_qrels"] = consensus(signals)
    return found


def deciding(found: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The verdict that decides: with qrels when there are any, else without."""
    return found.get("qrels") or found.get("no_qrels")


def _essentials(comparison: dict[str, Any]) -> dict[str, Any]:
    keys = ("verdict", "reason", "base", "adapted", "gain", "ci", "p_value", "n", "queries_needed")
    return {key: comparison.get(key) for key in keys}


def consensus(signals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One verdict from several no-qrels comparisons (evaluation -> the adapted model's comparison): better when
    one is better and none worse, worse when one is worse and none better, else inconclusive. The numbers kept
    are the first signal's (the held-out queries' when present); ``signals`` keeps each one's verdict."""
    said = {name: found["verdict"] for name, found in signals.items()}
    better = [SHORT[n] for n, v in said.items() if v == "better"]
    worse = [SHORT[n] for n, v in said.items() if v == "worse"]
    listed = "; ".join(f"{SHORT[name]}: {verdict}" for name, verdict in said.items())
    if better and worse:
        verdict = "inconclusive"
        why = f"the signals without qrels disagree (better on {', '.join(better)}, worse on {', '.join(worse)})"
    elif better or worse:
        verdict = "better" if better else "worse"
        first = next(n for n, v in said.items() if v == verdict)
        why = f"{signals[first]['reason']}, and no signal without qrels says otherwise ({listed})"
    else:
        verdict = "inconclusive"
        why = f"no signal without qrels is conclusive ({listed}); {signals[next(iter(signals))]['reason']}"
    numbers = _essentials(next(iter(signals.values())))
    return {"evaluation": "no_qrels", **numbers, "verdict": verdict, "reason": why, "signals": said}


def decide(rule: str, min_gain: float, verdict: dict[str, Any] | None) -> dict[str, Any]:
    """The promotion and its reason, following ``verdict`` (``deciding``'s; None: nothing evaluated)."""
    decision: dict[str, Any] = {"rule": rule, "min_gain": min_gain, "metric": trec.PRIMARY,
                                "evaluation": verdict["evaluation"] if verdict else None}
    if verdict is None:
        reason = "not evaluated (no evaluate.qrels and no held-out queries): promoted without a check"
        return {**decision, "promoted": "adapted", "reason": reason}
    decision.update(verdict=verdict["verdict"], base=verdict["base"], adapted=verdict["adapted"],
                    gain=verdict["gain"])
    said = f"the verdict is {verdict['verdict']}: {verdict['reason']}"
    if rule == "always":
        return {**decision, "promoted": "adapted", "reason": f"evaluate.promote is 'always'; {said}"}
    if verdict["verdict"] == "better" or (rule == "if_not_worse" and verdict["verdict"] == "inconclusive"):
        return {**decision, "promoted": "adapted",
                "reason": f"{said}; evaluate.promote: {rule} promotes the adapted model when it is {_FOLLOWS[rule]}"}
    return {**decision, "promoted": "base",
            "reason": f"{said}; evaluate.promote: {rule} promotes the adapted model only when it is "
                      f"{_FOLLOWS[rule]}, so the base is promoted. model/ still holds the adapted model"}


def verdict_lines(metrics: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The run's verdict in words, as (verdict, sentence) pairs: the deciding one first, then the verdict without
    qrels when the qrels decided, so a reader sees whether the two agree. Empty when nothing was compared."""
    found = (metrics or {}).get("verdicts") or {}
    return [(found[key]["verdict"], f"Verdict {title}: {found[key]['verdict'].upper()}: {found[key]['reason']}.")
            for key, title in (("qrels", "with qrels"), ("no_qrels", "without qrels")) if key in found]


class PromoteInputs(StageInputs, artifact=STAGE, code_version=CODE_VERSION):
    """What promotion reads: the rule, the trained model and its evaluation (None when nothing was evaluated)."""

    rule: str
    min_gain: float
    models: dict[str, str]  # label -> reference of the compared models: what promoted.json can name
    model: Ref
    evaluate: Ref | None = None

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        return {"rule": self.rule, "min_gain": self.min_gain}, _inputs(self.model, self.evaluate)


def _inputs(model: Ref, evaluate: Ref | None) -> dict[str, str]:
    return {"model": model.fingerprint, **({"evaluate": evaluate.fingerprint} if evaluate else {})}


def publish(store: ArtifactStore, decision: dict[str, Any], refs: dict[str, str], inputs: dict[str, str]) -> Artifact:
    """Publish ``promoted/`` for ``decision`` (reused when the same decision on the same inputs is there)."""
    config = {"rule": decision["rule"], "min_gain": decision["min_gain"]}
    fp = fingerprint(STAGE, config, inputs, CODE_VERSION)
    if (found := store.load(STAGE, expect_fingerprint=fp)) is not None:
        return found
    record = {**decision, "ref": _absolute(refs[decision["promoted"]])}
    with store.writer(STAGE, config=config, inputs=inputs, code_version=CODE_VERSION) as out:
        out.write_json(FILE, record)
        out.extra["promotion"] = record
    log = logger.info if decision["promoted"] == "adapted" else logger.warning
    log("promoted the %s model: %s", decision["promoted"], decision["reason"])
    return store.require(STAGE)


def _absolute(ref: str) -> str:
    """A local folder as an absolute path (``promoted.json`` is read from anywhere); hub names and URLs as they are."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if "://" not in ref and path.exists() else ref


def read(store: ArtifactStore) -> dict[str, Any] | None:
    """The run's promotion record (``promoted``, ``ref``, ``reason``, …), or None when there is none."""
    manifest = store.read_manifest(STAGE)
    return manifest.get("promotion") if manifest is not None and store.load(STAGE) is not None else None


@stage_task("promote model")
def promote_task(inputs: PromoteInputs) -> str:
    """Publish ``promoted/``: the evaluate stage's decision, or "adapted, unchecked" when nothing was evaluated."""
    evaluated = inputs.load(inputs.evaluate) if inputs.evaluate is not None else None
    decision = (evaluated.manifest["promotion"] if evaluated is not None
                else decide(inputs.rule, inputs.min_gain, None))
    _, fps = inputs.fingerprint_parts()
    return publish(inputs.store, decision, inputs.models, fps).fingerprint
