"""The stage registry: the one list of gplflow's stages, read by the pipeline, the shard flow, the report,
``gplflow status``, ``gplflow run --plan``, the checks before a run and the CLI.

A ``Stage`` holds objects, not names: its Prefect task, its shard job, its estimate, its report row and the
models it loads all live in the stage's own module (``tasks/<stage>.py``), and the entry says how the stage's
typed inputs follow from a ``Run`` (the config, the resolved models and the fingerprints published so far) and
when a run computes it. Adding a stage is its module plus one entry here (see the README, "Adding a stage").
Stage modules keep torch out of their imports, so reading this list (as ``gplflow status`` does) stays cheap.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from gplflow.adapters import artifacts
from gplflow.adapters.store import ArtifactStore
from gplflow.tasks import augment, evaluate, generate, ingest, label, mine, pairs, pretrain, promote, split, train
from gplflow.tasks import filter as query_filter  # the stage module tasks/filter.py, not the builtin
from gplflow.tasks.base import ModelUse, Ref, ShardJob, StageConfig, StageInputs
from gplflow.tasks.evaluators import Teacher

logger = logging.getLogger(__name__)


# --- conditions: when a run computes a stage, as a test and in words, from one definition ---------------------

@dataclass(frozen=True)
class When:
    """A condition on a run; ``text`` says it in words (``gplflow status``: "compute, if <text>")."""

    test: Callable[[Run], bool]
    text: str = ""  # "" = every run

    def __call__(self, run: Run) -> bool:
        return self.test(run)

    def __and__(self, other: When) -> When:
        return When(lambda run: self(run) and other(run), " and ".join(filter(None, (self.text, other.text))))

    def __or__(self, other: When) -> When:
        return When(lambda run: self(run) or other(run), f"{self.text} or {other.text}")


def setting(key: str, op: str, value: Any) -> When:
    """``setting("pretrain.method", "!=", "none")``: a config value compared, said as "pretrain.method is not none"."""
    compare, words = {"==": (operator.eq, "is"), "!=": (operator.ne, "is not"), ">": (operator.gt, ">")}[op]

    return When(lambda run: compare(run.cfg.value(key), value), f"{key} {words} {value}")


def flow_in(*flows: str) -> When:
    return When(lambda run: run.cfg.flow in flows, f"the flow is {' or '.join(flows)}")


ALWAYS = When(lambda run: True)
USES_QUERIES = flow_in("gpl", "genq")
GPL = flow_in("gpl") & When(lambda run: run.cfg.is_gpl, "train.loss is margin_mse, kl or kl+margin_mse")
AUGMENTS = flow_in("augmented_sbert")


def _holds_out(run: Run) -> bool:
    """Queries are held out unless the config turns it off or imported negatives/triples were made from all."""
    if not (run.cfg.uses_queries and split.active(run.cfg.evaluate)):
        return False
    if imported := next((name for name in (artifacts.TRIPLES, artifacts.NEGATIVES) if name in run.fps), None):
        logger.warning("no held-out evaluation: the imported %s were made from every query", imported)
        return False
    return True


HOLDS_OUT = When(_holds_out, "evaluate.heldout_fraction > 0 and evaluate.heldout_max > 0 (and no imported "
                             "negatives or triples)")
FILTERS = When(lambda run: query_filter.active(run.cfg.section(query_filter.SECTION)),
               f"any of filter.{', .'.join(query_filter.RULE_KEYS)} is on") \
    & When(lambda run: not {artifacts.NEGATIVES, artifacts.TRIPLES} & run.fps.keys(),
           "no imported negatives or triples")
EVALUATED = When(lambda run: bool(run.cfg.evaluate.qrels) or run.heldout is not None
                 or any(x is not None for x in (run.cfg.evaluate.sts, run.cfg.evaluate.clustering,
                                                run.cfg.evaluate.mteb)),
                 "evaluate.qrels, .sts, .clustering or .mteb is set, or queries are held out")


# --- the stage and the run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, and everything the rest of gplflow asks of it."""

    name: str  # the stage's one name in code, the shard flow's parameter and the plan's rows: "label"
    makes: tuple[str, ...]  # the artifacts it publishes (folders of the run directory): ("triples",)
    task: Callable[..., Any]  # the Prefect task: called with the inputs, returns the fingerprint (or a dict)
    inputs: Callable[[Run], StageInputs]  # the stage's typed inputs for this run: built here and nowhere else
    when: When = ALWAYS
    job: type[ShardJob] | None = None  # built from the inputs: pool mode fans its shards out
    estimate: Callable[[Any, int], Any] | None = None  # (config, passages) -> its work for `gplflow run --plan`
    settings: Callable[[Any], str] | None = None  # (config) -> the report's line on its settings
    models: Callable[[Any], list[ModelUse]] | None = None  # (config) -> the models it loads
    section: tuple[str, type[StageConfig]] | None = None  # a config section of its own, by key
    portable: bool = True  # its artifact means the same in another run directory (gplflow compare may adopt it)


