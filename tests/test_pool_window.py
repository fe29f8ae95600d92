"""Pool mode at scale, without a server: the window of shard runs in flight, batched reads of their states,
cancellation on the way out, and the per-device concurrency limits of shards and training (issue 18, part 5).

The real thing (a server, a deployment, two workers) is tests/test_pool_server.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from types import SimpleNamespace
from uuid import uuid4

import pytest
from artifact_rows import write_artifact
from stage_calls import GenerateJob

from gplflow.adapters.store import ArtifactStore
from gplflow.flows import shards
from gplflow.flows.config import ConfigError, ExecutionConfig, PipelineConfig
from gplflow.tasks.generate import GenerateConfig

DOCS = [(f"d{i}", "", f"Passage {i} is about topic {i % 3}. It has a second sentence.") for i in range(12)]


@pytest.fixture()
def job(tmp_path) -> GenerateJob:
    store = ArtifactStore(tmp_path / "run")
    write_artifact(store, "corpus", DOCS)
    cfg = GenerateConfig(method="extractive", queries_per_passage=1, seed=1)
    return GenerateJob(cfg, store, store.require("corpus"), "", shard_size=1)  # 12 shards


class ClockedPool:
    """Runs on a fake clock: shard k takes ``duration(k)`` ticks once submitted; the pool computes
    ``slots(now)`` runs at once (workers come and go). ``poll`` jumps to the next finish."""

    def __init__(self, job, duration, slots):
        self.job, self.duration, self.slots = job, duration, slots
        self.now, self.running, self.finished = 0.0, {}, 0
        self.peak, self.cancelled = 0, []

    def capacity(self) -> int:
        return self.slots(self.now)

    def submit(self, shard: int, parameters: dict) -> shards.Attempt:
        assert len(self.running) < self.capacity(), f"shard {shard} submitted with {len(self.running)} in flight " \
                                                    f"on a pool of {self.capacity()} at t={self.now}"
        attempt = shards.Attempt(shard, uuid4(), f"generate shard {shard}", submitted=self.now)
        self.running[attempt.run_id] = (attempt, self.now + self.duration(shard))
        self.peak = max(self.peak, len(self.running))
        return attempt

    def poll(self, attempts):
        remaining = self.job.n_shards - self.finished
        # the window is kept full: as many in flight as the pool computes, while shards are left
        assert len(self.running) >= min(self.capacity(), remaining), f"idle slots at t={self.now}"
        self.now = min(end for _, end in self.running.values())
        done = [a for a, end in self.running.values() if end <= self.now]
        for attempt in done:
            del self.running[attempt.run_id]
            self.job.run_shard(attempt.shard)
            attempt.state = "COMPLETED"
        self.finished += len(done)
        return done

    def cancel(self, attempts, why):
        self.cancelled.extend(a.shard for a in attempts)
        return []


def test_never_more_shard_runs_in_flight_than_the_pool_computes(job):
    pending = job.prepare()

    def slots(now: float) -> int:  # three workers, then one (two went away), then four
        return 3 if now < 3 else 1 if now < 6 else 4

    pool = ClockedPool(job, duration=lambda k: 1 + (k * 7) % 4, slots=slots)
    peak = shards.run_shards(job, pending, pool, {"stage": "generate"}, ExecutionConfig(shard_retries=0))
    assert pool.finished == 12 and job.staging.pending(job.n_shards) == []
    assert peak == pool.peak == 4  # the window grew with the pool, and never past it (asserted at each submit)
    assert job.publish().rows == 12


def test_an_explicit_max_in_flight_bounds_the_window(job):
    pool = ClockedPool(job, duration=lambda k: 1, slots=lambda now: 100)
    dispatcher = shards.DeploymentDispatcher(max_in_flight=2)
    pool.slots = lambda now: dispatcher.capacity()  # the dispatcher's answer, without any API call
    assert shards.run_shards(job, job.prepare(), pool, {"stage": "generate"}, ExecutionConfig()) == 2


def test_max_in_flight_is_validated_naming_the_field():
    base = ["corpus.path=corpus.jsonl"]
    assert PipelineConfig.load(None, base).execution.max_in_flight == "auto"
    assert PipelineConfig.load(None, [*base, "execution.max_in_flight=6"]).execution.max_in_flight == 6
    for bad in ("0", "-2", "many", "true"):
        with pytest.raises(ConfigError, match=r"'execution\.max_in_flight'"):
            PipelineConfig.load(None, [*base, f"execution.max_in_flight={bad}"])


def test_an_interrupt_cancels_the_shard_runs_in_flight(job):
    class Interrupting(ClockedPool):
        def poll(self, attempts):
            if self.now >= 2:
                raise KeyboardInterrupt
            return super().poll(attempts)

    pool = Interrupting(job, duration=lambda k: 1, slots=lambda now: 3)
    with pytest.raises(KeyboardInterrupt):
        shards.run_shards(job, job.prepare(), pool, {"stage": "generate"}, ExecutionConfig())
    assert sorted(pool.cancelled) == [6, 7, 8]  # exactly the runs in flight at the interrupt
    assert job.staging.pending(job.n_shards) == list(range(6, 12))  # the finished ones stay for the rerun


# --- the dispatcher against a fake API client --------------------------------------------------------------

def _run(run_id, state: str, start_time=None):
    final = state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    return SimpleNamespace(id=run_id, start_time=start_time, labels={}, infrastructure_pid=None,
                           state=SimpleNamespace(type=SimpleNamespace(value=state), message="",
                                                 is_final=lambda: final))


class FakeClient:
    """The API calls the dispatcher makes, answered from memory, each counted."""

    def __init__(self, runs, workers: int = 2, slow_s: float = 0.0):
        self.runs, self.workers, self.slow_s = {r.id: r for r in runs}, workers, slow_s
        self.calls: list[str] = []
        self.cancelled: list[tuple[object, str]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_flow_runs(self, flow_run_filter, limit=None):
        self.calls.append("read_flow_runs")
        return [self.runs[i] for i in flow_run_filter.id.any_ if i in self.runs][:limit]

    def read_workers_for_work_pool(self, work_pool_name, worker_filter=None):
        self.calls.append("read_workers")
        return [object()] * self.workers

    def set_flow_run_state(self, run_id, state, force=False):
        self.calls.append("set_flow_run_state")
        if self.slow_s:
            time.sleep(self.slow_s)
            import httpx

            raise httpx.ReadTimeout("the server is busy")
        self.cancelled.append((run_id, state.type.value))


@pytest.fixture()
def api(monkeypatch):
    import prefect.client.orchestration as orchestration

    holder = SimpleNamespace(client=None)
    monkeypatch.setattr(orchestration, "get_client", lambda sync_client=False, **kw: holder.client)
    return holder


def test_one_query_reads_every_run_in_flight(api):
    runs = [_run(uuid4(), "COMPLETED" if k % 2 else "RUNNING", start_time=1.0) for k in range(40)]
    api.client = FakeClient(runs)
    attempts = [shards.Attempt(k, r.id, f"label shard {k}") for k, r in enumerate(runs)]
    finished = shards.DeploymentDispatcher(poll_s=0.01).poll(attempts)
    assert sorted(a.shard for a in finished) == list(range(1, 40, 2))
    assert api.client.calls == ["read_flow_runs"]  # one request for 40 runs, not one each


def test_idle_polls_back_off_and_a_change_resets_the_pause(api, monkeypatch):
    runs = [_run(uuid4(), "RUNNING", start_time=1.0) for _ in range(250)]
    api.client = FakeClient(runs)
    attempts = [shards.Attempt(k, r.id, f"label shard {k}") for k, r in enumerate(runs)]
    pauses: list[float] = []
    monkeypatch.setattr(shards.time, "sleep", pauses.append)
    dispatcher = shards.DeploymentDispatcher(poll_s=0.5)
    for _ in range(6):
        assert dispatcher.poll(attempts) == []
    assert pauses == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]  # doubling up to MAX_POLL_S while nothing changes
    assert api.client.calls == ["read_flow_runs"] * 12  # 250 runs: two pages of at most 200 per poll
    runs[7].state.type.value, runs[7].state.is_final = "COMPLETED", lambda: True
    assert [a.shard for a in dispatcher.poll(attempts)] == [7]
    del attempts[7]  # run_shards takes a finished run out of those in flight
    assert dispatcher.poll(attempts) == [] and pauses[-1] == 0.5  # the pause starts again from poll_s


def test_a_cancelled_pipeline_stops_and_cancels_its_shard_runs(api, job):
    parent = _run(uuid4(), "CANCELLING")
    api.client = FakeClient([parent])
    dispatcher = shards.DeploymentDispatcher(poll_s=0.01, max_in_flight=3, parent=parent.id)

    def submit(shard, parameters):
        run = _run(uuid4(), "RUNNING", start_time=1.0)
        api.client.runs[run.id] = run
        return shards.Attempt(shard, run.id, f"generate shard {shard}", state="RUNNING")

    dispatcher.submit = submit
    with pytest.raises(shards.PoolRunError, match=r"flow run .* was cancelled"):
        shards.run_shards(job, job.prepare(), dispatcher, {"stage": "generate"}, ExecutionConfig())
    assert [state for _, state in api.client.cancelled] == ["CANCELLING"] * 3  # the three in flight, via workers
    assert api.client.calls.count("read_flow_runs") == 1


def test_auto_capacity_is_the_online_workers_read_at_most_every_ttl(api):
    api.client = FakeClient([], workers=3)
    dispatcher = shards.DeploymentDispatcher()
    assert [dispatcher.capacity() for _ in range(5)] == [3] * 5
    assert api.client.calls == ["read_workers"]
    api.client.workers = 0
    dispatcher._workers = (time.monotonic() - dispatcher.WORKERS_TTL_S - 1, 3)
    assert dispatcher.capacity() == 1  # no worker online yet: one run waits for the first


def test_cancelling_on_a_slow_api_is_bounded(api, caplog):
    api.client = FakeClient([], slow_s=0.3)
    dispatcher = shards.DeploymentDispatcher()
    dispatcher.CANCEL_BUDGET_S = 0.5
    attempts = [shards.Attempt(k, uuid4(), f"label shard {k}", state="RUNNING") for k in range(20)]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gplflow.flows.shards"):
        left = dispatcher.cancel(attempts, "interrupted")
    assert time.monotonic() - started < 2.0  # not 20 requests x a request timeout
    assert api.client.calls.count("set_flow_run_state") <= 3 and len(left) == 20
    assert "could not cancel 20 shard runs in time" in caplog.text


# --- devices: the gpu:<host>:<device> limits ---------------------------------------------------------------

@pytest.fixture()
def limits(monkeypatch):
    """Records the limits taken, in order with the events the test adds; no API."""
    events: list[object] = []

    @contextlib.contextmanager
    def concurrency(names, occupy=1, strict=False):
        events.append(("take", names))
        yield
        events.append(("release", names))

    monkeypatch.setattr(shards, "concurrency", concurrency)
    monkeypatch.setattr(shards, "device_limits", lambda devices: [shards.limit_name(d) for d in devices])
    return events


def test_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert shards.visible_devices() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert shards.visible_devices() == ["all"]  # no GPU: the CPU stands in for one device


def test_a_shard_on_a_worker_with_several_gpus_takes_one_and_is_pinned_to_it(monkeypatch, limits):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with shards.device_slot(shard=3) as device:
        assert device == "5" and os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"  # as it was after the shard
    assert limits == [("take", shards.limit_name("5")), ("release", shards.limit_name("5"))]


def test_training_in_pool_mode_holds_every_device_it_trains_on(monkeypatch, limits):
    from gplflow.flows.stages import STAGES

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    stage = {s.name: s for s in STAGES}
    cfg = PipelineConfig.load(None, ["corpus.path=c.jsonl", "execution.mode=pool", "train.devices=2",
                                     "train.batch_size=4"])
    with shards.devices_held(cfg, stage["train"]) as held:
        assert held == [shards.limit_name("0"), shards.limit_name("1")]
    assert limits == [("take", held), ("release", held)]  # both at once: one request, all or none
    every = PipelineConfig.load(None, ["corpus.path=c.jsonl", "execution.mode=pool", "train.batch_size=6"])
    with shards.devices_held(every, stage["train"]) as held:  # train.devices auto: every GPU the worker sees
        assert held == [shards.limit_name(d) for d in ("0", "1", "2")]
    limits.clear()
    for name in ("label", "evaluate"):  # not training: nothing held
        with shards.devices_held(cfg, stage[name]) as held:
            assert held == []
    local = PipelineConfig.load(None, ["corpus.path=c.jsonl", "train.devices=2", "train.batch_size=4"])
    with shards.devices_held(local, stage["train"]) as held:
        assert held == []
    assert limits == []


def test_training_gives_its_devices_back_while_its_rounds_shards_run(monkeypatch, limits):
    from gplflow.flows.stages import STAGES

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(shards, "_logger", lambda: logging.getLogger("test"))
    train = next(s for s in STAGES if s.name == "train")
    cfg = PipelineConfig.load(None, ["corpus.path=c.jsonl", "execution.mode=pool"])
    with shards.devices_held(cfg, train) as held:
        with shards.devices_released():  # a re-mining round's shards, on the pool (and maybe on this GPU)
            limits.append("round shards")
        limits.append("training")
    assert limits == [("take", held), ("release", held), "round shards", ("take", held), "training",
                      ("release", held)]
    limits.clear()
    with shards.devices_released():  # nothing held: nothing to give back
        pass
    assert limits == []


def test_a_shard_resolves_its_inputs_only_once_it_holds_its_device(monkeypatch, limits):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")

    class Job:
        n_shards = 2

        def __init__(self, inputs):
            limits.append("job")
            self.staging = SimpleNamespace(record=lambda k: None)

        def check_shard(self, k):
            pass

        def run_shard(self, k):
            limits.append("run")
            return {"rows": 3}

    def inputs(run):
        limits.append("inputs")  # models are resolved (built, loaded) here
        return object()

    monkeypatch.setattr(shards, "shard_stage", lambda name: SimpleNamespace(name=name, inputs=inputs, job=Job))
    monkeypatch.setattr(shards, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(shards, "_label_flow_run", lambda: None)
    monkeypatch.setattr(shards.Run, "from_store", classmethod(lambda cls, cfg, run_dir: None))
    record = shards.shard_flow.fn("label", "run", 1, overrides=["corpus.path=c.jsonl"])
    name = shards.limit_name("0")
    assert record == {"rows": 3}
    assert limits == [("take", name), "inputs", "job", "run", ("release", name)]
