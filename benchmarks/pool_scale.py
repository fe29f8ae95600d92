"""The pool at many shards (issue 18, part 5): a real ``prefect server start`` on loopback (its default SQLite),
the gpu-pool process work pool, the gplflow-shard deployment and N process workers without ``--limit``, then
``gplflow run CONFIG --set execution.mode=pool --set execution.shard_size=S``.

Records: whether the run finished and how long it took, the most shard runs in flight at once (from the runs'
creation and end times on the server) and the most shard processes the sampler saw, the peak memory (RSS) of
all the workers' flow-run processes together (sampled every second), and, with ``--compare``, whether
the corpus, queries, negatives and triples equal those of the same stages run here in local mode (row by row,
in order; their row counts are recorded too).

    .venv/bin/python benchmarks/pool_scale.py [--config configs/demo.yaml] [--shard-size 20] [--workers 2]
        [--out /tmp/pool-scale] [--timeout-s 3000] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from prefect_server import ProcessGroup, prefect_command, running_prefect_server  # the tests' helpers

ROOT = Path(__file__).resolve().parents[1]

DEPLOY = """\
from gplflow.flows.shards import DEPLOYMENT, POOL, shard_flow
shard_flow.from_source(source={root!r}, entrypoint="flows/shards.py:shard_flow").deploy(
    name=DEPLOYMENT, work_pool_name=POOL, print_next_steps=False)
"""
COMPARED = ("corpus", "queries", "queries-train", "heldout", "negatives", "triples")


class Sampler(threading.Thread):
    """Every second: the flow-run processes under the workers, how many, and their resident memory together."""

    def __init__(self, workers: list[ProcessGroup]):
        super().__init__(daemon=True)
        self.roots = [psutil.Process(w.proc.pid) for w in workers]
        self.peak_rss = self.peak_count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            rss = count = 0
            for root in self.roots:
                try:
                    children = root.children(recursive=True)
                except psutil.Error:
                    continue
                for child in children:
                    try:
                        rss += child.memory_info().rss
                        count += "prefect.engine" in " ".join(child.cmdline())
                    except psutil.Error:
                        pass
            self.peak_rss, self.peak_count = max(self.peak_rss, rss), max(self.peak_count, count)


def most_at_once(runs: list) -> int:
    events = sorted([(r.created, 1) for r in runs] + [(r.end_time, -1) for r in runs if r.end_time])
    at_once = peak = 0
    for _, step in events:
        at_once += step
        peak = max(peak, at_once)
    return peak


def shard_runs(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("gplflow-shard/gplflow-shard")
        runs, offset = [], 0
        while page := client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                any_=[deployment.id])), limit=200, offset=offset):
            runs.extend(page)
            offset += len(page)
    return runs


def local_stages(config: Path, overrides: list[str], run_dir: Path, until: str = "label") -> None:
    """The registry's stages up to ``until`` in this process, local mode, as the pipeline runs them."""
    from prefect import flow

    from gplflow.flows.config import PipelineConfig
    from gplflow.flows.stages import STAGES, Run

    @flow(name="pool-scale-local")
    def stages() -> None:
        run = Run(PipelineConfig.load(config, overrides), str(run_dir))
        for stage in STAGES:
            if stage.when(run):
                run.record(stage, stage.task(stage.inputs(run)))
            if stage.name == until:
                return

    stages()


def same_rows(a: Path, b: Path) -> dict[str, dict]:
    """Per artifact both runs hold: its rows in each, and whether they are the same rows in the same order."""
    from gplflow.adapters.store import ArtifactStore

    found = {}
    for name in COMPARED:
        x, y = ArtifactStore(a).load(name), ArtifactStore(b).load(name)
        if x is not None and y is not None:
            found[name] = {"rows": x.rows, "rows_local": y.rows,
                           "same": x.read_table().to_pylist() == y.read_table().to_pylist()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--shard-size", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/pool-scale"))
    parser.add_argument("--timeout-s", type=float, default=3000)
    parser.add_argument("--compare", action="store_true", help="run generate..label here in local mode and compare")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # the finally blocks stop the rest
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["execution.mode=pool", f"execution.shard_size={args.shard_size}"]
    result: dict = {"config": str(args.config), "shard_size": args.shard_size, "workers": args.workers}
    with running_prefect_server(out / "prefect-home") as server:
        env = server.client_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GPLFLOW_PROJECT_DIR=str(ROOT),
                                PREFECT_WORKER_QUERY_SECONDS="2")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for cmd, log in ((prefect_command("work-pool", "create", "gpu-pool", "--type", "process"), "pool.log"),
                         ([sys.executable, "-c", DEPLOY.format(root=str(ROOT))], "deploy.log")):
            group = ProcessGroup.start(cmd, env, out / "logs" / log, cwd=ROOT)
            if group.wait(180) != 0:
                raise SystemExit(f"{cmd} failed:\n{group.tail()}")
        # the workers and the pipeline run in sessions of their own: stopped here however this process ends
        started_groups: list[ProcessGroup] = []
        try:
            workers = [ProcessGroup.start(prefect_command("worker", "start", "--pool", "gpu-pool", "--name", f"w{i}"),
                                          {**env, "CUDA_VISIBLE_DEVICES": str(i)}, out / "logs" / f"worker-{i}.log",
                                          cwd=ROOT) for i in range(args.workers)]
            started_groups += workers
            sampler = Sampler(workers)
            sampler.start()
            started = time.monotonic()
            cmd = [sys.executable, "-m", "gplflow.flows.cli", "run", str(args.config.resolve()), "--run-dir",
                   str(out / "run"), *(f"--set={o}" for o in overrides)]
            pipeline = ProcessGroup.start(cmd, env, out / "logs" / "pipeline.log", cwd=ROOT)
            started_groups.insert(0, pipeline)
            try:
                result["exit_code"] = pipeline.wait(args.timeout_s)
            except TimeoutError:
                result["exit_code"] = None
            result["seconds"] = round(time.monotonic() - started)
            sampler.stop.set()
            runs = shard_runs(server.api_url)
            result.update(shard_runs=len(runs), states=sorted({r.state.type.value for r in runs if r.state}),
                          shard_runs_per_stage=dict(Counter(r.name.rsplit(" shard ", 1)[0] for r in runs)),
                          most_in_flight=most_at_once(runs), most_shard_processes=sampler.peak_count,
                          peak_rss_gb=round(sampler.peak_rss / 2**30, 2))
        finally:
            for group in started_groups:
                group.stop()
    if args.compare and result["exit_code"] == 0:
        local_stages(args.config.resolve(), [f"execution.shard_size={args.shard_size}"], out / "local")
        result["same_rows_as_local"] = same_rows(out / "run", out / "local")
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
