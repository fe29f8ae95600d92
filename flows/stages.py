"""The stage registry: the one list of gplflow's stages, read by the pipeline, the shard flow, the report,
``gplflow status`` and the CLI.

A ``Stage`` says what a step publishes (its artifacts), what it reads, when a run computes it, which Prefect
task does the work (and which shard job, for the shardable ones), and how the task's parameters follow from the
config, the resolved models and the fingerprints published so far (a ``Run``). Adding a stage is its task
module plus one entry in ``STAGES``. Tasks are named by import path, so reading this list (as ``gplflow
status`` does) loads neither torch nor the stage modules.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from gplflow.adapters.store import ArtifactStore

if TYPE_CHECKING:
    from gplflow.flows.config import PipelineConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline. ``task`` and ``job`` are ``"module:attribute"`` (or the objects themselves)."""

    step: str  # what the step is called (ingest, generate, …): the report's "generate → queries"
    makes: tuple[str, ...]  # the artifacts it publishes (folders of the run directory)
    reads: tuple[str, ...]  # the artifacts it consumes
    task: str | Callable[..., Any]  # the Prefect task; returns the fingerprint (or {artifact: fingerprint})
    params: Callable[[Run], dict[str, Any]]  # the task's parameters for this run
    when: Callable[[Run], bool] = lambda run: True  # whether this run computes the stage
    condition: str = ""  # ``when`` in words, for `gplflow status` ("" = every run)
    job: str | Callable[..., Any] | None = None  # shard job (same parameters as the task): pool mode fans it out
    portable: bool = True  # its artifact means the same in another run directory (gplflow compare may adopt it)
    estimate: str | Callable[..., Any] | None = None  # (cfg, passages) -> its work and rate for `gplflow run --plan`

    @property
    def name(self) -> str:
        return self.makes[0]

    def resolve_task(self) -> Any:
        return _resolve(self.task)

    def resolve_estimate(self) -> Any:
        if self.estimate is None:
            raise ValueError(f"stage {self.step!r} has no estimate")
        return _resolve(self.estimate)

    def resolve_job(self) -> Any:
        if self.job is None:
            raise ValueError(f"stage {self.step!r} is not shardable")
        return _resolve(self.job)


def _resolve(ref: str | Callable[..., Any]) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass
class Run:
    """A run as the stages see it: config, run directory, models (resolved on first use) and fingerprints so far."""

    cfg: PipelineConfig
    run_dir: str
    fps: dict[str, str] = field(default_factory=dict)  # artifact -> fingerprint, filled as stages publish
    resolved: dict[str, Any] | None = None
    planning: bool = False  # `gplflow run --plan`: ``fps`` names the artifacts the run will make, none exist yet

    @classmethod
    def from_store(cls, cfg: PipelineConfig, run_dir: str) -> Run:
        """A run whose fingerprints are those of the artifacts already valid in ``run_dir`` (a pool worker's view)."""
        store = ArtifactStore(run_dir)
        fps = {name: found.fingerprint for name in artifact_names() if (found := store.load(name)) is not None}
        return cls(cfg, run_dir, fps)

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.run_dir)

    @property
    def models(self) -> dict[str, Any]:
        """Every model slot as a loadable reference (``tiny`` ones built from the corpus: so only after ingest)."""
        if self.resolved is None:
            from gplflow.flows.models import prepare_models

            self.resolved = prepare_models(self.cfg, self.run_dir)
        return self.resolved

    @property
    def train_queries(self) -> str:
        """The stage whose queries mining, labelling and training may see: queries-train when some are held out."""
        return "queries-train" if "queries-train" in self.fps else "queries"

    @property
    def start(self) -> str:
        """The model training starts from: the pretrain stage's output when pretraining ran, else the base."""
        if "pretrain" in self.fps:
            return str(self.store.require("pretrain").local_dir())
        return self.models["base"]

    @property
    def compared(self) -> dict[str, str]:
        """The models the evaluation compares (and promotion chooses from): base, pretrained if any, adapted."""
        models = {"base": self.models["base"]}
        if self.start != models["base"]:
            models["pretrained"] = self.start
        models["adapted"] = self.store.url("model")
        return models

    @property
    def heldout_fp(self) -> str | None:
        """The held-out queries' fingerprint, when the run has some (a tiny corpus may hold out none)."""
        if "heldout" not in self.fps:
            return None
        if self.planning:
            return self.fps["heldout"]
        found = self.store.load("heldout", expect_fingerprint=self.fps["heldout"])
        return found.fingerprint if found is not None and found.rows else None

    def record(self, stage: Stage, result: str | dict[str, str]) -> None:
        self.fps.update(result if isinstance(result, dict) else {stage.name: result})


