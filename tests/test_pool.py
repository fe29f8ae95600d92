"""Pool mode without a server: shard dispatch and retry, config hand-over to workers, plan checks.

The real thing (a server, a deployment, two workers) is tests/test_pool_server.py.
"""

from __future__ import annotations

import pytest
from artifact_rows import write_artifact
from stage_calls import GenerateJob

from gplflow.adapters.store import ArtifactStore
from gplflow.flows import shards
from gplflow.flows.config import ConfigError, ExecutionConfig, PipelineConfig
from gplflow.tasks.generate import GenerateConfig

DOCS = [(f"d{i}", "", f"Passage number {i} talks about topic {i % 3}. It has a second sentence too.")
        for i in range(10)]


@pytest.fixture()
def job(tmp_path) -> GenerateJob:
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", DOCS)
    cfg = GenerateConfig(method="extractive", queries_per_passage=2, seed=1)
    return GenerateJob(cfg, store, store.require("corpus"), "", shard_size=3)


class FakeDispatcher:
    """Runs a shard in-process when submitted, unless told to fail it (``fail[k]`` more times); every submitted
    run is final at the next poll."""

    def __init__(self, job: GenerateJob, fail: dict[int, int] | None = None, complete_without_record=(),
                 slots: int = 100):
        self.job, self.fail, self.silent, self.slots = job, dict(fail or {}), set(complete_without_record), slots
        self.submitted: list[list[int]] = [[]]  # the shards submitted between two polls
        self.cancelled: list[int] = []

    def capacity(self) -> int:
        return self.slots

    def submit(self, shard: int, parameters: dict) -> shards.Attempt:
        assert parameters["shard"] == shard and parameters["stage"] == "generate"
        self.submitted[-1].append(shard)
        attempt = shards.Attempt(shard, run_id=None, run_name=f"generate shard {shard}")  # type: ignore[arg-type]
        if self.fail.get(shard, 0) > 0:
            self.fail[shard] -= 1
            attempt.state, attempt.message = "FAILED", "boom"
        elif shard in self.silent:
            attempt.state = "COMPLETED"
        else:
            self.job.run_shard(shard)
            attempt.state = "COMPLETED"
        return attempt

    def poll(self, attempts: list[shards.Attempt]) -> list[shards.Attempt]:
        if self.submitted[-1]:
            self.submitted.append([])
        return list(attempts)

    def cancel(self, attempts: list[shards.Attempt], why: str) -> list[shards.Attempt]:
        self.cancelled.extend(a.shard for a in attempts)
        return []


def _rounds(dispatcher: FakeDispatcher) -> list[list[int]]:
    return [r for r in dispatcher.submitted if r]


def test_failed_shards_are_resubmitted_until_done(job):
    pending = job.prepare()
    dispatcher = FakeDispatcher(job, fail={1: 1, 3: 2})
    shards.run_shards(job, pending, dispatcher, {"stage": "generate"}, ExecutionConfig(shard_retries=2))
    assert _rounds(dispatcher) == [[0, 1, 2, 3], [1, 3], [3]]
    assert job.staging.pending(job.n_shards) == []
    assert job.publish().rows == 20


def test_a_shard_that_keeps_failing_fails_the_stage_naming_it(job):
    dispatcher = FakeDispatcher(job, fail={2: 5})
    with pytest.raises(RuntimeError, match=r"queries: shards \[2\] failed 2 times on pool gpu-pool: shard 2 "
                                           r"\(generate shard 2, run None\): FAILED boom"):
        shards.run_shards(job, job.prepare(), dispatcher, {"stage": "generate"}, ExecutionConfig(shard_retries=1))
    assert _rounds(dispatcher) == [[0, 1, 2, 3], [2]]
    assert job.staging.pending(job.n_shards) == [2]  # the others stay done for the next run


def test_a_completed_run_without_a_record_points_at_shared_storage(job):
    dispatcher = FakeDispatcher(job, complete_without_record={0})
    with pytest.raises(RuntimeError, match=r"left no completion record .* same run directory"):
        shards.run_shards(job, job.prepare(), dispatcher, {"stage": "generate"}, ExecutionConfig(shard_retries=0))


