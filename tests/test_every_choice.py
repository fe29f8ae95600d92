"""Every choice of every enumerated setting runs (issue 20, item 9): ``pretrain.method=ct_inbatch`` was documented,
never run through a flow, and crashed on its progress artifact's key.

The choices are read from the config's types: every ``Literal`` field of ``PipelineConfig``, its sections and the
sections registry stages declare, so a new choice (or a new enumerated field) is covered without editing this test.
Each choice runs the registry's stages (``stage.inputs(run)``, then ``stage.task.fn(inputs)``) on 12 passages
with the tiny models, as far as the first stage that reads it: a stage whose fingerprint is the baseline run's is
adopted from the baseline (not computed again), and the run stops after the first computed stage whose config
holds the choice. Prefect's artifact calls are replaced by its own key check, so an invalid key fails the choice.
"""

from __future__ import annotations

import csv
import json
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from prefect.client.schemas.actions import ArtifactCreate
from prefect.logging import disable_run_logger
from pydantic import BaseModel

from gplflow.adapters.store import ArtifactStore
from gplflow.flows import models as flow_models
from gplflow.flows import shards
from gplflow.flows.config import PipelineConfig
from gplflow.flows.stages import STAGES, Run, planned, sections
from gplflow.tasks import evaluate, progress

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
N_DOCS = 12
BASE: dict[str, Any] = {  # every enumerated field at its default: the baseline run covers the default choices
    "name": "every-choice", "profile": "tiny",
    "generate": {"queries_per_passage": 2, "max_query_length": 12, "seed": 0},
    "mine": {"negatives_per_query": 4, "batch_size": 16, "max_seq_length": 32},
    "label": {"max_seq_length": 32},
    "train": {"steps": 2, "batch_size": 4, "max_seq_length": 32, "warmup_steps": 0},
    "pretrain": {"steps": 2, "batch_size": 4, "max_seq_length": 32, "min_sentence_words": 1},
    "evaluate": {"heldout_fraction": 0.5, "max_seq_length": 32, "resamples": 100},
}
# what a choice needs beside itself (dotted key -> value; "{files}/…" is the test's data folder)
PAIRS = {"flow": "supervised", "pairs.path": "{files}/pairs.tsv"}
AUGMENTED = {**PAIRS, "flow": "augmented_sbert", "augment.cross_encoder.steps": 2, "augment.top_k": 2,
             "augment.cross_encoder.batch_size": 4, "augment.cross_encoder.max_seq_length": 32,
             "augment.silver_per_gold": 1}
SETUP: dict[str, Any] = {  # field -> choice -> the overrides it needs
    "flow": lambda choice: {"genq": {"train.loss": "mnrl"}, "supervised": PAIRS,
                            "augmented_sbert": AUGMENTED}.get(choice, {}),
    "profile": lambda choice: {**{f"models.{slot}": "tiny" for slot in ("generator", "cross_encoder", "base")},
                               "models.retrievers": [{"name": "tiny", "score": "cos_sim"}]},
    "pairs.format": lambda choice: {**PAIRS, "pairs.path": f"{{files}}/pairs.{choice}"},
    "pairs.kind": lambda choice: {**PAIRS, "pairs.path": "{files}/" + ("ranking" if choice == "ranking" else "pairs")
                                  + ".tsv"},
    "pretrain.pooling": lambda choice: {"pretrain.method": "tsdae"},
    "generate.queries_per_passage": lambda choice: {"generate.target_queries": 24},
    "generate.prompt": lambda choice: {"generate.method": "llm"},
    "label.bi_encoder_score": lambda choice: {"label.teacher": "bi_encoder"},
    "train.loss": lambda choice: PAIRS if choice in ("cosent", "cosine", "angle") else {},
    "augment.sampling": lambda choice: AUGMENTED,
    "evaluate.sts.format": lambda choice: {"evaluate.sts.path": f"{{files}}/sts.{choice}"},
    "evaluate.clustering.format": lambda choice: {"evaluate.clustering.labels": f"{{files}}/labels.{choice}"},
    "execution.mode": lambda choice: {"execution.shard_size": 5} if choice == "pool" else {},
    "filter.dedup_scope": lambda choice: {"filter.dedup": "exact"},  # a scope needs a dedup rule on
}
# fields no stage config records: the first stage computed (or, for these, the one named) is where they act
FIRST_COMPUTED = {"flow", "models.retrievers.0.score"}
THROUGH = {"augment.sampling": "sample",  # the cross-encoder's fingerprint holds it too, but sample reads it
           "execution.mode": "generate"}  # the first stage a pool computes shard by shard
SAME_RUN = {"profile"}  # picks the models' defaults only: with every slot set, the baseline run itself


