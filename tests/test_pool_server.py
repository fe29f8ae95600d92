"""Pool mode for real: a Prefect server on loopback, the gpu-pool process work pool, the gplflow-shard
deployment and two workers; `gplflow run` with execution.mode=pool fans generate and label out as shard runs.

Checks: both workers ran shards (flow-run labels written by the shard flow, read back through the API),
every shard run is a subflow of the pipeline run, never more than two were in flight at once (one per online
worker), each worker's GPU concurrency limit exists, and the published artifacts equal those of the same
stages run here in local mode.

Kept small for 2 CPU cores: 32 demo passages, extractive generation (4 shards of 8), BM25 mining (no
encoding shards), 8 labelled triples (2 shards of 8 distinct pairs), two training steps in two re-mining rounds:
round 2's corpus encoding by the student (4 shards of 8) and its new pairs go to the workers too, each shard run
given the round's job whole (shard_flow's ``job`` parameter, which the deployment must accept).
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import stage_calls
from prefect_server import ProcessGroup, prefect_command, running_prefect_server
from stage_calls import run_generate, run_ingest, run_label, run_mine

from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models, default_cache_dir
from gplflow.flows.config import PipelineConfig
from gplflow.tasks import split
from gplflow.tasks.label import resolve_triples

pytestmark = [pytest.mark.server, pytest.mark.serial, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parent.parent
PASSAGES = 32
RUN_TIMEOUT_S = 300.0
CONFIG = """\
name: pool-test
profile: tiny
corpus: {path: corpus.jsonl}
models: {retrievers: [], bi_encoder_teacher: tiny}
generate: {method: extractive, queries_per_passage: 2, seed: 7}
mine: {bm25: true, negatives_per_query: 5}
label: {seed: 3, batch_size: 8, max_seq_length: 64}
train: {steps: 2, remine_every: 1, batch_size: 8, max_seq_length: 32, warmup_steps: 0, learning_rate: 1e-3}
evaluate: {qrels: null}
execution: {mode: pool, shard_size: 8, shard_retries: 1, shard_timeout_s: 240}
"""
DEPLOY = """\
from gplflow.flows.shards import DEPLOYMENT, POOL, shard_flow
shard_flow.from_source(source={root!r}, entrypoint="flows/shards.py:shard_flow").deploy(
    name=DEPLOYMENT, work_pool_name=POOL, print_next_steps=False)
"""


def _env(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**base, "PREFECT_WORKER_QUERY_SECONDS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", **extra}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float, cwd: Path | None = None) -> str:
    group = ProcessGroup.start(cmd, env, log, cwd=cwd)
    try:
        code = group.wait(timeout)
    finally:
        group.stop(grace=2.0)
    assert code == 0, f"{cmd} exited with {code}\n{group.tail(6000)}"
    return group.tail(20_000)


def _local_stages(cfg: PipelineConfig, root: Path) -> ArtifactStore:
    """The same stages in this process, local mode (plain functions, same shard size and models)."""
    store = ArtifactStore(root)
    corpus = run_ingest(cfg.corpus, store)
    size = cfg.execution.shard_size
    queries = run_generate(cfg.generate, store, corpus, "", size)
    if split.active(cfg.evaluate):  # as the pipeline: mining and labelling see only the training queries
        queries = stage_calls.run_split(cfg.evaluate, store, queries)[split.TRAIN]
    negatives = run_mine(cfg.mine, store, corpus, queries, [], size)
    texts = (row["text"] for batch in corpus.iter_batches(["text"]) for row in batch.to_pylist())
    tiny = build_tiny_models(texts, default_cache_dir(), seed=cfg.models.tiny_seed)
    n_triples = resolve_triples(cfg.label, cfg.train.remine_every or cfg.train.steps, cfg.train.batch_size)
    run_label(cfg.label, store, corpus, queries, negatives, str(tiny.cross_encoder), n_triples, size)
    return store


def most_at_once(runs: list) -> int:
    """The most flow runs that were in flight at one time: from creation to end, on the server's clock."""
    events = sorted([(run.created, 1) for run in runs] + [(run.end_time, -1) for run in runs])  # ends first
    at_once = peak = 0
    for _, step in events:
        at_once += step
        peak = max(peak, at_once)
    return peak