def test_a_worker_with_another_config_refuses_the_shard(job):
    job.prepare()
    other = GenerateJob(job.cfg.model_copy(update={"seed": 2}), job.store, job.corpus, "", shard_size=3)
    with pytest.raises(ValueError, match="no staging plan matching this process's config"):
        other.check_shard(0)
    with pytest.raises(ValueError, match="shard 4 does not exist; the stage has 4 shards"):
        job.check_shard(4)
    job.check_shard(3)


def test_pool_source_hands_workers_the_exact_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: t\nprofile: tiny\ncorpus: {path: corpus.jsonl}\nexecution: {mode: pool}\n")
    cfg = PipelineConfig.load(path, ["generate.seed=3"])
    source = shards.PoolSource.of(cfg, path, ["generate.seed=3"])
    assert source.config_path == str(path.resolve()) and source.overrides == ["generate.seed=3"]
    with pytest.raises(ConfigError, match="does not give the config this run uses"):
        shards.PoolSource.of(cfg, path, [])
    # Without a file the whole config goes as overrides, and loads back to the same config.
    inline = shards.PoolSource.of(cfg, None, None)
    assert inline.config_path is None and PipelineConfig.load(None, inline.overrides) == cfg


def test_stage_names_and_missing_server():
    from gplflow.flows.stages import shard_stage

    assert [shard_stage(s).name for s in ("generate", "mine", "label")] == ["generate", "mine", "label"]
    for other in ("train", "triples"):  # one name per stage: the artifact's is not the stage's
        with pytest.raises(ValueError, match=f"stage '{other}' is not shardable"):
            shard_stage(other)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: None}), pytest.raises(shards.PoolSetupError, match="PREFECT_API_URL"):
        shards.DeploymentDispatcher().check()


# --- a worker that cannot load the shard flow (no GPLFLOW_PROJECT_DIR): one line, not retried (issue 11) ----

LOAD_LOG = ("Unexpected exception encountered when trying to load flow\nTraceback (most recent call last):\n"
            '  File "/venv/lib/prefect/flows.py", line 2400, in load_flow_from_entrypoint\n'
            "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/tmpab12cd/flows/shards.py'")


class SetupBrokenDispatcher(FakeDispatcher):
    """Every run crashes on the worker before it starts, as on a worker without GPLFLOW_PROJECT_DIR."""

    def submit(self, shard: int, parameters: dict) -> shards.Attempt:
        self.submitted[-1].append(shard)
        return shards.Attempt(shard, run_id=None, run_name=f"generate shard {shard}")  # type: ignore[arg-type]

    def poll(self, attempts: list[shards.Attempt]) -> list[shards.Attempt]:
        self.submitted.append([])
        attempts[0].state, attempts[0].worker = "CRASHED", "gpu-worker-1 on host-a"
        attempts[0].setup_error = shards.load_failure([LOAD_LOG])
        return [attempts[0]]


def test_a_worker_that_cannot_load_the_shard_flow_ends_the_stage_at_once(job):
    dispatcher = SetupBrokenDispatcher(job)
    with pytest.raises(shards.PoolSetupError) as err:
        shards.run_shards(job, job.prepare(), dispatcher, {"stage": "generate"}, ExecutionConfig(shard_retries=2))
    message = str(err.value)
    assert "\n" not in message and "GPLFLOW_PROJECT_DIR" in message and "gpu-worker-1 on host-a" in message
    assert "No such file or directory: '/tmp/tmpab12cd/flows/shards.py'" in message
    assert _rounds(dispatcher) == [[0, 1, 2, 3]]  # no second round of submissions
    assert dispatcher.cancelled == [1, 2, 3]  # the runs still in flight are cancelled


class _Run:
    def __init__(self, run_id, state_type, start_time=None, message=""):
        from types import SimpleNamespace

        self.id, self.start_time = run_id, start_time
        self.labels = {"prefect.worker.name": "gpu-worker-1"}
        self.infrastructure_pid = "host-a:4242"
        self.state = SimpleNamespace(type=SimpleNamespace(value=state_type), message=message,
                                     is_final=lambda: state_type in ("CRASHED", "COMPLETED", "FAILED"))