def enumerated(model: type[BaseModel], prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(dotted key, choices) of every Literal field of ``model`` and of the models it holds."""
    found = []
    for name, field in model.model_fields.items():
        if name == "extra_sections":
            continue
        key = f"{prefix}{field.alias or name}"
        found += _walk(field.annotation, key)
    return found


def _walk(annotation: Any, key: str) -> list[tuple[str, tuple[str, ...]]]:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return [(key, typing.get_args(annotation))]
    if origin is typing.Annotated:
        return _walk(typing.get_args(annotation)[0], key)
    if origin in (typing.Union, types.UnionType):
        return [found for member in typing.get_args(annotation) for found in _walk(member, key)]
    if origin in (tuple, list):
        return [found for member in typing.get_args(annotation) if member is not Ellipsis
                for found in _walk(member, f"{key}.0")]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return enumerated(annotation, f"{key}.")
    return []


CHOICES = enumerated(PipelineConfig) + [found for key, kind in sections().items() if key not in
                                        PipelineConfig.model_fields for found in enumerated(kind, f"{key}.")]
CASES = [(key, choice) for key, choices in CHOICES for choice in choices]


def test_the_enumeration_finds_the_documented_choices():
    found = dict(CHOICES)
    assert found["pretrain.method"] == ("none", "tsdae", "mlm", "simcse", "ct", "ct_inbatch")
    assert found["flow"] == ("gpl", "genq", "supervised", "augmented_sbert")
    assert {"train.loss", "label.teacher", "generate.method", "models.retrievers.0.score", "evaluate.promote",
            "evaluate.sts.format", "augment.sampling", "execution.mode"} <= set(found)


# --- the data and the harness ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """12 demo passages, and the pairs, STS and label files in every format a choice names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("every-choice")
    docs = [json.loads(line) for line in (DEMO / "corpus.jsonl").read_text().splitlines()[:N_DOCS]]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    texts = [" ".join(d["text"].split()[:12]) for d in docs]
    scored = {"sentence1": texts[:6], "sentence2": texts[6:], "score": [0.9, 0.1, 0.5, 0.7, 0.3, 0.8]}
    labels = {"doc_id": [d["_id"] for d in docs], "label": ["a", "b", "c"] * (N_DOCS // 3)}
    for stem, table in (("pairs", scored), ("sts", scored), ("labels", labels)):
        _write_all(root, stem, table, pa, pq)
    _write_all(root, "ranking", {"anchor": texts[:6], "positive": texts[6:]}, pa, pq)
    return root


def _write_all(root: Path, stem: str, columns: dict[str, list[Any]], pa: Any, pq: Any) -> None:
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    (root / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["\t".join(columns), *("\t".join(str(v) for v in r.values()) for r in rows)]
    (root / f"{stem}.tsv").write_text("\n".join(lines) + "\n")  # IANA TSV: no quoting, and no tabs in the texts
    with (root / f"{stem}.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.table(columns), root / f"{stem}.parquet")


class Keys(list):
    """Prefect's artifact calls, replaced by its own check of the key (and a list of the keys made)."""

    def create(self, *args: Any, key: str | None = None, **kwargs: Any) -> str:
        ArtifactCreate(key=key, type="test", data=None)  # raises on a key Prefect refuses
        self.append(key)
        return "artifact-id"


@pytest.fixture(scope="module")
def harness(files) -> Any:
    """Stages outside Prefect: models resolved in-process, run loggers off, artifact keys checked."""
    keys, patch = Keys(), pytest.MonkeyPatch()
    patch.setattr(flow_models, "prepare_models",
                  lambda cfg, run_dir: flow_models.resolve_models(cfg, ArtifactStore(run_dir)))
    patch.setattr(progress, "in_task_run", lambda: True)
    patch.setattr(progress, "create_progress_artifact", keys.create)
    patch.setattr(progress, "update_progress_artifact", lambda *args, **kwargs: None)
    patch.setattr(evaluate, "create_table_artifact", keys.create)
    patch.setattr(shards, "gpu_limit", lambda: "gpu:test")
    patch.setattr(shards, "concurrency", lambda *args, **kwargs: _Nothing())
    with disable_run_logger():
        yield keys
    patch.undo()


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class InProcessPool:
    """A worker pool of one, in this process: each shard runs through the shard flow's own code."""

    def __init__(self) -> None:
        self.shards: list[int] = []

    def check(self) -> None:
        return None

    def capacity(self) -> int:
        return 1

    def submit(self, shard: int, parameters: dict[str, Any]) -> shards.Attempt:
        shards.shard_flow.fn(**parameters)  # the worker loads the config from the overrides, as a pool worker does
        self.shards.append(shard)
        return shards.Attempt(shard, run_id=None, run_name=f"{parameters['stage']} shard {shard}",  # type: ignore
                              state="COMPLETED")

    def poll(self, attempts: list[shards.Attempt]) -> list[shards.Attempt]:
        return list(attempts)

    def cancel(self, attempts: list[shards.Attempt], why: str) -> list[shards.Attempt]:
        return []


def config(files: Path, key: str = "", choice: str = "") -> PipelineConfig:
    data = json.loads(json.dumps(BASE))
    data["corpus"] = {"path": str(files / "corpus.jsonl")}
    setup = SETUP[key](choice) if key in SETUP else {}
    for dotted, value in {**setup, **({key: choice} if key else {})}.items():
        value = value.replace("{files}", str(files)) if isinstance(value, str) else value
        _put(data, dotted, value)
    return PipelineConfig.from_dict(data, source=f"{key}={choice}")


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        if part.isdigit():
            node = node[int(part)]
        elif part == "retrievers":
            node = node.setdefault(part, [{"name": "tiny"}])
        else:
            node = node.setdefault(part, {})
    node[last] = value


def _leaf(config: dict[str, Any], key: str) -> Any:
    """The value at ``key`` without its section (``evaluate.sts.format`` -> config["sts"]["format"]), or None."""
    node: Any = config
    for part in key.split(".")[1:]:
        node = node.get(part) if isinstance(node, dict) else None
    return node


class Baseline(NamedTuple):
    dir: Path
    fps: dict[str, str]


def run_stages(cfg: PipelineConfig, run_dir: Path, baseline: Baseline | None = None, key: str = "",
               choice: str = "", pool: InProcessPool | None = None) -> tuple[Run, list[str]]:
    """The registry's stages of ``cfg`` in order; with ``baseline``, adopt the stages it has and stop after the
    first computed stage that reads the choice. Returns the run and the stages computed."""
    run, computed = Run(cfg, str(run_dir)), []
    donor = ArtifactStore(baseline.dir) if baseline is not None else None
    for stage in STAGES:
        if not stage.when(run):
            continue
        inputs = stage.inputs(run)
        fps = inputs.fingerprints()
        if donor is not None and pool is None and all(baseline.fps.get(name) == fp for name, fp in fps.items()):
            for name, fp in fps.items():
                run.store.adopt(donor.load(name, expect_fingerprint=fp))
            run.fps.update(fps)
            continue
        if pool is not None and stage.job is not None:
            shards.fan_out(cfg, stage, inputs, shards.PoolSource.of(cfg, None, None), dispatcher=pool)
        template = getattr(stage.task, "task_run_name", None)
        assert not isinstance(template, str) or "\n" not in template.format(inputs=inputs)
        run.record(stage, stage.task.fn(inputs))
        computed.append(stage.name)
        if baseline is None:
            continue
        if THROUGH.get(key) == stage.name or (key not in THROUGH and (
                key in FIRST_COMPUTED or _leaf(inputs.fingerprint_parts()[0], key) == choice)):
            break
    return run, computed


@pytest.fixture(scope="module")
def baseline(files, harness, tmp_path_factory) -> Baseline:
    """Every stage of the default config, computed: what the choices adopt from."""
    run_dir = tmp_path_factory.mktemp("runs") / "baseline"
    run, computed = run_stages(config(files), run_dir)
    assert computed == ["ingest", "generate", "split", "mine", "label", "train", "evaluate", "promote"]
    return Baseline(run_dir, dict(run.fps))


@pytest.mark.parametrize(("key", "choice"), CASES, ids=[f"{k}={c}" for k, c in CASES])
def test_every_choice_runs_as_far_as_the_first_stage_that_reads_it(key, choice, files, harness, baseline,
                                                                     tmp_path_factory):
    cfg = config(files, key, choice)
    run_dir = tmp_path_factory.mktemp("runs") / f"{key}={choice}"
    pool = InProcessPool() if cfg.execution.mode == "pool" else None
    before = len(harness)
    run, computed = run_stages(cfg, run_dir, baseline, key, choice, pool)
    if key in SAME_RUN or cfg == config(files):
        assert computed == [] and run.fps == baseline.fps  # the baseline run, adopted
        return
    assert computed, f"{key}={choice}: no stage computed"
    last = computed[-1]
    stage = next(s for s in STAGES if s.name == last)
    for name in stage.makes:  # published, valid, and (but for a pool's shards) not the baseline's artifact
        assert run.store.load(name, expect_fingerprint=run.fps[name]) is not None
        assert (run.fps[name] == baseline.fps[name]) if pool is not None else (run.fps[name] != baseline.fps.get(name))
    if key not in FIRST_COMPUTED and key not in THROUGH:
        assert _leaf(run.store.read_manifest(stage.makes[0])["config"], key) == choice
    if pool is not None:
        assert pool.shards == list(range(3)) and last == "generate"  # 12 passages in shards of 5
    assert all(k == progress.artifact_key(k) for k in harness[before:])
    assert {s.name for s in planned(cfg)} >= set(computed)

