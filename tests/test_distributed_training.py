"""Every training of gplflow on several devices (issue 18): pretraining, the Augmented SBERT cross-encoder and the
training on labelled (gold + silver) pairs, each as a torchrun job of 2 gloo processes on the CPU against one
process with the same global batch. Pretraining and the pairs resume a one-process checkpoint under two processes;
the cross-encoder's job spans two "hosts" (two launchers on loopback). The models have no dropout (each process
draws its own masks), so one process and two must agree."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from artifact_rows import write_artifact
from sentence_transformers import SentenceTransformer
from sentence_transformers.cross_encoder import CrossEncoder
from stage_calls import pretrain_fingerprint, run_cross_encoder, run_pretrain, run_train_pairs
from test_train import PASSAGES, QUERIES, _passage

from gplflow.adapters import distributed, pretraining
from gplflow.adapters.checkpoints import folder as checkpoint_folder
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.tiny_models import build_tiny_models
from gplflow.flows.config import ConfigError, PipelineConfig
from gplflow.tasks.augment import AugmentConfig, CrossEncoderTrainConfig
from gplflow.tasks.pretrain import PretrainConfig
from gplflow.tasks.train import TrainConfig

pytestmark = pytest.mark.usefixtures("cpu_devices")  # CPU processes stand in for devices

TEXTS = [_passage(doc_id) for doc_id, _, _ in PASSAGES]


def _without_dropout(built: Path, folder: Path) -> Path:
    shutil.copytree(built, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """The tiny bi-encoder and cross-encoder without dropout."""
    texts = TEXTS + [q for _, _, q in QUERIES]
    built = build_tiny_models(texts, tmp_path_factory.mktemp("tiny-models"), seed=0)
    root = tmp_path_factory.mktemp("no-dropout")
    return SimpleNamespace(bi_encoder=_without_dropout(built.bi_encoder, root / "bi-encoder"),
                           cross_encoder=_without_dropout(built.cross_encoder, root / "cross-encoder"))


def _embed(model_dir: Path | str, texts: list[str]) -> np.ndarray:
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return model.encode(texts, convert_to_numpy=True, batch_size=16)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _losses(artifact, key: str = "train") -> list[float]:
    return [loss for _, loss in artifact.manifest[key]["loss_history"]]


# --- pretraining ----------------------------------------------------------------------------------------------

CT_INBATCH = {"method": "ct_inbatch", "steps": 6, "batch_size": 8, "learning_rate": 1e-3, "max_seq_length": 32,
              "seed": 0, "log_every": 1, "checkpoint_every": 2}


def _corpus(root: Path):
    store = ArtifactStore(root)
    return store, write_artifact(store, "corpus", PASSAGES)


class _Stop(RuntimeError):
    pass


@pytest.fixture(scope="module")
def ct_inbatch(tiny, tmp_path_factory) -> SimpleNamespace:
    """ct_inbatch pretraining in one process; and in one process stopped after its checkpoint of step 2, then
    resumed as a torchrun job of 2."""
    cfg, base = PretrainConfig(**CT_INBATCH), str(tiny.bi_encoder)
    one = run_pretrain(cfg.model_copy(update={"devices": 1}), *_corpus(tmp_path_factory.mktemp("one") / "run"), base)
    store, corpus = _corpus(tmp_path_factory.mktemp("two") / "run")

    def stop(step, total, loss):
        if step == 3:
            raise _Stop("stopped")

    with pytest.raises(_Stop):
        run_pretrain(cfg.model_copy(update={"devices": 1}), store, corpus, base, on_progress=stop)
    checkpoint = Path(store.root) / ".checkpoints" / f"pretrain-{pretrain_fingerprint(cfg, corpus.fingerprint, base)}"
    whole, halves = _step_losses(tiny.bi_encoder, checkpoint / "checkpoint-2.pt", step=2)
    seen = []
    two = run_pretrain(cfg.model_copy(update={"devices": 2}), store, corpus, base,
                       on_progress=lambda step, total, loss: seen.append((step, total)))
    return SimpleNamespace(one=one, two=two, whole=whole, halves=halves, seen=seen, checkpoint=checkpoint)


def _step_losses(base: Path, checkpoint: Path, step: int) -> tuple[float, float]:
    """ct_inbatch's loss on the batch of ``step`` at the weights of ``checkpoint``: over the whole batch, and as the
    mean of its two halves each with only its own half as negatives (2 processes without gathering)."""
    cfg = PretrainConfig(**CT_INBATCH)
    texts = [text for _, _, text in PASSAGES]  # the sentence methods read the text, not the title
    sentences = pretraining.sentences(texts, cfg.min_sentence_words, lambda name, n: None)
    examples, _ = pretraining.reservoir_sample(sentences, cfg.steps * cfg.batch_size, cfg.seed)
    rows = [examples[i] for i in pretraining._batch(len(examples), cfg, step, {})]
    objective = pretraining.ContrastiveTension(SentenceTransformer(str(base), device="cpu"), cfg, "cpu", "mean")
    objective.module.load_state_dict(torch.load(checkpoint, weights_only=True)["module"])
    with torch.no_grad():
        whole = objective.loss(rows, 0).item()
        halves = [objective.loss(rows[i : i + 4], 0).item() for i in (0, 4)]
    return whole, float(np.mean(halves))


@pytest.mark.serial
@pytest.mark.slow
def test_pretraining_resumed_on_two_processes_trains_the_one_process_model_with_the_global_batch_as_negatives(
        ct_inbatch, tiny):
    info = ct_inbatch.two.manifest["pretrain"]
    assert (info["resumed_from_step"], info["steps"], info["world_size"], len(info["devices"])) == (2, 6, 2, 2)
    assert ct_inbatch.seen == [(step, 6) for step in range(3, 7)]  # rank 0's progress, told to this process
    one, two = _losses(ct_inbatch.one, "pretrain"), _losses(ct_inbatch.two, "pretrain")
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-3)  # steps 3-6 on 2 processes: the one-process losses
    # step 3's loss, the first on 2 processes, is the loss over the whole batch, not over each half alone
    assert two[2] == pytest.approx(ct_inbatch.whole, rel=1e-4)
    assert abs(ct_inbatch.whole - ct_inbatch.halves) > 0.05 * ct_inbatch.whole
    embedded = [_embed(a.local_dir(), TEXTS) for a in (ct_inbatch.one, ct_inbatch.two)]
    assert _cosines(*embedded).min() >= 0.999
    assert _cosines(_embed(tiny.bi_encoder, TEXTS), embedded[0]).min() < 0.99  # training moved the model
    assert ct_inbatch.one.manifest["pretrain"]["world_size"] == 1
    assert ct_inbatch.two.fingerprint == ct_inbatch.one.fingerprint  # the device count is not in it
    assert not ct_inbatch.checkpoint.exists()


@pytest.mark.serial
@pytest.mark.slow
@pytest.mark.parametrize("method", ["tsdae", "mlm", "simcse"])
def test_each_pretraining_on_two_processes_gives_the_one_process_losses(tiny, tmp_path, method):
    """The other pretraining methods as torchrun jobs of 2 (ct_inbatch above): the same losses, step by step, as one
    process with the same global batch (the tiny models have no dropout, so SimCSE's two views are alike: this
    checks the gathered in-batch negatives and the data order, not dropout's noise)."""
    cfg = PretrainConfig(**{**CT_INBATCH, "method": method, "steps": 4})
    base = str(tiny.bi_encoder)
    one = run_pretrain(cfg.model_copy(update={"devices": 1}), *_corpus(tmp_path / "one" / "run"), base)
    two = run_pretrain(cfg.model_copy(update={"devices": 2}), *_corpus(tmp_path / "two" / "run"), base)
    assert two.manifest["pretrain"]["world_size"] == 2 and one.manifest["pretrain"]["world_size"] == 1
    assert len(_losses(one, "pretrain")) == 4
    assert _losses(two, "pretrain") == pytest.approx(_losses(one, "pretrain"), rel=1e-3)


@pytest.mark.parametrize("method", ["tsdae", "mlm", "ct"])
def test_each_process_weights_its_slice_so_the_mean_is_the_one_process_loss(tiny, method):
    """TSDAE and MLM average over tokens and CT sums over pairs: the ranks' weighted losses (as DDP averages their
    gradients) make the loss of the whole batch, noise and masks drawn as one process draws them."""
    cfg = PretrainConfig(method=method, steps=2, batch_size=8, max_seq_length=32, seed=0, ct_negatives=3)
    base = SentenceTransformer(str(tiny.bi_encoder), device="cpu")
    texts = [text for _, _, text in PASSAGES] + [query for _, _, query in QUERIES]  # CT takes 14 sentences a step
    if method == "mlm":
        objective = pretraining.MaskedLM(base, cfg.mlm_probability, "cpu", "mean")
        examples = pretraining.mlm_chunks(base.tokenizer, TEXTS, 12, lambda name, n: None)
    else:
        objective = pretraining._sentence_objective(cfg, base, "cpu", "mean" if method == "ct" else "cls")
        examples = list(pretraining.sentences(texts, 3, lambda name, n: None))
    rows = examples[: pretraining.rows_per_step(cfg)]
    assert len(rows) == pretraining.rows_per_step(cfg)  # a whole batch, as a job of several processes requires
    objective.module.eval()  # no dropout
    with torch.no_grad():
        whole = objective.loss(rows, 11).item()
        parts = [objective.loss(rows, 11, pretraining.Part(rank, 2)).item() for rank in (0, 1)]
    assert np.mean(parts) == pytest.approx(whole, rel=1e-5)
    assert abs(parts[0] - parts[1]) > 1e-3  # the slices differ: the check above is not trivially met


def test_a_pretrain_batch_that_does_not_divide_is_a_config_error():
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size 6 does not divide over 4 devices"):
        PipelineConfig.load(None, ["corpus.path=x.jsonl", "pretrain.batch_size=6", "pretrain.devices=4"])
    with pytest.raises(ConfigError, match=r"augment\.cross_encoder\.batch_size 15 does not divide over 2 devices"):
        PipelineConfig.load(None, ["corpus.path=x.jsonl", "augment.cross_encoder.batch_size=15",
                                   "augment.cross_encoder.devices=2"])
    assert len({pretrain_fingerprint(PretrainConfig(method="mlm", devices=n), "c", "b") for n in (1, 2, "auto")}) == 1


# --- the cross-encoder ----------------------------------------------------------------------------------------

def _scored_pairs() -> list[dict]:
    """Each query with its passage (1.0) and with another (0.0): 48 gold pairs."""
    rows = []
    for i, (_, doc_id, query) in enumerate(QUERIES):
        other = PASSAGES[(int(doc_id[1:]) + 1 + i % 5) % len(PASSAGES)][0]
        rows += [{"sentence1": query, "sentence2": _passage(doc_id), "score": 1.0},
                 {"sentence1": query, "sentence2": _passage(other), "score": 0.0}]
    return rows


CROSS = CrossEncoderTrainConfig(steps=6, batch_size=8, learning_rate=2e-3, warmup_ratio=0.0, max_seq_length=64,
                                seed=3)


@pytest.mark.serial  # a torchrun job: run alone, not beside a busy worker
@pytest.mark.slow
def test_the_cross_encoder_trained_across_two_hosts_is_the_one_process_cross_encoder(tiny, tmp_path, monkeypatch):
    """Two launchers of one process each on loopback stand in for two hosts: this process runs the stage, which
    launches its job through a c10d rendezvous; a second process joins it from the run directory
    (``python -m gplflow.adapters.distributed join RUN_DIR``), as another host would."""
    store = ArtifactStore(tmp_path / "one")
    cfg = AugmentConfig(cross_encoder=CROSS.model_copy(update={"devices": 1}))
    one = run_cross_encoder(cfg, store, str(tiny.cross_encoder), write_artifact(store, "pairs", _scored_pairs()))

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv(distributed.NNODES_ENV, "2")
    monkeypatch.setenv(distributed.ENDPOINT_ENV, f"127.0.0.1:{port}")
    store = ArtifactStore(tmp_path / "two")
    pairs = write_artifact(store, "pairs", _scored_pairs())
    joiner = subprocess.Popen([sys.executable, "-m", distributed.WORKER, "join", str(store.root)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        two = run_cross_encoder(cfg, store, str(tiny.cross_encoder), pairs)
        output, _ = joiner.communicate(timeout=60)
    finally:
        joiner.kill()
    assert joiner.returncode == 0, output[-3000:]

    assert len(_losses(one)) == 6 and _losses(two) == pytest.approx(_losses(one), rel=1e-3)
    texts = [(row["sentence1"], row["sentence2"]) for row in _scored_pairs()]
    scores = [CrossEncoder(str(a.local_dir()), device="cpu").predict(texts, show_progress_bar=False)
              for a in (one, two)]
    np.testing.assert_allclose(scores[1], scores[0], atol=2e-3)
    assert two.manifest["train"]["gold_fit"]["after"]["bce"] < two.manifest["train"]["gold_fit"]["before"]["bce"]
    assert two.manifest["train"]["world_size"] == 2 and len(two.manifest["train"]["devices"]) == 2
    assert one.manifest["train"]["world_size"] == 1
    assert two.fingerprint == one.fingerprint
    assert not checkpoint_folder(store, "cross-encoder", two.fingerprint).exists()  # the job folder is gone


# --- gold + silver pairs, and resuming under another device count -----------------------------------------------

PAIRS = {"loss": "cosent", "steps": 6, "batch_size": 8, "learning_rate": 2e-3, "warmup_steps": 0, "seed": 5,
         "max_seq_length": 32, "checkpoint_every": 2}


def _stop_at(step: int):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Stop(f"stopped at step {step}")

    return StopAt()


def _gold_and_silver(root: Path):
    store = ArtifactStore(root)
    rows = _scored_pairs()
    pairs = write_artifact(store, "pairs", rows[:40])
    silver = write_artifact(store, "silver", [{**row, "score": 0.9 * row["score"] + 0.05, "sampler": "bm25"}
                                              for row in rows[40:]])
    return store, pairs, silver


@pytest.mark.serial  # a torchrun job: run alone, not beside a busy worker
@pytest.mark.slow
def test_gold_and_silver_training_stopped_in_one_process_resumes_under_two_and_ends_as_one_process_does(
        tiny, tmp_path):
    """The supervised / gold+silver path (run_train_pairs) as a torchrun job, resuming a one-process checkpoint:
    CoSENT ranks every pair of the batch against every other, so it gathers the ranks' embeddings."""
    store, pairs, silver = _gold_and_silver(tmp_path / "one")
    one = run_train_pairs(TrainConfig(**PAIRS, devices=1), store, str(tiny.bi_encoder), pairs, silver=silver)
    store, pairs, silver = _gold_and_silver(tmp_path / "resumed")
    with pytest.raises(_Stop):
        run_train_pairs(TrainConfig(**PAIRS, devices=1), store, str(tiny.bi_encoder), pairs, [_stop_at(3)], silver)
    assert store.load("model") is None
    two = run_train_pairs(TrainConfig(**PAIRS, devices=2), store, str(tiny.bi_encoder), pairs, silver=silver)
    info = two.manifest["train"]
    assert (info["resumed_from_step"], info["steps"], info["steps_this_run"]) == (2, 6, 4)
    assert info["world_size"] == 2 and info["examples"] == 48
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-3)  # each step's loss over the global batch
    embedded = [_embed(a.local_dir(), TEXTS) for a in (one, two)]
    assert _cosines(*embedded).min() >= 0.999
    assert _cosines(_embed(tiny.bi_encoder, TEXTS), embedded[0]).min() < 0.99  # training moved the model
    assert two.fingerprint == one.fingerprint


@pytest.mark.serial  # two torchrun launchers: run alone, not beside a busy worker
@pytest.mark.parametrize("rank_0_on", ["joining host", "launching host"])
def test_the_launcher_sees_rank_0s_progress_wherever_rank_0_runs(rank_0_on, tmp_path, monkeypatch):
    """Across hosts torchrun may give rank 0 to a host that joined: its events reach the launcher through the
    job folder every host mounts (before, the Prefect task then saw no step). Two launchers on loopback stand in
    for two hosts; torchrun orders hosts by address, so the one that says 127.0.0.1 gets rank 0 (the other is
    ``localhost``)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv(distributed.NNODES_ENV, "2")
    monkeypatch.setenv(distributed.ENDPOINT_ENV, f"127.0.0.1:{port}")
    helpers = str(Path(__file__).parent)
    first, other = ({"PET_LOCAL_ADDR": "127.0.0.1"}, {"PET_LOCAL_ADDR": "localhost"})
    joiner_env, launcher_env = (first, other) if rank_0_on == "joining host" else (other, first)
    job = tmp_path / "run" / ".checkpoints" / "count-0" / "job"
    joiner = subprocess.Popen([sys.executable, "-m", distributed.WORKER, "join", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, **joiner_env, "PYTHONPATH": helpers})
    seen: list[dict] = []
    try:
        distributed.launch(job, 1, "job_targets:count_steps", {"steps": 5}, what="count", on_event=seen.append,
                           env={**launcher_env, "PYTHONPATH": helpers})
        output, _ = joiner.communicate(timeout=60)
    finally:
        joiner.kill()
    assert joiner.returncode == 0, output[-3000:]
    # the test's premise: rank 0 ran where it was meant to
    assert ("[rank 0] counted 5 steps" in output) == (rank_0_on == "joining host"), output[-3000:]
    assert seen == [{"step": 0, "max_steps": 5}, *({"step": s} for s in range(1, 6))]  # each once, in order