class _Client:
    """The three calls DeploymentDispatcher.wait makes, answered from memory."""

    def __init__(self, runs, logs, workers=2):
        self.runs, self.logs, self.cancelled, self.reads, self.workers = runs, logs, [], [], workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_flow_runs(self, flow_run_filter, limit=None):
        wanted = set(flow_run_filter.id.any_)
        self.reads.append(wanted)
        return [run for run in self.runs if run.id in wanted][:limit]

    def read_workers_for_work_pool(self, work_pool_name, worker_filter=None):
        assert work_pool_name == "gpu-pool" and worker_filter.status.any_ == ["ONLINE"]
        self.reads.append("workers")
        return [object()] * self.workers

    def read_logs(self, log_filter):
        from types import SimpleNamespace

        return [SimpleNamespace(message=m) for m in self.logs.get(log_filter.flow_run_id.any_[0], [])]

    def set_flow_run_state(self, run_id, state, force=False):
        self.cancelled.append(run_id)
        self.states = [*getattr(self, "states", []), state.type.value]


def test_the_dispatcher_reads_why_a_run_crashed_before_it_started(monkeypatch):
    from uuid import uuid4

    import prefect.client.orchestration as orchestration

    crashed, running = uuid4(), uuid4()
    client = _Client([_Run(crashed, "CRASHED", message="Flow run infrastructure exited with non-zero status "
                                                        "code 1."), _Run(running, "RUNNING", start_time=1.0)],
                     {crashed: ["Downloading flow code", LOAD_LOG]})
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client: client)
    attempts = [shards.Attempt(0, crashed, "generate shard 0"), shards.Attempt(1, running, "generate shard 1")]
    shards.DeploymentDispatcher(poll_s=0.01).wait(attempts)
    assert attempts[0].setup_error.startswith("FileNotFoundError: [Errno 2]")
    assert attempts[0].worker == "gpu-worker-1 on host-a"
    assert client.cancelled == [running]  # the stage ends at the first such crash


def test_a_run_that_crashed_while_running_is_not_a_setup_error(monkeypatch):
    from uuid import uuid4

    import prefect.client.orchestration as orchestration

    run_id = uuid4()
    client = _Client([_Run(run_id, "CRASHED", start_time=1.0)], {run_id: [LOAD_LOG]})
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client: client)
    attempts = [shards.Attempt(0, run_id, "generate shard 0")]
    shards.DeploymentDispatcher(poll_s=0.01).wait(attempts)
    assert attempts[0].state == "CRASHED" and attempts[0].setup_error == ""  # retried as before


# --- a shard resolves only the models its stage loads (issue 18, part 5) -----------------------------------

def test_a_label_shard_resolves_only_its_teacher_with_the_pipelines_fingerprint(tmp_path, monkeypatch):
    from gplflow.flows import models
    from gplflow.flows.stages import Run

    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", DOCS)
    write_artifact(store, "queries", [(f"q{i}", f"d{i}", f"what about topic {i % 3}") for i in range(10)])
    write_artifact(store, "negatives", [(f"q{i}", "m", [f"d{(i + 1) % 10}"], [0.5]) for i in range(10)])
    cfg = PipelineConfig.from_dict({
        "profile": "tiny", "corpus": {"path": "docs"}, "label": {"teacher": "bi_encoder"},
        "models": {"generator": "gen/never-loaded", "cross_encoder": "ce/never-loaded", "base": "base/never-loaded",
                   "bi_encoder_teacher": "teacher/used", "retrievers": [{"name": "m", "score": "dot"}]}})
    resolved: list[str] = []
    monkeypatch.setattr(models, "packaged", lambda ref: resolved.append(ref) or ref)
    label = shards.shard_stage("label")

    on_worker = label.inputs(Run.from_store(cfg, str(store.root)))
    assert resolved == ["teacher/used"]  # not the generator, the cross-encoder, the base nor the miners
    pipeline = Run(cfg, str(store.root), Run.from_store(cfg, str(store.root)).fps,
                   resolved=models.resolve_models(cfg, store))  # what the pipeline's prepare_models resolves
    assert on_worker.teacher == "teacher/used" and on_worker.fingerprint() == label.inputs(pipeline).fingerprint()