@dataclass
class Run:
    """A run as the stages see it: config, run directory, models (resolved on first use) and fingerprints so far."""

    cfg: Any  # a PipelineConfig (flows/config.py, which composes its sections from this registry)
    run_dir: str
    fps: dict[str, str] = field(default_factory=dict)  # artifact -> fingerprint, filled as stages publish
    resolved: Mapping[str, Any] | None = None
    planning: bool = False  # `gplflow run --plan`: ``fps`` names the artifacts the run will make, none exist yet

    @classmethod
    def from_store(cls, cfg: Any, run_dir: str) -> Run:
        """A run whose fingerprints are those of the artifacts already valid in ``run_dir`` (a pool worker's view).
        Its models are resolved slot by slot as the stage reads them, and not logged: the pipeline logged them."""
        from gplflow.flows.models import ModelSlots

        store = ArtifactStore(run_dir)
        fps = {name: found.fingerprint for name in artifact_names() if (found := store.load(name)) is not None}
        return cls(cfg, run_dir, fps, resolved=ModelSlots(cfg, store))

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.run_dir)

    def ref(self, name: str) -> Ref:
        """An artifact this run published, as a stage's input; a worker missing it gets a clear error."""
        if name not in self.fps:
            raise KeyError(name)
        return Ref(name, self.fps[name])

    @property
    def models(self) -> Mapping[str, Any]:
        """Every model slot as a loadable reference (``tiny`` ones built from the corpus: so only after ingest)."""
        if self.resolved is None:
            from gplflow.flows.models import prepare_models

            self.resolved = prepare_models(self.cfg, self.run_dir)
        return self.resolved

    @property
    def train_queries(self) -> Ref:
        """The queries mining, labelling and training see: the filter's output when the config filters and it was
        published, else queries-train when some are held out, else all."""
        if artifacts.QUERIES_FILTERED in self.fps and query_filter.active(self.cfg.section(query_filter.SECTION)):
            return self.ref(artifacts.QUERIES_FILTERED)
        return self.unfiltered_queries

    @property
    def unfiltered_queries(self) -> Ref:
        """The training queries as split (the filter's input): queries-train when some are held out, else all."""
        return self.ref(artifacts.QUERIES_TRAIN if artifacts.QUERIES_TRAIN in self.fps else artifacts.QUERIES)

    @property
    def start(self) -> str:
        """The model training starts from: the pretrain stage's output when pretraining ran, else the base."""
        if artifacts.PRETRAIN in self.fps:
            return str(self.store.require(artifacts.PRETRAIN).local_dir())
        return self.models["base"]

    @property
    def compared(self) -> dict[str, str]:
        """The models the evaluation compares (and promotion chooses from): base, pretrained if any, adapted."""
        models = {"base": self.models["base"]}
        if self.start != models["base"]:
            models["pretrained"] = self.start
        models["adapted"] = self.store.url(artifacts.MODEL)
        return models

    @property
    def heldout(self) -> Ref | None:
        """The held-out queries, when the run has some (a tiny corpus may hold out none)."""
        if artifacts.HELDOUT not in self.fps:
            return None
        if self.planning:
            return self.ref(artifacts.HELDOUT)
        found = self.store.load(artifacts.HELDOUT, expect_fingerprint=self.fps[artifacts.HELDOUT])
        return Ref(artifacts.HELDOUT, found.fingerprint) if found is not None and found.rows else None

    def record(self, stage: Stage, result: str | dict[str, str]) -> None:
        self.fps.update(result if isinstance(result, dict) else {stage.makes[0]: result})