def _holds_out(run: Run) -> bool:
    """Queries are held out unless the config turns it off or imported negatives/triples were made from all."""
    from gplflow.tasks.split import active

    if not (run.cfg.uses_queries and active(run.cfg.evaluate)):
        return False
    if imported := next((name for name in ("triples", "negatives") if name in run.fps), None):
        logger.warning("no held-out evaluation: the imported %s were made from every query", imported)
        return False
    return True


def _augments(run: Run) -> bool:
    return run.cfg.flow == "augmented_sbert"


def _teacher(run: Run) -> Any:
    """GPL's teacher, for its agreement on the held-out queries (None when the run has no teacher or none held out)."""
    from gplflow.tasks.evaluators import Teacher

    if not run.cfg.is_gpl or run.heldout_fp is None:
        return None
    label = run.cfg.label
    return Teacher(kind=label.teacher, ref=run.models[run.cfg.teacher_slot], max_seq_length=label.max_seq_length,
                   batch_size=label.batch_size, normalize=label.bi_encoder_score == "cos_sim",
                   candidates=run.cfg.mine.negatives_per_query)


def _evaluated(run: Run) -> bool:
    e = run.cfg.evaluate
    return bool(e.qrels) or any(x is not None for x in (e.sts, e.clustering, e.mteb)) or run.heldout_fp is not None


