"""``gplflow run --plan``: what a config will do, and how long each stage should take on this device.

The stages are the registry's (``flows/stages.py``): its ``when`` picks them, and each stage module writes its own
``estimate`` (the work it does for this config and corpus, and how to time it: ``tasks/planning.py``). Counts come
from the config and the corpus (ingested into a temporary folder unless the run directory already holds it).
Rates come from a few seconds of calibration per stage: each configured model is loaded and runs the stage's own
compute path on a small batch of the corpus, after one warm-up call, three times; the spread of those timings is
the "±" of the estimate. Nothing is written to the run directory.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from gplflow.adapters.errors import InputError
from gplflow.adapters.store import Artifact, ArtifactStore
from gplflow.flows.config import PipelineConfig
from gplflow.flows.stages import planned
from gplflow.tasks import ingest
from gplflow.tasks.planning import CALIBRATION_STEPS, CALIBRATION_TEXTS, Measured, StagePlan, calibration, timings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    device: str
    passages: int
    stages: list[StagePlan]
    reused: frozenset[str] = frozenset()  # the stages the run directory already holds, made from this config

    @property
    def seconds(self) -> float | None:
        found = [s.seconds for s in self.stages]
        return None if any(s is None for s in found) else sum(found)  # type: ignore[misc]

    @property
    def spread(self) -> float | None:
        """The total's relative spread: each stage's seconds x spread, summed (the worst case), over the total."""
        total = self.seconds
        if not total or any(s.spread is None for s in self.stages):
            return None
        return sum(s.seconds * s.spread for s in self.stages) / total  # type: ignore[operator]


def make_plan(cfg: PipelineConfig, run_dir: str, calibrate: bool = True) -> Plan:
    """The stages ``cfg`` runs, with their work and (when ``calibrate``) the estimated time on this device."""
    from gplflow.adapters import models

    if cfg.corpus is None:
        raise InputError("--plan needs corpus.path (a plan for an import.gpl_dir run is not supported)")
    with tempfile.TemporaryDirectory(prefix="gplflow-plan-") as scratch:
        corpus = _corpus(cfg.corpus, run_dir, Path(scratch))
        stages = planned_stages(cfg, corpus.rows)
        if calibrate:
            with calibration():
                _calibrate(cfg, corpus, stages)
    return Plan(models.device(), corpus.rows, stages, frozenset(reused_stages(cfg, run_dir)))


def reused_stages(cfg: PipelineConfig, run_dir: str) -> list[str]:
    """The stages a run of ``cfg`` in ``run_dir`` would reuse: in registry order, each whose artifact the run
    directory holds with exactly the fingerprint this config gives it, up to the first that would be computed
    (what follows it reads what it has not made yet, so it is computed too). What a change of the config
    recomputes is the rest of the plan."""
    from gplflow.flows.models import resolve_models
    from gplflow.flows.stages import Run

    store = ArtifactStore(run_dir)
    if not store.fs.isdir(store.root):
        return []
    run, found = Run(cfg, run_dir), []
    for stage in planned(cfg):
        if found and run.resolved is None:  # the corpus was reused: tiny models are built from it, as a run does
            run.resolved = resolve_models(cfg, store)
        fps = stage.inputs(run).fingerprints()
        if not all(store.load(name, expect_fingerprint=fp) is not None for name, fp in fps.items()):
            break
        run.fps.update(fps)
        found.append(stage.name)
    return found


def _corpus(cfg: ingest.IngestConfig, run_dir: str, scratch: Path) -> Artifact:
    """The run directory's corpus when it matches the config, else one ingested into ``scratch``."""
    found = ArtifactStore(run_dir).load(ingest.STAGE, expect_fingerprint=ingest.ingest_fingerprint(cfg))
    return found or ingest.run_ingest(ingest.IngestInputs(run_dir=str(scratch), cfg=cfg))


def planned_stages(cfg: PipelineConfig, n: int) -> list[StagePlan]:
    """The registry's stages this config computes, in order, each with the work its ``estimate`` counts.

    Stages without an estimate (ingest, split, promote: cheap next to the rest) are left out of the table.
    """
    from gplflow.flows.local_devices import remote

    count, out = _shard_devices(cfg), []
    for stage in planned(cfg):
        if stage.estimate:
            spread = stage.job is not None and not remote(getattr(cfg, stage.name, None))  # shards over the devices
            out.append(on_devices(replace(stage.estimate(cfg, n), stage=stage.name), count if spread else 1))
    return out


def _shard_devices(cfg: PipelineConfig) -> int:
    """The devices a local run spreads its shards over (1 in pool mode: the pool's workers decide)."""
    from gplflow.flows import local_devices

    if cfg.execution.mode != "local":
        return 1
    try:
        return len(local_devices.devices(cfg.execution.devices))
    except InputError:  # too many for this host: the checks before a run say so
        return 1


def on_devices(plan: StagePlan, count: int) -> StagePlan:
    """A shardable stage whose shards run on ``count`` devices at once: the calibrated (one device's) rate of its
    sharded part times ``count``. A scaling assumed, not measured, and said so."""
    if count < 2 or not plan.work:
        return plan
    sharded = plan.work if plan.sharded is None else plan.sharded
    speedup = plan.work / (plan.work - sharded + sharded / count)
    measure = plan.measure

    def scaled(resolved: dict, passages: list[str]) -> Measured:
        found = measure(resolved, passages)  # type: ignore[misc]
        found = found if isinstance(found, Measured) else Measured(found)
        return found._replace(rate=found.rate * speedup)

    part = "" if plan.sharded is None else " (its sharded part)"
    return replace(plan, measure=None if measure is None else scaled,
                   detail=f"{plan.detail}; shards on {count} devices: one device's rate x{count}{part}, a scaling "
                          "assumed until measured")


def _calibrate(cfg: PipelineConfig, corpus: Artifact, stages: list[StagePlan]) -> None:
    """Measure each stage's rate; a model that cannot be loaded here leaves its stage without an estimate."""
    from gplflow.flows.models import resolve_models

    try:
        resolved = resolve_models(cfg, corpus.store)
    except Exception as err:  # no model, no estimate: said in the table
        for stage in stages:
            stage.note = f"not calibrated: {_first_line(err)}"
        return
    passages = _passage_sample(corpus, max(CALIBRATION_TEXTS, CALIBRATION_STEPS * 3 * cfg.train.batch_size))
    for stage in stages:
        if stage.measure is None:
            stage.note = "not calibrated: the stage has no rate measurement"
            continue
        try:
            with timings() as spreads:
                found = stage.measure(resolved, passages)
            found = found if isinstance(found, Measured) else Measured(found)
            stage.rate, stage.beside, stage.beside_detail = found
            stage.spread = max(spreads) if spreads else None
        except Exception as err:  # the stage keeps its counts; the note says why
            logger.debug("calibrating %s failed", stage.stage, exc_info=True)
            stage.note = f"not calibrated: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def _passage_sample(corpus: Artifact, n: int) -> list[str]:
    from gplflow.adapters.text import passage_texts

    texts = passage_texts(corpus.read_table(["title", "text"]).slice(0, n))
    return [texts[i % len(texts)] for i in range(n)]


def estimated(seconds: float | None, spread: float | None) -> str:
    """``12.5 min ±8%`` (the spread left out when it is not known)."""
    return duration(seconds) + (f" ±{spread:.0%}" if seconds is not None and spread is not None else "")


def duration(seconds: float | None) -> str:
    """``42 s``, ``12.5 min``, ``17.3 h`` (``?`` when unknown)."""
    if seconds is None or math.isnan(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"