def _teacher(run: Run) -> Teacher | None:
    """GPL's teacher, for its agreement on the held-out queries (None when the run has no teacher or none held out)."""
    if not run.cfg.is_gpl or run.heldout is None:
        return None
    return Teacher.of(run.cfg, run.models, candidates=run.cfg.mine.negatives_per_query)


def _filter_inputs(run: Run) -> query_filter.FilterInputs:
    cfg = run.cfg
    rules = cfg.section(query_filter.SECTION)
    return query_filter.FilterInputs(
        run_dir=run.run_dir, cfg=rules, corpus=run.ref(artifacts.CORPUS), queries=run.unfiltered_queries,
        retriever=query_filter.encoder(cfg, run.models) if rules.round_trip_k is not None else None,
        teacher=query_filter.teacher(cfg, run.models) if rules.teacher_fraction is not None else None)


def _teacher_scores(run: Run) -> Ref | None:
    """The filter's teacher scores of (query, source passage), when it scored them: labelling does not rescore."""
    if run.train_queries.name != artifacts.QUERIES_FILTERED:
        return None
    return run.train_queries if run.cfg.section(query_filter.SECTION).teacher_fraction is not None else None


def _rounds(run: Run) -> train.Rounds | None:
    """What re-mining rounds (train.remine_every) mine and label with: the mine and label settings and teacher."""
    cfg = run.cfg
    if not (cfg.is_gpl and cfg.train.remine_every):
        return None
    return train.Rounds(mine=cfg.mine, label=cfg.label, teacher=run.models[cfg.teacher_slot],
                        negatives=run.ref(artifacts.NEGATIVES), shard_size=_shards(run))


def _shards(run: Run) -> int:
    return run.cfg.execution.shard_size


