"""PipelineConfig: the stage configs composed, loaded from YAML with ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from gplflow.adapters.errors import InputError
from gplflow.flows.stages import sections
from gplflow.tasks.augment import AugmentConfig
from gplflow.tasks.base import AutoOrPositive, NoBoolNumbers, Seed, StageConfig
from gplflow.tasks.evaluate import EvaluateConfig
from gplflow.tasks.generate import GenerateConfig
from gplflow.tasks.ingest import IngestConfig
from gplflow.tasks.label import LabelConfig, resolve_triples
from gplflow.tasks.mine import MineConfig
from gplflow.tasks.pairs import PairsConfig
from gplflow.tasks.pretrain import PretrainConfig
from gplflow.tasks.train import DISTILL_LOSSES, PAIR_LOSSES, TrainConfig

PAIR_FLOWS = ("supervised", "augmented_sbert")  # the flows that train on labelled pairs, not generated queries


class _Frozen(NoBoolNumbers):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=(), populate_by_name=True)


class RetrieverRef(_Frozen):
    """A dense retriever used for mining: a model reference and the similarity it was trained with."""

    name: str
    score: Literal["cos_sim", "dot"] = "cos_sim"


class ModelsConfig(_Frozen):
    """Model references: a hub name, a local folder, or ``tiny`` (built offline from the corpus)."""

    generator: str = "BeIR/query-gen-msmarco-t5-base-v1"
    cross_encoder: str = "cross-encoder/ms-marco-MiniLM-L-6-v2"
    bi_encoder_teacher: str | None = None  # label.teacher=bi_encoder; None = the first retriever
    base: str = "GPL/msmarco-distilbert-margin-mse"
    retrievers: tuple[RetrieverRef, ...] = (
        RetrieverRef(name="sentence-transformers/msmarco-distilbert-base-v3", score="cos_sim"),
        RetrieverRef(name="sentence-transformers/msmarco-MiniLM-L-6-v3", score="cos_sim"),
    )
    tiny_seed: Seed = 0
    base_layers: int | None = Field(default=None, gt=0)  # keep only the first N layers of `base` (a smaller student)

    @property
    def bi_encoder_teacher_ref(self) -> str:
        """The bi-encoder teacher as configured: ``bi_encoder_teacher``, else the first retriever, else the base."""
        return self.bi_encoder_teacher or next((r.name for r in self.retrievers), self.base)


class ExecutionConfig(_Frozen):
    """How shardable stages run: here (local) or as flow runs on the gpu-pool workers (pool, see flows/shards.py)."""

    mode: Literal["local", "pool"] = "local"
    # local: the shards of generate, mine's encoding and label run one process per device at once (auto: every
    # visible GPU, 1 on a CPU; N: the first N; see flows/local_devices.py)
    devices: AutoOrPositive = "auto"
    shard_size: int = Field(default=10_000, gt=0)  # passages (generate, mine) or distinct pairs (label) per shard
    shard_retries: int = Field(default=2, ge=0)  # pool: times a failed shard is submitted again
    # pool: a shard run not done by then has failed
    shard_timeout_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # pool: shard runs submitted and not finished at once; auto: the pool's online workers (re-read as they come
    # and go), N: at most N (the pool's GPU slots, when workers see several GPUs or a GPU takes several shards)
    max_in_flight: AutoOrPositive = "auto"


class ImportConfig(_Frozen):
    gpl_dir: str | None = None  # a UKPLab gpl folder whose outputs replace the matching stages


class PipelineConfig(_Frozen):
    name: str = "gpl"
    # supervised: fine-tune the base on `pairs`; augmented_sbert: on `pairs` and the silver pairs a cross-encoder
    # trained on them labels (`augment`)
    flow: Literal["gpl", "genq", "supervised", "augmented_sbert"] = "gpl"
    profile: Literal["default", "tiny"] = "default"  # tiny: every model slot not set explicitly is `tiny`
    corpus: IngestConfig | None = None  # may be omitted when import.gpl_dir holds a corpus.jsonl
    pairs: PairsConfig | None = None  # flows supervised and augmented_sbert: the labelled (gold) pairs
    models: ModelsConfig = ModelsConfig()
    pretrain: PretrainConfig = PretrainConfig()
    generate: GenerateConfig = GenerateConfig()
    mine: MineConfig = MineConfig()
    label: LabelConfig = LabelConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()  # flow augmented_sbert
    evaluate: EvaluateConfig = EvaluateConfig()
    execution: ExecutionConfig = ExecutionConfig()
    import_: ImportConfig = Field(default=ImportConfig(), alias="import")

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("profile") == "tiny":
            models = dict(data.get("models") or {})
            for slot in ("generator", "cross_encoder", "base"):
                models.setdefault(slot, "tiny")
            models.setdefault("retrievers", [{"name": "tiny", "score": "cos_sim"}])
            data = {**data, "models": models}
        return data

    @model_validator(mode="before")
    @classmethod
    def _supervised_loss(cls, data: Any) -> Any:
        """flow supervised or augmented_sbert without a train.loss: the first loss of its kind of pairs (scored:
        cosent)."""
        if not isinstance(data, dict) or data.get("flow") not in PAIR_FLOWS:
            return data
        train, pairs = data.get("train"), data.get("pairs")
        if (train is None or (isinstance(train, dict) and "loss" not in train)) and isinstance(pairs, dict):
            kind = pairs.get("kind", "scored")
            if kind in PAIR_LOSSES:
                data = {**data, "train": {**(train or {}), "loss": PAIR_LOSSES[kind][0]}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.corpus is None and self.import_.gpl_dir is None:
            raise ValueError("missing key 'corpus' (or import.gpl_dir with a corpus.jsonl)")
        if self.flow == "genq" and self.train.loss != "mnrl":
            raise ValueError(f"flow 'genq' trains with train.loss=mnrl, not {self.train.loss}")
        # a default augment section is allowed (a dumped config holds one), a set one only where it is read
        if self.augment != AugmentConfig() and self.flow != "augmented_sbert":
            raise ValueError(f"'augment' is read by flow 'augmented_sbert' only, not by flow '{self.flow}'")
        if self.trains_on_pairs:
            if self.pairs is None:
                raise ValueError(f"flow '{self.flow}' needs the key 'pairs' (path of the labelled pairs file)")
            if self.flow == "augmented_sbert" and self.pairs.kind != "scored":
                raise ValueError("flow 'augmented_sbert' needs scored pairs (pairs.kind: scored): its cross-encoder "
                                 f"learns their scores, not {self.pairs.kind} pairs")
            allowed = PAIR_LOSSES[self.pairs.kind]
            if self.train.loss not in allowed:
                raise ValueError(f"flow '{self.flow}' trains {self.pairs.kind} pairs with train.loss "
                                 f"{' or '.join(allowed)}, not {self.train.loss}")
        else:
            if self.pairs is not None:
                raise ValueError(f"'pairs' is read by flows 'supervised' and 'augmented_sbert' only, not by flow "
                                 f"'{self.flow}'")
            if self.train.loss not in ("mnrl", *DISTILL_LOSSES):
                raise ValueError(f"train.loss {self.train.loss} trains on labelled pairs: set flow: supervised")
        if self.is_gpl and self.label.negatives_per_example > 1 and self.import_.gpl_dir:
            raise ValueError(f"label.negatives_per_example {self.label.negatives_per_example}: import.gpl_dir brings "
                             "the reference's triples, one negative per example; set label.negatives_per_example 1")
        if self.train.remine_every:
            self._check_rounds()
        return self

    def _check_rounds(self) -> None:
        """Re-mining rounds (train.remine_every) mine and label with the teacher, so only GPL has them."""
        every = f"train.remine_every {self.train.remine_every}"
        if not self.is_gpl:
            raise ValueError(f"{every}: re-mining rounds relabel with the teacher, so they need flow gpl and "
                             f"train.loss margin_mse, kl or kl+margin_mse, not flow {self.flow} with {self.train.loss}")
        if self.import_.gpl_dir:
            raise ValueError(f"{every}: import.gpl_dir brings the reference's triples, not this run's miners")
        if self.label.triples != "auto":
            raise ValueError(f"{every}: each round labels remine_every x batch_size examples (one epoch); leave "
                             f"label.triples at auto, not {self.label.triples}")
        if self.train.devices != "auto" and int(self.train.devices) > 1:
            raise ValueError(f"{every}: re-mining rounds train on one device for now, not train.devices "
                             f"{self.train.devices}")

    @field_validator("label")
    @classmethod
    def _negatives_mined(cls, label: LabelConfig, info: ValidationInfo) -> LabelConfig:
        """The negatives each labelled example asks for are mined: before any compute, naming both keys."""
        mine = info.data.get("mine")
        if info.data.get("flow") != "gpl" or mine is None:
            return label
        if label.negatives_per_example > mine.negatives_per_query:
            raise ValueError(f"label.negatives_per_example {label.negatives_per_example} is more than "
                             f"mine.negatives_per_query {mine.negatives_per_query}, the negatives each retriever "
                             "mines per query: raise mine.negatives_per_query or lower label.negatives_per_example")
        return label

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
        """Read a YAML file (relative paths in it are taken from the file's folder), then apply overrides.

        Loaded and validated once per process for given file contents and overrides (the CLI, the flow and the
        flow-run name all ask for it): the same frozen object comes back while the file is unchanged.
        """
        version = None
        if path is not None and (found := Path(path)).is_file():
            version = (str(found.resolve()), hashlib.sha256(found.read_bytes()).hexdigest())
        return _load(cls, str(path) if path is not None else None, version, tuple(overrides),
                     tuple(sorted(sections().items(), key=lambda item: item[0])))

    @classmethod
    def _read(cls, path: str | Path | None, overrides: tuple[str, ...]) -> PipelineConfig:
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from err
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping at the top level")
            _resolve_paths(data, path.parent)
        origins = KeyOrigins(str(path) if path is not None else None, copy.deepcopy(data), tuple(overrides))
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, source=str(path) if path else "--set", origins=origins)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config",
                  origins: KeyOrigins | None = None) -> PipelineConfig:
        """Validate ``data``; each error is prefixed by where its key came from (``origins``), else ``source``."""
        try:
            return _with_sections(cls).model_validate(data)
        except ValidationError as err:
            if origins is None:
                raise ConfigError(f"{source}: " + "; ".join(_describe_all(err.errors()))) from err
            raise ConfigError("; ".join(f"{origins.prefix(key)}: {text}"
                                        for key, text in _describe_keys(err.errors()))) from err

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def section(self, key: str) -> StageConfig:
        """A stage's config section by its key (``label``, or a section a registry stage declares)."""
        return getattr(self, key)

    def value(self, key: str) -> Any:
        """A setting by its dotted key (``pretrain.method``, ``wordcounts.min_length``)."""
        found: Any = self
        for part in key.split("."):
            found = getattr(found, part)
        return found

    # Derived values: computed here once, read by the pipeline, the shard flow, the report and the checks.

    @property
    def is_gpl(self) -> bool:
        """GPL proper: mined negatives, pseudo-labelled by the teacher, trained on its scores (MarginMSE, KL)."""
        return self.flow == "gpl" and self.train.loss in DISTILL_LOSSES

    @property
    def trains_on_pairs(self) -> bool:
        """Flows supervised and augmented_sbert train on the user's labelled pairs (augmented_sbert adds silver)."""
        return self.flow in PAIR_FLOWS

    @property
    def uses_queries(self) -> bool:
        """GPL and GenQ train on generated queries; the pair flows on the user's pairs."""
        return not self.trains_on_pairs

    @property
    def n_triples(self) -> int:
        """How many triples the label stage scores (``label.triples``, 'auto': steps x batch size, or a re-mining
        round's steps x batch size)."""
        return resolve_triples(self.label, self.train.remine_every or self.train.steps, self.train.batch_size)

    @property
    def teacher_slot(self) -> str:
        """The model slot that labels: ``cross_encoder`` or ``bi_encoder_teacher``."""
        return "cross_encoder" if self.label.teacher == "cross_encoder" else "bi_encoder_teacher"

    @property
    def teacher_ref(self) -> str:
        """The labelling model as configured (``teacher_slot``'s reference)."""
        return self.models.cross_encoder if self.teacher_slot == "cross_encoder" else self.models.bi_encoder_teacher_ref


def _with_sections(cls: type[PipelineConfig]) -> type[PipelineConfig]:
    """``cls`` with a field for each config section a registry stage declares (``Stage.section``): a stage's own
    section is read, validated, reported (``'filter.teacher_fraction'``, and where the key came from) and written
    like the built-in ones."""
    declared = tuple((key, kind) for key, kind in sections().items() if key not in PipelineConfig.model_fields)
    return _composed(cls, declared) if declared else cls


@functools.lru_cache(maxsize=8)
def _composed(cls: type[PipelineConfig], declared: tuple[tuple[str, type[StageConfig]], ...]) -> type[PipelineConfig]:
    fields: dict[str, Any] = {key: (kind, Field(default_factory=kind)) for key, kind in declared}
    return create_model(cls.__name__, __base__=cls, __module__=cls.__module__, **fields)


@functools.lru_cache(maxsize=32)
def _load(cls: type[PipelineConfig], path: str | None, version: tuple[str, str] | None,
          overrides: tuple[str, ...], declared: tuple[tuple[str, type], ...]) -> PipelineConfig:
    """``PipelineConfig.load`` per (file version, overrides, the sections stages declare: a stage registered
    later changes what a config holds)."""
    return cls._read(path, overrides)


class ConfigError(InputError):
    """A configuration a user wrote that cannot be used; the message names the key."""


_BRANCHES = ("int", "str", "float", "bool", "none", "literal[", "list[", "tuple[", "dict[", "function-")


def _describe_all(errors: list[dict[str, Any]]) -> list[str]:
    """One message per key: a union's failed branches ('int', "literal['auto']") are merged."""
    return [text for _, text in _describe_keys(errors)]


def _describe_keys(errors: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(key, message) per key; a missing key is reported as ('', message): it comes from nowhere."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for error in errors:
        loc = [str(p) for p in error["loc"] if not str(p).startswith(_BRANCHES)]
        merged.setdefault(".".join(loc), []).append(error)
    return [("" if errs[0]["type"] == "missing" else key, _describe(key, errs)) for key, errs in merged.items()]


@dataclass(frozen=True)
class KeyOrigins:
    """Where each key of a loaded config came from, for messages: a ``--set`` override, the file, or a default."""

    path: str | None = None
    file_data: Mapping[str, Any] = field(default_factory=dict)  # the file as read, before the overrides
    overrides: tuple[str, ...] = ()

    @classmethod
    def of(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> KeyOrigins:
        """Read the file again (it was valid when the config loaded; unreadable now means no file keys)."""
        data: Any = {}
        if path is not None:
            try:
                data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                data = {}
        return cls(str(path) if path is not None else None, data if isinstance(data, dict) else {},
                   tuple(overrides))

    def prefix(self, key: str) -> str:
        """``--set KEY=VALUE`` (the last override touching ``key``), the config file, or ``default (...)``."""
        parts = key.split(".") if key else []
        for item in reversed(self.overrides):
            set_key = item.split("=", 1)[0].strip()
            set_parts = set_key.split(".")
            shared = min(len(parts), len(set_parts))
            if shared and parts[:shared] == set_parts[:shared]:
                # an API key's setting is named without its value: a key pasted there must not reach a log
                return f"--set {set_key}=…" if "api_key" in set_key else f"--set {item}"
        if self.path is None:
            return "--set" if not parts else "default"
        if not parts or _holds(self.file_data, parts):
            return self.path
        return f"default (not set in {self.path})"


def _holds(data: Any, parts: list[str]) -> bool:
    """Whether nested mappings/lists ``data`` hold the dotted path ``parts`` (``models.retrievers.0.name``)."""
    for part in parts:
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return False
    return True


def _describe(key: str, errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if first["type"] == "missing":
        return f"missing key '{key}'"
    if first["type"] == "value_error":
        message = first["msg"].removeprefix("Value error, ")
        return f"'{key}': {message}" if key else message
    expected = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in errors))
    return f"'{key}': got {first.get('input')!r}, expected {expected}"


def default_run_dir(cfg: PipelineConfig) -> str:
    """``runs/<name>``, where a run goes without ``--run-dir``."""
    return str(Path("runs") / cfg.name)


_PATH_KEYS = ("corpus.path", "pairs.path", "evaluate.qrels", "evaluate.queries", "evaluate.sts.path",
              "evaluate.clustering.labels", "import.gpl_dir", "generate.template", "generate.examples")


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in a config file are relative to the file, so configs work from any directory."""
    for dotted in _PATH_KEYS:
        *sections, key = dotted.split(".")
        parent: Any = data
        for section in sections:
            parent = parent.get(section) if isinstance(parent, dict) else None
        value = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            parent[key] = str((base / value).resolve())


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value``; the value is parsed as YAML (``3``, ``true``, ``null``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example train.steps=1000")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML") from err
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