STAGES: list[Stage] = [
    Stage("ingest", ("corpus",), (), "gplflow.tasks.ingest:ingest_task",
          params=lambda run: {"cfg": run.cfg.corpus, "run_dir": run.run_dir}),
    Stage("read pairs", ("pairs",), (), "gplflow.tasks.pairs:pairs_task",
          params=lambda run: {"cfg": run.cfg.pairs, "run_dir": run.run_dir},
          when=lambda run: run.cfg.trains_on_pairs, condition="the flow is supervised or augmented_sbert"),
    Stage("pretrain", ("pretrain",), ("corpus",), "gplflow.tasks.pretrain:pretrain_task",
          estimate="gplflow.flows.plan:pretrain_estimate",
          params=lambda run: {"cfg": run.cfg.pretrain, "run_dir": run.run_dir, "corpus_fp": run.fps["corpus"],
                              "base_model": run.models["base"]},
          when=lambda run: run.cfg.pretrain.method != "none", condition="pretrain.method is not none"),
    Stage("train cross-encoder", ("cross-encoder",), ("pairs",), "gplflow.tasks.augment:cross_encoder_task",
          estimate="gplflow.flows.plan:cross_encoder_estimate",
          params=lambda run: {"cfg": run.cfg.augment, "run_dir": run.run_dir, "start": run.models["cross_encoder"],
                              "pairs_fp": run.fps["pairs"]},
          when=_augments, condition="the flow is augmented_sbert"),
    Stage("sample pairs", ("silver-candidates",), ("corpus", "pairs"), "gplflow.tasks.augment:sample_task",
          estimate="gplflow.flows.plan:sample_estimate",
          params=lambda run: {"cfg": run.cfg.augment, "run_dir": run.run_dir, "corpus_fp": run.fps["corpus"],
                              "pairs_fp": run.fps["pairs"], "bi_encoder": run.start},
          when=_augments, condition="the flow is augmented_sbert"),
    Stage("label silver", ("silver",), ("silver-candidates", "cross-encoder"), "gplflow.tasks.augment:silver_task",
          estimate="gplflow.flows.plan:silver_estimate",
          params=lambda run: {"cfg": run.cfg.augment, "run_dir": run.run_dir,
                              "candidates_fp": run.fps["silver-candidates"],
                              "cross_encoder_fp": run.fps["cross-encoder"]},
          when=_augments, condition="the flow is augmented_sbert"),
    Stage("generate", ("queries",), ("corpus",), "gplflow.tasks.generate:generate_task",
          job="gplflow.tasks.generate:generate_job", estimate="gplflow.flows.plan:generate_estimate",
          params=lambda run: {"cfg": run.cfg.generate, "run_dir": run.run_dir, "corpus_fp": run.fps["corpus"],
                              "generator": run.models["generator"] if run.cfg.generate.method == "t5" else "",
                              "shard_size": run.cfg.execution.shard_size},
          when=lambda run: run.cfg.uses_queries, condition="the flow is gpl or genq"),
    Stage("split", ("heldout", "queries-train"), ("queries",), "gplflow.tasks.split:split_task",
          params=lambda run: {"cfg": run.cfg.evaluate, "run_dir": run.run_dir, "queries_fp": run.fps["queries"]},
          when=_holds_out, condition="evaluate.heldout_fraction > 0"),
    Stage("mine", ("negatives",), ("corpus", "queries-train"), "gplflow.tasks.mine:mine_task",
          job="gplflow.tasks.mine:mine_job", estimate="gplflow.flows.plan:mine_estimate",
          params=lambda run: {"cfg": run.cfg.mine, "run_dir": run.run_dir, "corpus_fp": run.fps["corpus"],
                              "queries_fp": run.fps[run.train_queries], "retrievers": run.models["retrievers"],
                              "shard_size": run.cfg.execution.shard_size},
          when=lambda run: run.cfg.is_gpl and "triples" not in run.fps, condition="the flow is gpl (margin_mse)"),
    Stage("label", ("triples",), ("corpus", "queries-train", "negatives"), "gplflow.tasks.label:label_task",
          job="gplflow.tasks.label:label_job", estimate="gplflow.flows.plan:label_estimate",
          params=lambda run: {"cfg": run.cfg.label, "run_dir": run.run_dir, "n_triples": run.cfg.n_triples,
                              "corpus_fp": run.fps["corpus"], "queries_fp": run.fps[run.train_queries],
                              "negatives_fp": run.fps["negatives"], "teacher": run.models[run.cfg.teacher_slot],
                              "queries_stage": run.train_queries, "shard_size": run.cfg.execution.shard_size},
          when=lambda run: run.cfg.is_gpl, condition="the flow is gpl (margin_mse)"),
    Stage("train", ("model",), ("corpus", "queries-train", "triples"), "gplflow.tasks.train:train_task",
          estimate="gplflow.flows.plan:train_estimate",
          params=lambda run: {"cfg": run.cfg.train, "run_dir": run.run_dir, "base_model": run.start,
                              "corpus_fp": run.fps["corpus"], "queries_fp": run.fps[run.train_queries],
                              "triples_fp": run.fps["triples"] if run.cfg.is_gpl else None},
          when=lambda run: run.cfg.uses_queries),
    Stage("train on pairs", ("model",), ("pairs",), "gplflow.tasks.train:train_pairs_task",
          estimate="gplflow.flows.plan:train_estimate",
          params=lambda run: {"cfg": run.cfg.train, "run_dir": run.run_dir, "base_model": run.start,
                              "pairs_fp": run.fps["pairs"]},
          when=lambda run: run.cfg.flow == "supervised"),
    Stage("train on gold + silver", ("model",), ("pairs", "silver"), "gplflow.tasks.train:train_pairs_task",
          estimate="gplflow.flows.plan:train_estimate",
          params=lambda run: {"cfg": run.cfg.train, "run_dir": run.run_dir, "base_model": run.start,
                              "pairs_fp": run.fps["pairs"], "silver_fp": run.fps["silver"]},
          when=_augments),
    Stage("evaluate", ("evaluate",), ("corpus", "heldout", "model"), "gplflow.tasks.evaluate:evaluate_task",
          estimate="gplflow.flows.plan:evaluate_estimate",
          params=lambda run: {"cfg": run.cfg.evaluate, "run_dir": run.run_dir, "corpus_fp": run.fps["corpus"],
                              "models": run.compared, "adapted_fp": run.fps["model"], "heldout_fp": run.heldout_fp,
                              "teacher": _teacher(run)},
          when=_evaluated,
          condition="evaluate.qrels, .sts, .clustering or .mteb is set, or queries are held out "
                    "(evaluate.heldout_fraction > 0)", portable=False),  # names its run's model folders
    Stage("promote", ("promoted",), ("model", "evaluate"), "gplflow.tasks.promote:promote_task",
          params=lambda run: {"rule": run.cfg.evaluate.promote, "min_gain": run.cfg.evaluate.min_gain,
                              "run_dir": run.run_dir, "models": run.compared, "model_fp": run.fps["model"],
                              "evaluate_fp": run.fps.get("evaluate")},
          portable=False),  # points at its run's model/
]


def artifact_names() -> list[str]:
    """Every artifact a run directory can hold, in pipeline order."""
    return list(dict.fromkeys(name for stage in STAGES for name in stage.makes))


def made_by(name: str) -> str:
    """The step that publishes artifact ``name`` (``queries`` → ``generate``)."""
    return next(stage.step for stage in STAGES if name in stage.makes)


def condition(name: str) -> str:
    """When a run computes artifact ``name``, in words ("" when every run does)."""
    found = [stage.condition for stage in STAGES if name in stage.makes]
    return "" if "" in found else " or ".join(found)


def shardable() -> dict[str, Stage]:
    """The stages a worker pool computes shard by shard, by step name."""
    return {stage.step: stage for stage in STAGES if stage.job is not None}


def shard_stage(name: str) -> Stage:
    """A shardable stage by its step (``generate``) or artifact name (``queries``)."""
    for stage in STAGES:
        if stage.job is not None and name in (stage.step, *stage.makes):
            return stage
    raise ValueError(f"stage {name!r} is not shardable; expected one of {', '.join(shardable())}")