STAGES: list[Stage] = [
    Stage("ingest", (artifacts.CORPUS,), ingest.ingest_task, settings=ingest.settings,
          inputs=lambda run: ingest.IngestInputs(run_dir=run.run_dir, cfg=run.cfg.corpus)),
    Stage("pairs", (artifacts.PAIRS,), pairs.pairs_task, when=flow_in("supervised", "augmented_sbert"),
          settings=pairs.settings,
          inputs=lambda run: pairs.PairsInputs(run_dir=run.run_dir, cfg=run.cfg.pairs)),
    Stage("pretrain", (artifacts.PRETRAIN,), pretrain.pretrain_task, when=setting("pretrain.method", "!=", "none"),
          estimate=pretrain.estimate, settings=pretrain.settings,
          inputs=lambda run: pretrain.PretrainInputs(run_dir=run.run_dir, cfg=run.cfg.pretrain,
                                                     corpus=run.ref(artifacts.CORPUS),
                                                     base_model=run.models["base"])),
    Stage("cross-encoder", (artifacts.CROSS_ENCODER,), augment.cross_encoder_task, when=AUGMENTS,
          estimate=augment.cross_encoder_estimate, settings=augment.settings, models=augment.models_used,
          inputs=lambda run: augment.CrossEncoderInputs(run_dir=run.run_dir, cfg=run.cfg.augment,
                                                        start=run.models["cross_encoder"],
                                                        pairs=run.ref(artifacts.PAIRS))),
    Stage("sample", (artifacts.SILVER_CANDIDATES,), augment.sample_task, when=AUGMENTS,
          estimate=augment.sample_estimate,
          inputs=lambda run: augment.SampleInputs(run_dir=run.run_dir, cfg=run.cfg.augment,
                                                  corpus=run.ref(artifacts.CORPUS), pairs=run.ref(artifacts.PAIRS),
                                                  bi_encoder=run.start)),
    Stage("silver", (artifacts.SILVER,), augment.silver_task, when=AUGMENTS, estimate=augment.silver_estimate,
          inputs=lambda run: augment.SilverInputs(run_dir=run.run_dir, cfg=run.cfg.augment,
                                                  candidates=run.ref(artifacts.SILVER_CANDIDATES),
                                                  cross_encoder=run.ref(artifacts.CROSS_ENCODER))),
    Stage("generate", (artifacts.QUERIES,), generate.generate_task, when=USES_QUERIES, job=generate.GenerateJob,
          estimate=generate.estimate, settings=generate.settings, models=generate.models_used,
          inputs=lambda run: generate.GenerateInputs(
              run_dir=run.run_dir, cfg=run.cfg.generate, corpus=run.ref(artifacts.CORPUS), shard_size=_shards(run),
              generator=run.models["generator"] if generate.models_used(run.cfg) else "")),
    Stage("split", (artifacts.HELDOUT, artifacts.QUERIES_TRAIN), split.split_task, when=HOLDS_OUT,
          inputs=lambda run: split.SplitInputs(run_dir=run.run_dir, cfg=run.cfg.evaluate,
                                               queries=run.ref(artifacts.QUERIES))),
    Stage("filter", (artifacts.QUERIES_FILTERED,), query_filter.filter_task, when=USES_QUERIES & FILTERS,
          section=(query_filter.SECTION, query_filter.FilterConfig), estimate=query_filter.estimate,
          settings=query_filter.settings, models=query_filter.models_used, inputs=_filter_inputs),
    Stage("mine", (artifacts.NEGATIVES,), mine.mine_task, job=mine.MineJob, estimate=mine.estimate,
          when=GPL & When(lambda run: artifacts.TRIPLES not in run.fps), settings=mine.settings,
          models=mine.models_used,
          inputs=lambda run: mine.MineInputs(run_dir=run.run_dir, cfg=run.cfg.mine, corpus=run.ref(artifacts.CORPUS),
                                             queries=run.train_queries, retrievers=run.models["retrievers"],
                                             shard_size=_shards(run))),
    Stage("label", (artifacts.TRIPLES,), label.label_task, when=GPL, job=label.LabelJob, estimate=label.estimate,
          settings=label.settings, models=label.models_used,
          inputs=lambda run: label.LabelInputs(
              run_dir=run.run_dir, cfg=run.cfg.label, triples=run.cfg.n_triples, corpus=run.ref(artifacts.CORPUS),
              queries=run.train_queries, negatives=run.ref(artifacts.NEGATIVES),
              teacher=run.models[run.cfg.teacher_slot], shard_size=_shards(run),
              teacher_scores=_teacher_scores(run))),
    Stage("train", (artifacts.MODEL,), train.train_task, when=USES_QUERIES, estimate=train.estimate,
          settings=train.settings,
          inputs=lambda run: train.TrainInputs(
              run_dir=run.run_dir, cfg=run.cfg.train, base_model=run.start, corpus=run.ref(artifacts.CORPUS),
              queries=run.train_queries, triples=run.ref(artifacts.TRIPLES) if run.cfg.is_gpl else None,
              rounds=_rounds(run))),
    Stage("train-pairs", (artifacts.MODEL,), train.train_pairs_task, when=flow_in("supervised"),
          estimate=train.estimate, settings=train.settings,
          inputs=lambda run: train.TrainPairsInputs(run_dir=run.run_dir, cfg=run.cfg.train, base_model=run.start,
                                                    pairs=run.ref(artifacts.PAIRS))),
    Stage("train-gold-silver", (artifacts.MODEL,), train.train_pairs_task, when=AUGMENTS,
          estimate=train.estimate, settings=train.settings,
          inputs=lambda run: train.TrainPairsInputs(run_dir=run.run_dir, cfg=run.cfg.train, base_model=run.start,
                                                    pairs=run.ref(artifacts.PAIRS),
                                                    silver=run.ref(artifacts.SILVER))),
    Stage("evaluate", (artifacts.EVALUATE,), evaluate.evaluate_task, when=EVALUATED, estimate=evaluate.estimate,
          settings=evaluate.settings,
          inputs=lambda run: evaluate.EvaluateInputs(
              run_dir=run.run_dir, cfg=run.cfg.evaluate, corpus=run.ref(artifacts.CORPUS), models=run.compared,
              adapted_fp=run.fps[artifacts.MODEL], heldout=run.heldout, teacher=_teacher(run)),
          portable=False),  # names its run's model folders
    Stage("promote", (artifacts.PROMOTED,), promote.promote_task,
          inputs=lambda run: promote.PromoteInputs(
              run_dir=run.run_dir, rule=run.cfg.evaluate.promote, min_gain=run.cfg.evaluate.min_gain,
              models=run.compared, model=run.ref(artifacts.MODEL),
              evaluate=run.ref(artifacts.EVALUATE) if artifacts.EVALUATE in run.fps else None),
          portable=False),  # points at its run's model/
]