def test_pool_mode_spreads_shards_over_two_workers(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (ROOT / "data" / "demo" / "corpus.jsonl").open(encoding="utf-8") as fh:
        (tmp_path / "corpus.jsonl").write_text("".join(itertools.islice(fh, PASSAGES)), encoding="utf-8")
    config = tmp_path / "pool.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    run_dir, logs = tmp_path / "run", tmp_path / "logs"

    with running_prefect_server(tmp_path / "prefect-home") as server:
        env = _env(server.client_env())
        _run(prefect_command("work-pool", "create", "gpu-pool", "--type", "process"), env, logs / "pool.log", 60)
        _run([sys.executable, "-c", DEPLOY.format(root=str(ROOT))], env, logs / "deploy.log", 120)
        workers = [ProcessGroup.start(prefect_command("worker", "start", "--pool", "gpu-pool", "--name", f"w{i}",
                                                      "--limit", "1"),
                                      _env(env, CUDA_VISIBLE_DEVICES=str(i)), logs / f"worker-{i}.log", cwd=tmp_path)
                   for i in range(2)]
        try:
            _run([sys.executable, "-m", "gplflow.flows.cli", "run", str(config), "--run-dir", str(run_dir)], env,
                 logs / "pipeline.log", RUN_TIMEOUT_S, cwd=tmp_path)
            with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name("gplflow-shard/gplflow-shard")
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                    any_=[deployment.id])))
                limits = {f"gpu:{socket.gethostname()}:{i}": client.read_global_concurrency_limit_by_name(
                    f"gpu:{socket.gethostname()}:{i}").limit for i in range(2)}
        finally:
            for worker in workers:
                worker.stop()
    worker_logs = "\n".join(w.tail(3000) for w in workers)

    pool = ArtifactStore(run_dir)
    label_shards = pool.require("triples").manifest["shards"]["count"]
    round_shards = {name: pool.require(name).manifest["shards"]["count"]
                    for name in ("negatives-round-2", "triples-round-2")}
    expected = [f"generate shard {k}" for k in range(4)] + [f"label shard {k}" for k in range(label_shards)] + [
        f"{name} shard {k}" for name, count in round_shards.items() for k in range(count)]
    assert round_shards["negatives-round-2"] == 4  # the student's encoding of 32 passages, 8 a shard
    assert sorted(r.name for r in runs) == sorted(expected), worker_logs
    assert {r.state.type.value for r in runs} == {"COMPLETED"}
    assert {r.labels.get("gplflow.worker") for r in runs} == {"w0", "w1"}, worker_logs  # both workers took shards
    assert all(r.parent_task_run_id is not None for r in runs)  # subflows of the pipeline run
    assert set(limits.values()) == {1}
    assert most_at_once(runs) <= 2  # never more shard runs in flight than the two workers compute
    shard_records = [s for stage in ("queries", "triples") for s in pool.require(stage).manifest["shards"]["shards"]]
    assert {s["worker"] for s in shard_records} == {"w0", "w1"}
    assert not list(run_dir.glob(".*.shards-*"))  # staging removed after publishing

    local = _local_stages(PipelineConfig.load(config), tmp_path / "local")
    for stage in ("corpus", "queries", split.TRAIN, "negatives"):
        assert pool.require(stage).fingerprint == local.require(stage).fingerprint
        assert pool.require(stage).read_table().to_pylist() == local.require(stage).read_table().to_pylist()
    pooled, here = pool.require("triples"), local.require("triples")
    assert pooled.fingerprint == here.fingerprint and pooled.rows == 8 and label_shards == 2
    a, b = pooled.read_pandas(), here.read_pandas()
    assert a[["query_id", "pos_doc_id", "neg_doc_id"]].values.tolist() == b[["query_id", "pos_doc_id",
                                                                             "neg_doc_id"]].values.tolist()
    np.testing.assert_allclose(a["margin"], b["margin"], rtol=0, atol=1e-5)
    assert pooled.counters == here.counters
    trained = pool.require("model").manifest["train"]
    assert trained["steps"] == 2 and [r["round"] for r in trained["rounds"]] == [1, 2]
    assert trained["rounds"][1]["new_pairs_scored"] == pool.require("triples-round-2").counters["scored_pairs"]
