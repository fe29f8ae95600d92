"""Training on several devices (issue 18): torchrun with 2 gloo processes on the CPU stands in for 2 GPUs
(``train.devices: 2`` is honoured on a CPU). One killed-and-resumed MarginMSE job and one MNRL job are shared by
the assertions; the base model has no dropout, so one process and two must give the same weights."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pyarrow as pa
import pytest
import torch
from artifact_rows import write_artifact
from stage_calls import run_train, train_fingerprint, train_inputs
from test_train import PASSAGES, QUERIES, _passage, _triples

from gplflow.adapters import distributed
from gplflow.adapters.checkpoints import folder as checkpoint_folder
from gplflow.adapters.errors import InputError
from gplflow.adapters.metrics import evaluate_run, mean_metrics
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.flows.config import ConfigError, PipelineConfig
from gplflow.tasks.train import TrainConfig

# timing-sensitive (signals, kills, races): run alone, not beside a busy worker; CPU processes stand in for devices
pytestmark = [pytest.mark.serial, pytest.mark.usefixtures("cpu_devices")]

WORKER = "gplflow.adapters.distributed"  # in every rank's command line
SETTINGS = {"steps": 24, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 2, "seed": 7, "max_seq_length": 64,
            "checkpoint_every": 2}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny bi-encoder without dropout (dropout draws its masks per process: one process and two differ)."""
    texts = [f"{title} {text}" for _, title, text in PASSAGES] + [q for _, _, q in QUERIES]
    built = build_tiny_models(texts, tmp_path_factory.mktemp("tiny-models"), seed=0).bi_encoder
    folder = tmp_path_factory.mktemp("no-dropout") / "bi-encoder"
    shutil.copytree(built, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _store(root: Path, queries: list[tuple[str, str, str]] = QUERIES) -> ArtifactStore:
    store = ArtifactStore(root)
    for stage, rows in (("corpus", PASSAGES), ("queries", queries), ("triples", _triples())):
        write_artifact(store, stage, rows)
    return store


def _train(store: ArtifactStore, base: Path, **overrides):
    cfg = TrainConfig(**{**SETTINGS, **overrides})
    triples = store.require("triples") if cfg.loss == "margin_mse" else None
    return run_train(cfg, store, str(base), store.require("corpus"), store.require("queries"), triples)


def _ranks() -> list[psutil.Process]:
    """This test process's descendants that are ranks of a distributed job."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if _is_rank(child):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def _is_rank(process: psutil.Process) -> bool:
    command = " ".join(process.cmdline())
    return WORKER in command and "torch.distributed.run" not in command


def _kill_rank_after(checkpoint: Path, rank: int, deadline_s: float = 300.0) -> threading.Thread:
    """A thread that SIGKILLs rank ``rank`` once ``checkpoint`` is complete (its trainer_state.json written)."""

    def watch() -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if (checkpoint / "trainer_state.json").is_file():
                for process in _ranks():
                    if process.environ().get("RANK") == str(rank):
                        process.kill()
                        return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def margin_mse(base, tmp_path_factory) -> SimpleNamespace:
    """MarginMSE in one process, and with 2 processes: rank 1 killed after the checkpoint of step 2, then rerun."""
    one = _train(_store(tmp_path_factory.mktemp("one") / "run"), base, devices=1)
    store = _store(tmp_path_factory.mktemp("two") / "run")
    inputs = train_inputs(TrainConfig(**SETTINGS, devices=2), store, str(base), store.require("corpus"),
                          store.require("queries"), store.require("triples"))
    checkpoints = checkpoint_folder(store, "model", inputs.fingerprint())
    killer = _kill_rank_after(checkpoints / "checkpoint-2", rank=1)
    with pytest.raises(distributed.RankFailedError) as killed:
        _train(store, base, devices=2)
    killer.join(timeout=5)
    left_after_kill = [p.pid for p in _ranks()]
    steps_before_rerun = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    two = _train(store, base, devices=2)
    return SimpleNamespace(one=one, two=two, killed=str(killed.value), left_after_kill=left_after_kill,
                           steps_before_rerun=steps_before_rerun, checkpoints=checkpoints)


def _embed(model_dir: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return model.encode(texts, convert_to_numpy=True, batch_size=16)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _ndcg(model_dir: Path) -> float:
    """nDCG@10 of the test queries over the passages (each query's passage is its one relevant document)."""
    passages = _embed(model_dir, [_passage(doc_id) for doc_id, _, _ in PASSAGES])
    queries = _embed(model_dir, [text for _, _, text in QUERIES])
    scores = queries @ passages.T
    run = {qid: {doc_id: float(scores[i, j]) for j, (doc_id, _, _) in enumerate(PASSAGES)}
           for i, (qid, _, _) in enumerate(QUERIES)}
    return mean_metrics(evaluate_run({qid: {doc_id: 1} for qid, doc_id, _ in QUERIES}, run))["ndcg@10"]


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_naming_it_and_the_rerun_resumes_from_its_checkpoint(margin_mse):
    assert margin_mse.killed == "train: rank 1 of 2 died (SIGKILL)"
    assert margin_mse.left_after_kill == []  # torchrun stopped rank 0
    assert "checkpoint-2" in margin_mse.steps_before_rerun
    info = margin_mse.two.manifest["train"]
    assert info["resumed_from_step"] >= 2 and info["steps"] == SETTINGS["steps"]
    assert info["steps_this_run"] == SETTINGS["steps"] - info["resumed_from_step"]
    assert info["world_size"] == 2 and len(info["devices"]) == 2 and info["devices"][0].endswith(":cpu")
    assert margin_mse.one.manifest["train"]["world_size"] == 1
    assert not margin_mse.checkpoints.exists()  # the published model replaces them
    assert _ranks() == []


@pytest.mark.slow
def test_two_processes_train_the_model_one_process_trains_with_the_same_global_batch(margin_mse, base):
    texts = [_passage(doc_id) for doc_id, _, _ in PASSAGES]
    one, two = _embed(margin_mse.one.local_dir(), texts), _embed(margin_mse.two.local_dir(), texts)
    assert _cosines(one, two).min() >= 0.999
    assert _cosines(_embed(base, texts), one).min() < 0.99  # training moved the model: the check above can fail
    assert round(_ndcg(margin_mse.two.local_dir()), 3) == round(_ndcg(margin_mse.one.local_dir()), 3)
    # where a model trained is not what it is: the same fingerprint, so either run's model is reused by the other
    assert margin_mse.two.fingerprint == margin_mse.one.fingerprint
    assert margin_mse.two.manifest["config"] == margin_mse.one.manifest["config"]
    history = margin_mse.one.manifest["train"]["loss_history"]
    assert margin_mse.two.manifest["train"]["loss_history"][-1] == pytest.approx(history[-1], rel=1e-3)


ONE_PER_PASSAGE = QUERIES[::2]  # 12 queries, 12 passages: batches of 4 without a duplicate positive fill 3 steps


def _first_batch_losses(base: Path, cfg: TrainConfig) -> tuple[float, float]:
    """MNRL on the first global batch the trainer's sampler draws: as one batch, and as the mean of its two halves
    each with only its own half as negatives (what 2 processes would compute without gathering)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
    from sentence_transformers.sentence_transformer import losses

    from gplflow.adapters import trainer

    queries = pa.table({"query_id": [q for q, _, _ in ONE_PER_PASSAGE], "doc_id": [d for _, d, _ in ONE_PER_PASSAGE],
                        "text": [t for _, _, t in ONE_PER_PASSAGE]})
    corpus = pa.table({"doc_id": [d for d, _, _ in PASSAGES], "title": [t for _, t, _ in PASSAGES],
                       "text": [x for _, _, x in PASSAGES]})
    rows = trainer.pairs_dataset(queries, trainer.passage_lookup(corpus))
    sampler = NoDuplicatesBatchSampler(rows, batch_size=cfg.batch_size, drop_last=False, valid_label_columns=[],
                                       generator=torch.Generator().manual_seed(cfg.seed), seed=cfg.seed)
    batch = rows[next(iter(sampler))]
    model = SentenceTransformer(str(base), device="cpu", local_files_only=True)
    model.max_seq_length = cfg.max_seq_length
    loss = losses.MultipleNegativesRankingLoss(model)

    def value(lo: int, hi: int) -> float:
        with torch.no_grad():
            features = [model.preprocess(batch[column][lo:hi]) for column in ("query", "positive")]
            return loss(features, None).item()

    half = cfg.batch_size // 2
    return value(0, cfg.batch_size), (value(0, half) + value(half, cfg.batch_size)) / 2


@pytest.fixture(scope="module")
def mnrl(base, tmp_path_factory) -> SimpleNamespace:
    settings = {"loss": "mnrl", "steps": 3, "batch_size": 4, "learning_rate": 0.0, "checkpoint_every": 1000}
    one = _train(_store(tmp_path_factory.mktemp("mnrl-one") / "run", ONE_PER_PASSAGE), base, devices=1, **settings)
    two = _train(_store(tmp_path_factory.mktemp("mnrl-two") / "run", ONE_PER_PASSAGE), base, devices=2, **settings)
    return SimpleNamespace(one=one, two=two, cfg=TrainConfig(**{**SETTINGS, **settings}))


@pytest.mark.slow
def test_mnrl_with_two_processes_takes_its_negatives_from_the_global_batch(mnrl, base):
    """With the weights frozen, each step's loss is the base model's loss on that step's global batch: 2 processes
    log the one-process losses, and the first equals MNRL over the whole first batch, not over its halves."""
    one = [loss for _, loss in mnrl.one.manifest["train"]["loss_history"]]
    two = [loss for _, loss in mnrl.two.manifest["train"]["loss_history"]]
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, rel=1e-4)
    whole, halves = _first_batch_losses(base, mnrl.cfg)
    assert one[0] == pytest.approx(whole, rel=1e-4)  # the first batch rebuilt here is the trainer's
    assert abs(whole - halves) > 0.1  # local negatives only would log a clearly different loss
    assert mnrl.two.manifest["train"]["world_size"] == 2


@pytest.mark.slow
def test_sigint_stops_the_launcher_and_every_rank(tmp_path):
    """Ctrl-C in the process that started the job ends torchrun and both ranks; no process is left."""
    script = ("import sys; from pathlib import Path; from gplflow.adapters.distributed import launch; "
              "launch(Path(sys.argv[1]), 2, 'time:sleep', 600, what='sleep')")
    # SIGINT's default handling, as a foreground command has it: a test session started in the background
    # (`make test &`) ignores SIGINT, and its children would inherit that
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "job")], start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        family: list[psutil.Process] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len([p for p in family if _is_rank(p)]) < 2:
            time.sleep(0.2)
            family = [p for p in psutil.Process(parent.pid).children(recursive=True) if p.is_running()]
        assert len([p for p in family if _is_rank(p)]) == 2, "the ranks did not start"
        parent.send_signal(signal.SIGINT)
        assert parent.wait(timeout=30) != 0
        _, alive = psutil.wait_procs(family, timeout=15)
        assert alive == []
    finally:
        if parent.poll() is None:
            parent.kill()


# --- the parts that need no job ----------------------------------------------------------------------------


def test_a_batch_that_does_not_divide_over_the_devices_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size 30 does not divide over 4 devices"):
        PipelineConfig.load(None, ["corpus.path=x.jsonl", "train.batch_size=30", "train.devices=4"])
    assert PipelineConfig.load(None, ["corpus.path=x.jsonl", "train.batch_size=32", "train.devices=4"])
    with pytest.raises(ConfigError, match=r"train\.devices"):
        PipelineConfig.load(None, ["corpus.path=x.jsonl", "train.devices=0"])


def test_the_device_count_is_not_part_of_the_fingerprint():
    fingerprints = {train_fingerprint(TrainConfig(devices=n), "base", "t", "c") for n in (1, 2, 4, "auto")}
    assert len(fingerprints) == 1
    assert train_fingerprint(TrainConfig(batch_size=16), "base", "t", "c") not in fingerprints


def test_devices_auto_is_one_process_on_a_cpu(monkeypatch):
    from gplflow.tasks.train import devices

    monkeypatch.setattr(distributed, "visible_gpus", lambda: 0)
    assert devices(TrainConfig()) == 1
    assert devices(TrainConfig(devices=2)) == 2  # the test seam: N processes stand in for N devices
    monkeypatch.setattr(distributed, "visible_gpus", lambda: 3)
    assert devices(TrainConfig(batch_size=33)) == 3
    with pytest.raises(InputError, match=r"train\.batch_size 32 does not divide over 3 devices"):
        devices(TrainConfig())
    with pytest.raises(InputError, match=r"train\.devices 4: only 3 GPUs"):
        devices(TrainConfig(devices=4))


_REPORT = """\
W1204 11:51:53.878000 28036 elastic/multiprocessing/api.py:1028] Sending process 122 closing signal SIGTERM
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
gplflow.adapters.distributed FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-04_11:51:54
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 122)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 122
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_11:51:53
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {exitcode}
  error_file: <N/A>
  traceback : {traceback}