# --- what the rest of gplflow asks of the registry ---------------------------------------------------------

def artifact_names() -> list[str]:
    """Every artifact a run directory can hold, in pipeline order."""
    return list(dict.fromkeys(name for stage in STAGES for name in stage.makes))


def made_by(name: str) -> str:
    """The stage that publishes artifact ``name`` (``queries`` → ``generate``; ``model`` → ``train``)."""
    return next(stage.name for stage in STAGES if name in stage.makes)


def condition(name: str) -> str:
    """When a run computes artifact ``name``, in words ("" when every run does)."""
    found = [stage.when.text for stage in STAGES if name in stage.makes]
    return "" if "" in found else " or ".join(dict.fromkeys(found))


def shardable() -> dict[str, Stage]:
    """The stages a worker pool computes shard by shard, by name."""
    return {stage.name: stage for stage in STAGES if stage.job is not None}


def shard_stage(name: str) -> Stage:
    """A shardable stage by its name (``label``)."""
    if (found := shardable().get(name)) is None:
        raise ValueError(f"stage {name!r} is not shardable; expected one of {', '.join(shardable())}")
    return found


def sections() -> dict[str, type[StageConfig]]:
    """The config sections stages declare of their own, by key (flows/config.py composes them)."""
    return dict(stage.section for stage in STAGES if stage.section is not None)


def planned(cfg: Any) -> list[Stage]:
    """The stages a run of ``cfg`` computes, in order, decided by each stage's own ``when`` on a run whose
    artifacts are all still to come (imports aside: what an import brings is only known once read)."""
    run = Run(cfg, "", planning=True)
    out = []
    for stage in STAGES:
        if stage.when(run):
            run.fps.update(dict.fromkeys(stage.makes, "planned"))
            out.append(stage)
    return out


def models_used(cfg: Any) -> list[ModelUse]:
    """Every model a run of ``cfg`` loads, stage by stage, then the base (a gpl import brings the rest: base only).
    A model two stages load is listed by each (its roles differ)."""
    base = ModelUse("models.base", cfg.models.base, base_role(cfg), "base")
    if cfg.import_.gpl_dir:
        return [base]
    return [*(use for stage in planned(cfg) if stage.models is not None for use in stage.models(cfg)), base]


def base_role(cfg: Any) -> str:
    layers = cfg.models.base_layers
    return f"base (student{f', its first {layers} layer' + ('s' if layers > 1 else '') if layers else ''})"
