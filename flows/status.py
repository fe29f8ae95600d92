"""What ``gplflow status RUN_DIR`` reports: per stage complete / partial / corrupted / missing, and what a
rerun with the same config would do.

Files are checked cheaply (sizes, and mtimes against the manifest); with ``verify`` every file is hashed, so a
stage whose bytes changed behind an unchanged size and mtime shows as corrupted too.

Partial means work a killed run left behind that a rerun continues from: the finished shards of a
shardable stage (``.<stage>.shards-<fingerprint>/``) or the last training checkpoint (``.checkpoints/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from gplflow.adapters import artifacts, checkpoints
from gplflow.adapters.errors import MissingInputError
from gplflow.adapters.staging import ShardStaging, staged_in, staging_dirs
from gplflow.adapters.store import ArtifactStore, Check
from gplflow.flows.stages import artifact_names, condition


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # complete | partial | corrupted | missing
    rows: int | None
    shards: str  # "3 of 4" for a partial shardable stage, else ""
    fingerprint: str
    rerun: str  # what a rerun with the same config and inputs does


@dataclass(frozen=True)
class _Partial:
    fingerprint: str
    done: int
    total: int
    rows: int


def run_status(store: ArtifactStore, verify: bool = False) -> list[StageStatus]:
    """Every stage's status; an error when the folder is not a run directory (no stage has left anything in it)."""
    if not store.fs.isdir(store.root):
        what = "is a file, not a run folder" if store.fs.exists(store.root) else "no such run folder"
        raise MissingInputError(f"{store.root_url}: {what}")
    rows = [stage_status(store, stage, verify) for stage in artifact_names()]
    model = next(i for i, row in enumerate(rows) if row.stage == artifacts.MODEL)
    rows[model:model] = [stage_status(store, name, verify) for name in round_artifacts(store)]
    if all(row.state == "missing" for row in rows):
        raise MissingInputError(f"{store.root_url}: not a run directory (no stage artifact, staged shard or "
                                "checkpoint in it); give the --run-dir of a run")
    return rows


def round_artifacts(store: ArtifactStore) -> list[str]:
    """The re-mining rounds' artifacts (``train.remine_every``) the run directory holds, published or staged, in
    round order: negatives-round-2, triples-round-2, negatives-round-3…"""
    if not store.fs.isdir(store.root):
        return []
    found: dict[str, int] = {}
    for path in store.fs.ls(store.root, detail=False):
        folder = path.rstrip("/").rsplit("/", 1)[-1]
        name = (staged_in(folder) or (folder, ""))[0]
        if (number := artifacts.round_of(name)) is not None:
            found[name] = number
    return sorted(found, key=lambda name: (found[name], not name.startswith(artifacts.NEGATIVES)))


def shown(rows: list[StageStatus]) -> tuple[list[StageStatus], list[StageStatus]]:
    """(rows to list, stages left out): a missing stage that only some configs compute (pretrain, pairs, silver…)
    is not listed as missing; it is named once, with its condition, under the table."""
    listed = [row for row in rows if row.state != "missing" or not condition(row.stage)]
    return listed, [row for row in rows if row not in listed]


def hashed(store: ArtifactStore) -> tuple[int, int]:
    """(files, bytes) of every published stage's manifest: what ``--verify`` reads and hashes."""
    files = size = 0
    for stage in artifact_names():
        for meta in ((store.read_manifest(stage) or {}).get("files") or {}).values():
            files += 1
            size += int(meta.get("size", 0)) if isinstance(meta, dict) and isinstance(meta.get("size"), int) else 0
    return files, size


def stage_status(store: ArtifactStore, stage: str, verify: bool = False) -> StageStatus:
    check: Check = "full" if verify else "cheap"
    manifest = store.read_manifest(stage)
    problems = store.problems(stage, check=check)
    partial = _staged(store, stage, check)
    step = checkpoints.latest_step(store, stage) if stage in artifacts.TRAINED else None
    if not problems and manifest is not None:
        rerun = "reuse it"
        if partial is not None and partial.fingerprint != manifest.get("fingerprint"):
            rerun += (f" (also staged: {partial.done} of {partial.total} shards for fingerprint {partial.fingerprint}, "
                      "another config or inputs)")
        return StageStatus(stage, "complete", manifest.get("rows"), "", manifest.get("fingerprint", ""), rerun)
    if partial is not None:
        todo = partial.total - partial.done
        rerun = f"resume: compute the other {todo} shard{'s' * (todo != 1)}, then publish"
        return StageStatus(stage, "partial", partial.rows, f"{partial.done} of {partial.total}", partial.fingerprint,
                           rerun)
    if step is not None:
        return StageStatus(stage, "partial", None, "", "", f"resume training from the checkpoint at step {step}")
    if manifest is not None:
        return StageStatus(stage, "corrupted", manifest.get("rows"), "", manifest.get("fingerprint", ""),
                           f"recompute ({problems[0]})")
    if store.manifest_problem(stage) is not None:  # a manifest.json that is not one: the artifact is damaged
        return StageStatus(stage, "corrupted", None, "", "", f"recompute ({problems[0]})")
    for fp in staging_dirs(store, stage):
        if (problem := ShardStaging(store, stage, fp).plan_problem()) is not None:
            return StageStatus(stage, "corrupted", None, "", fp, f"recompute, discarding the staged shards ({problem})")
    when = condition(stage)  # a stage only some configs run is computed only when the config asks for it
    return StageStatus(stage, "missing", None, "", "", f"compute, if {when}" if when else "compute")


def _staged(store: ArtifactStore, stage: str, check: Check) -> _Partial | None:
    """The staging folder of ``stage`` with the most finished shards, if any."""
    best = None
    for fp in staging_dirs(store, stage):
        staging = ShardStaging(store, stage, fp)
        total = staging.n_shards()
        if total is None:
            continue
        records = staging.records(total, check)
        found = _Partial(fp, len(records), total, sum(int(r.get("rows", 0)) for r in records.values()))
        if best is None or found.done > best.done:
            best = found
    return best
