"""What every stage shares: the frozen config base, the typed inputs object and its fingerprint, the
artifact-checked cache policy, the decorator of stage tasks, and the shard job of the shardable stages (generate,
mine, label).

The contract of a stage (``tasks/<stage>.py``): a frozen config (``StageConfig``), one ``StageInputs`` subclass
naming everything the stage reads (its config, the fingerprints of its input artifacts as ``Ref``s, resolved model
references, sizes), a plain function taking those inputs, and a ``@stage_task`` of a few lines around it. The
fingerprint, the Prefect cache key, the shard job and the plan all take the same inputs object, so no parameter
list is written twice. The registry (``flows/stages.py``) builds the inputs from a run, in one place.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from prefect.cache_policies import CachePolicy
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from gplflow.adapters.disk import is_no_space
from gplflow.adapters.errors import GplflowError, InputError
from gplflow.adapters.staging import ShardStaging
from gplflow.adapters.store import Artifact, ArtifactStore, Ref, canonical_json, fingerprint

logger = logging.getLogger(__name__)

Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what numpy's legacy seeding (transformers' set_seed) accepts


def _auto_or_positive(value: int | str, info: ValidationInfo) -> int | str:
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{info.field_name} must be 'auto' or an integer >= 1, got {value}")
    return value


AutoOrPositive = Annotated[int | Literal["auto"], AfterValidator(_auto_or_positive)]  # a count, or 'auto'
Progress = Callable[[int], Any]  # told how many more units of a stage's work are done (see tasks/progress.py)


def _wants_number(annotation: Any) -> bool:
    """Whether a field takes an int or a float and never a bool (``int``, ``float | None``, ``int | 'auto'``)."""
    if typing.get_origin(annotation) is Annotated:
        return _wants_number(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        return bool not in members and any(_wants_number(m) for m in members)
    return annotation in (int, float)


class NoBoolNumbers(BaseModel):
    """Settings whose numbers are numbers: ``steps: true`` is an error, not 1 (pydantic's lax mode would take it)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and _wants_number(field.annotation):
            raise ValueError(f"got {value!r}, expected a number (a true/false value is not read as 1/0)")
        return value


class StageConfig(NoBoolNumbers):
    """A stage's settings: frozen, and unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


def stage_fingerprint(stage: str, cfg: BaseModel | Mapping[str, Any], inputs: Mapping[str, str], code: str) -> str:
    config = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg)
    return fingerprint(stage, config, inputs, code)


class ModelUse(NamedTuple):
    """A model a stage loads: its config key, the reference as configured, its role in words, and its slot among
    the resolved models (``generator``, ``retrievers.0``, ``cross_encoder``…) for what it resolved to."""

    key: str
    ref: str
    role: str
    slot: str

    def resolved(self, models: dict[str, Any]) -> str:
        """What the slot resolved to (a retriever's model path for ``retrievers.<i>``), or ""."""
        name, _, index = self.slot.partition(".")
        found = models.get(name, "")
        if index:
            found = found[int(index)][0] if int(index) < len(found) else ""
        return str(found)


class StageInputs(BaseModel):
    """Everything a stage computes from, as one frozen, typed object (a Prefect task's one parameter).

    Subclasses declare ``artifact`` (what the stage publishes), ``code_version`` and their fields, and say how
    the fields become the fingerprint (``fingerprint_parts``: the config part and the inputs part, as recorded in
    the manifest). ``fingerprints()`` is what the cache, the pipeline's adoption and the shard job key on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    artifact: ClassVar[str]
    code_version: ClassVar[str]
    run_dir: str

    def __init_subclass__(cls, artifact: str | None = None, code_version: str | None = None, **kwargs: Any):
        """``class LabelInputs(StageInputs, artifact="triples", code_version="label-1")``."""
        super().__init_subclass__(**kwargs)
        if artifact is not None:
            cls.artifact = artifact
        if code_version is not None:
            cls.code_version = code_version

    def fingerprint_parts(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(config, inputs) of the manifest: by default the ``cfg`` field and every ``Ref`` field."""
        config = self.cfg.model_dump(mode="json")  # type: ignore[attr-defined]
        refs = {name: value.fingerprint for name, value in self if isinstance(value, Ref)}
        return config, refs

    @cached_property
    def _fingerprint(self) -> str:
        config, inputs = self.fingerprint_parts()
        return stage_fingerprint(self.artifact, config, inputs, self.code_version)

    def fingerprint(self) -> str:
        return self._fingerprint

    def fingerprints(self) -> dict[str, str]:
        """{artifact: fingerprint} of what the stage publishes (a stage making several overrides this)."""
        return {self.artifact: self.fingerprint()}

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.run_dir)

    def load(self, ref: Ref) -> Artifact:
        """An input artifact, verified before it is read; a clear error when it is not there."""
        return self.store.input(ref.name, ref.fingerprint)

    def reuse(self) -> Artifact | None:
        """The stage's artifact when one made from exactly these inputs is published and valid."""
        return reuse(self.store, self.artifact, self.fingerprint())


def reuse(store: ArtifactStore, stage: str, fp: str) -> Artifact | None:
    """The stage's published artifact if it was made from exactly these inputs and still validates."""
    artifact = store.load(stage, expect_fingerprint=fp)
    if artifact is not None:
        logger.info("%s: reusing %s (fingerprint %s)", stage, artifact.url, fp)
    return artifact


@dataclass
class StageCache(CachePolicy):
    """Prefect's cache for a stage task, keyed on the stage fingerprint and trusted only as far as the store.

    The task's one parameter, ``inputs`` (a ``StageInputs``), gives {artifact: fingerprint}. The artifact store
    decides reuse: while the artifacts validate, the task's cache record (if any) is read and the run shows as
    Cached in the UI; when one is gone or damaged and a record exists, no key is given, so the task computes again
    instead of handing back a path to nothing. That record becomes right again once the artifact is republished
    (same fingerprint, same value).
    """

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        stage: StageInputs = inputs["inputs"]
        found = stage.fingerprints()
        key = "gplflow-" + "-".join(f"{name}-{fp}" for name, fp in found.items())
        if all(stage.store.load(name, expect_fingerprint=fp) is not None for name, fp in found.items()):
            return key
        return None if task_ctx.result_store.exists(key) else key


def stage_task(name: str, retries: int = 0, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """The Prefect task of a stage: one ``inputs`` parameter, cached on its fingerprint, results persisted (so a
    rerun shows what it reused), user errors not retried. ``retries`` are for crashes a second try gets past."""
    from prefect import task

    return task(name=name, task_run_name=options.pop("task_run_name", name), retries=retries, persist_result=True,
                retry_condition_fn=retry_unless_deterministic, cache_policy=StageCache(), **options)


def retry_unless_deterministic(_task: Any, _task_run: Any, state: Any) -> bool:
    """A Prefect ``retry_condition_fn``: a user error (bad input, a full disk) fails the same way after the same
    work, so it is not retried (a stage's ``retries`` are for crashes a second try can get past)."""
    error = getattr(state, "data", None)
    return not (isinstance(error, BaseException) and (isinstance(error, GplflowError) or is_no_space(error)))


class ShardJob(ABC):
    """A shardable stage cut into ``n_shards`` shards, staged in ``staging`` until all are done.

    ``run_shard(k)`` computes and stages shard k (any process, any machine sharing the run directory);
    ``publish()`` turns the staged shards into the stage's artifact once all are done. ``run()`` does both,
    skipping the shards a killed run already finished, and reports progress in units of ``work``.
    """

    _on_progress: Progress | None = None

    def __init__(self, inputs: StageInputs, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"{inputs.artifact}: shard_size must be >= 1, got {shard_size}")
        self.inputs, self.shard_size = inputs, shard_size
        self.stage, self.store, self.fingerprint = inputs.artifact, inputs.store, inputs.fingerprint()
        self.config, self.input_fps = inputs.fingerprint_parts()
        self.staging = ShardStaging(self.store, self.stage, self.fingerprint)

    @property
    @abstractmethod
    def n_shards(self) -> int: ...

    @property
    @abstractmethod
    def work(self) -> int:
        """The stage's work in the units its progress counts (passages, pairs, texts encoded)."""

    @abstractmethod
    def shard_work(self, k: int) -> int:
        """The part of ``work`` shard k does (counted as done when a rerun skips the shard)."""

    @abstractmethod
    def plan(self) -> dict[str, Any]:
        """What decides how the stage is cut and what each shard holds (``n_shards`` and the shard size)."""

    @abstractmethod
    def run_shard(self, k: int) -> dict[str, Any]:
        """Compute and stage shard k; returns its done record."""

    @abstractmethod
    def publish(self) -> Artifact:
        """Publish the staged shards as the stage's artifact and remove the staging folder."""

    def prepare(self) -> list[int]:
        """Write (or keep) the staging plan; returns the shards still to compute."""
        return self.staging.prepare(self.plan())

    def run(self, on_progress: Progress | None = None) -> Artifact:
        self._on_progress = on_progress
        pending = self.prepare()
        self.advance(sum(self.shard_work(k) for k in sorted(set(range(self.n_shards)) - set(pending))))
        for k in pending:
            self.run_shard(k)
        return self.publish()

    def result(self, on_progress: Progress | None = None) -> Artifact:
        """The stage's artifact: reused while one made from exactly this job's inputs validates, else ``run``."""
        found = reuse(self.store, self.stage, self.fingerprint)
        return found if found is not None else self.run(on_progress)

    def run_reported(self, key: str, description: str) -> Artifact:
        """The stage's artifact: reused while it validates, else computed under a Prefect progress artifact."""
        from gplflow.tasks.progress import ProgressArtifact

        artifact = reuse(self.store, self.stage, self.fingerprint)
        if artifact is None:
            progress = ProgressArtifact.start(key, self.work, description)
            artifact = self.run(progress.advance)
            progress.finish()
        return artifact

    def advance(self, n: int) -> None:
        """Tell ``run``'s progress callback, if any, that ``n`` more units of work are done."""
        if self._on_progress is not None and n:
            self._on_progress(n)

    def check_shard(self, k: int) -> None:
        """Shard k exists and the staging folder was prepared with this job's plan (by the flow that fans out)."""
        if not 0 <= k < self.n_shards:
            raise InputError(f"{self.stage}: shard {k} does not exist; the stage has {self.n_shards} shards "
                             f"(0 to {self.n_shards - 1})")
        found = self.staging.read_plan()
        if found is None or canonical_json(found) != canonical_json(
                {**self.plan(), "stage": self.stage, "fingerprint": self.fingerprint}):
            raise InputError(f"{self.staging.url}: no staging plan matching this process's config and inputs "
                             f"(fingerprint {self.fingerprint}); the worker and the flow that fanned out the "
                             "shards must see the same config file, overrides, models and run directory")

    def done_records(self) -> list[dict[str, Any]]:
        """Every shard's done record in shard order; an error naming the missing shards if any is not done."""
        records = self.staging.records(self.n_shards, check="consume")  # about to be published: hashed
        missing = [k for k in range(self.n_shards) if k not in records]
        if missing:
            raise RuntimeError(f"{self.stage}: shards {_ranges(missing)} of {self.n_shards} are not done "
                               f"(no valid completion record in {self.staging.url})")
        return [records[k] for k in range(self.n_shards)]

    def shard_summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """What a manifest keeps of its shards: their size, and per shard its rows, seconds and who computed it."""
        keep = ("rows", "seconds", "host", "pid", "worker", "finished")
        return {"count": len(records), "size": self.shard_size,
                "shards": [{k: r.get(k) for k in keep} for r in records]}


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


# --- shard jobs computed inside a stage (re-mining rounds), spread as the run spreads the stages' shards ---------

JobSpreader = Callable[["ShardJob"], None]  # computes a job's pending shards elsewhere (pool workers, devices)
_spreader: ContextVar[JobSpreader | None] = ContextVar("gplflow_job_spreader", default=None)


@contextlib.contextmanager
def spreading(spread: JobSpreader | None) -> Iterator[None]:
    """While the block runs, ``compute`` hands a job's pending shards to ``spread`` first (the pipeline sets it
    around a stage task, so that work a stage cuts into shards itself goes where the run's shards go)."""
    token = _spreader.set(spread)
    try:
        yield
    finally:
        _spreader.reset(token)


def compute(job: ShardJob) -> Artifact:
    """A shard job's artifact: reused while valid, else its shards computed (spread first, when the block runs
    under ``spreading``: the spreader computes what it can, this process what is left) and published."""
    found = reuse(job.store, job.stage, job.fingerprint)
    if found is not None:
        return found
    if (spread := _spreader.get()) is not None:
        spread(job)
    return job.run()


def job_payload(job: ShardJob) -> dict[str, Any]:
    """What another process needs to rebuild ``job`` (``job_from_payload``): its class and its inputs as JSON."""
    inputs = job.inputs
    return {"job": f"{type(job).__module__}:{type(job).__qualname__}",
            "inputs_type": f"{type(inputs).__module__}:{type(inputs).__qualname__}",
            "inputs": inputs.model_dump(mode="json")}


def job_from_payload(payload: Mapping[str, Any]) -> ShardJob:
    """The shard job ``job_payload`` described: only gplflow's own classes are imported."""
    def named(path: str) -> Any:
        module, _, name = path.partition(":")
        if module != "gplflow" and not module.startswith("gplflow."):
            raise InputError(f"shard job {path!r}: not a gplflow class")
        return getattr(importlib.import_module(module), name)

    inputs = named(payload["inputs_type"]).model_validate(payload["inputs"])
    return named(payload["job"])(inputs)