======================================================="""


def test_the_failure_line_names_the_rank_that_caused_it(tmp_path):
    """torchrun's report as torch 2.13 prints it when rank 1 is killed: it lists rank 0 too (it stopped it)."""
    killed = _REPORT.format(exitcode="-9 (pid: 123)  (SIGKILL)", traceback="Signal 9 (SIGKILL) received by PID 123")
    # rank 0's collective failed first (its error is recorded), but rank 1 was killed: rank 1 is the cause
    (tmp_path / "rank-0.json").write_text(json.dumps({"rank": 0, "time": 1.0, "user_error": False,
                                                      "error": "RuntimeError: Connection reset by peer"}))
    assert str(distributed._failure(tmp_path, 2, "train", 1, killed.splitlines())) == \
        "train: rank 1 of 2 died (SIGKILL)"
    # rank 1 raised: the first error a rank recorded
    raised = _REPORT.format(exitcode="1 (pid: 123)", traceback="To enable traceback see: https://pytorch.org")
    (tmp_path / "rank-1.json").write_text(json.dumps({"rank": 1, "time": 0.5, "user_error": False,
                                                      "error": "OutOfMemoryError: CUDA out of memory"}))
    assert str(distributed._failure(tmp_path, 2, "train", 1, raised.splitlines())) == \
        "train: rank 1 of 2 failed: OutOfMemoryError: CUDA out of memory"
    # a user error is the same on every rank: it comes back as itself (one line, exit code 2)
    (tmp_path / "rank-1.json").write_text(json.dumps({"rank": 1, "time": 0.1, "user_error": True,
                                                      "error": "triples row 3: neg_doc_id 'x' is unknown"}))
    error = distributed._failure(tmp_path, 2, "train", 1, raised.splitlines())
    assert isinstance(error, InputError) and str(error) == "triples row 3: neg_doc_id 'x' is unknown"
    for path in tmp_path.glob("rank-*.json"):
        path.unlink()
    assert str(distributed._failure(tmp_path, 2, "train", 1, raised.splitlines())) == \
        "train: rank 1 of 2 failed (exit code 1)"
    assert str(distributed._failure(tmp_path, 2, "train", 1, ["oops"])) == "train: torchrun exited with code 1 (oops)"


def test_each_rank_marks_its_lines():
    import io

    out = io.StringIO()
    marked = distributed._Marked(out, "[rank 1] ")
    marked.write("one\ntwo")
    marked.write(" more\n\rbar 50%\r")
    assert out.getvalue() == "[rank 1] one\n[rank 1] two more\n[rank 1] \r[rank 1] bar 50%\r"
