"""Domain-adaptive pretraining of an encoder before GPL/GenQ (TSDAE, MLM, SimCSE, CT), in one small loop.

TSDAE (Wang et al. 2021) encodes a sentence with words deleted into one vector (CLS pooling) and trains a
decoder, tied to the encoder, to rebuild the original sentence from that vector alone; it is
sentence-transformers' ``DenoisingAutoEncoderLoss``, fed by this project's offline deletion noise. MLM
continues BERT-style masked-LM training on passage chunks; the encoder is then saved with mean pooling.
Unsupervised SimCSE (Gao et al. 2021) makes each sentence its own positive under two dropout masks, the
batch's other sentences its negatives (``MultipleNegativesRankingLoss`` on (s, s) pairs). Contrastive Tension
(Carlsson et al. 2021) trains two copies of the encoder to give a high dot product to identical sentences and
a low one to random pairs (``ContrastiveTensionLoss``; ``ct_inbatch``: in-batch negatives instead).

A plain loop rather than a Trainer, because TSDAE's decoder and CT's second encoder live in the loss: a
Trainer checkpoint saves the model but not them, so a resumed run would restart them from other weights.
Here a checkpoint holds everything trained (encoder and decoder, MLM head or second encoder), the optimizer,
the scheduler and the loss history. The data order, the noise, the masks and dropout are drawn from generators
seeded by (seed, step), so a resumed run takes exactly the steps the uninterrupted run would have taken.

Under torchrun (``world_size`` > 1, adapters/distributed.py) every rank draws the same global batch, its noise and
its masks, as one process would, and computes the loss of its slice (``Part``) through DistributedDataParallel,
which averages the gradients. Each slice's loss is weighted so that the ranks' mean is the one-process loss (by
its share of the target tokens for TSDAE and MLM; CT sums over its pairs), and the in-batch losses (SimCSE,
``ct_inbatch``) gather every rank's embeddings, so each sentence still has the whole global batch as negatives.
Rank 0 alone writes checkpoints, which hold the same state whatever the device count: a run resumes under another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    ContrastiveTensionLoss,
    DenoisingAutoEncoderLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Pooling
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling
from transformers import get_constant_schedule_with_warmup as constant_schedule
from transformers.utils import logging as hf_logging

from gplflow.adapters import distributed, models
from gplflow.adapters.checkpoints import by_step
from gplflow.adapters.errors import InputError
from gplflow.adapters.gathered_losses import GatheredInBatchTension
from gplflow.adapters.text import split_sentences
from gplflow.adapters.text_noise import delete_words
from gplflow.adapters.trainer import loss_summary, save_model

logger = logging.getLogger(__name__)

# TSDAE trains the CLS vector; MLM has no sentence vector: mean; the contrastive methods (None) train the
# sentence vector the base already has (mean for a plain encoder folder)
POOLING = {"tsdae": "cls", "mlm": "mean", "simcse": None, "ct": None, "ct_inbatch": None}
_KEEP_CHECKPOINTS = 2
_MAX_HISTORY = 200  # loss points kept in the manifest
MIN_CHUNK_TOKENS = 8  # MLM: a passage's last chunk shorter than this (with specials) is dropped
_TOKENIZE_BATCH = 256

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, mean loss since the last call)
Counter = Callable[[str, int], None]  # (counter name, increment)


class PretrainSettings(Protocol):
    """What the loop reads of the pretrain stage's config, passed whole (``tasks/pretrain.py`` PretrainConfig,
    whose fields hold the defaults, the bounds and what each setting means)."""

    method: str
    steps: int
    batch_size: int
    learning_rate: float
    max_seq_length: int
    seed: int
    checkpoint_every: int
    log_every: int | None
    warmup_steps: int
    noise_ratio: float
    mlm_probability: float
    min_sentence_words: int
    pooling: str | None
    scale: float
    ct_negatives: int


def rows_per_step(cfg: PretrainSettings) -> int:
    """Examples one step reads: a batch; for CT, one per pair plus a second one for each random pair."""
    if cfg.method != "ct":
        return cfg.batch_size
    identical = -(-cfg.batch_size // (cfg.ct_negatives + 1))
    return 2 * cfg.batch_size - identical


def log_every(cfg: PretrainSettings) -> int:
    """Steps between loss points and progress calls: ``log_every``, or about 100 per run when it is not set."""
    return cfg.log_every or max(1, cfg.steps // 100)


@dataclass
class PretrainReport:
    """What a pretraining run did, for the manifest."""

    method: str
    pooling: str
    steps: int
    resumed_from_step: int | None
    examples: int
    seconds: float
    loss_history: list[tuple[int, float]]
    counters: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "pooling": self.pooling,
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
            "examples": self.examples,
            "seconds": round(self.seconds, 3),
            **loss_summary(self.loss_history, _MAX_HISTORY),
        }


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step (its batch, noise, masks and dropout)."""
    return (seed * 1_000_003 + step) % (2**63)


@dataclass(frozen=True)
class Part:
    """This process's share of every global batch: slice ``rank`` of ``world`` equal slices (the whole batch in one
    process)."""

    rank: int = 0
    world: int = 1

    def of(self, features: dict[str, Any]) -> dict[str, Any]:
        """This slice of each tensor of a batch (its rows)."""
        if self.world == 1:
            return features
        return {k: v[self._rows(len(v))] if isinstance(v, torch.Tensor) else v for k, v in features.items()}

    def _rows(self, n: int) -> slice:
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def weight(self, mine: int | torch.Tensor, every: int | torch.Tensor) -> float:
        """The factor that makes a slice's mean loss over ``mine`` of the batch's ``every`` units (tokens) count as
        its share: the ranks' mean of the weighted losses is the loss over the whole batch."""
        return 1.0 if self.world == 1 else self.world * float(mine) / max(float(every), 1.0)

    def dropout_seed(self, seed: int) -> int:
        """Each rank's dropout masks its own (rank 0 keeps the one-process seed)."""
        return (seed + self.rank * 0x9E3779B97F4A7C15) % (2**63)


# --- examples ---------------------------------------------------------------------------------------------


def reservoir_sample(items: Iterable[Any], k: int, seed: int) -> tuple[list[Any], int]:
    """A seeded uniform sample of at most ``k`` items from a stream, and the stream's length.

    Pretraining sees at most steps x batch_size examples, so a corpus of millions of passages is never held.
    """
    rng = random.Random(seed)
    sample: list[Any] = []
    seen = 0
    for seen, item in enumerate(items, start=1):
        if len(sample) < k:
            sample.append(item)
        elif (j := rng.randrange(seen)) < k:
            sample[j] = item
    return sample, seen


def sentences(texts: Iterable[str], min_words: int, count: Counter) -> Iterator[str]:
    """The sentences of every text with at least ``min_words`` words (shorter ones are counted, not kept)."""
    for text in texts:
        for sentence in split_sentences(text):
            if len(sentence.split()) >= min_words:
                yield sentence
            else:
                count("short_sentences_dropped", 1)


def mlm_chunks(tokenizer: Any, passages: list[str], max_length: int, count: Counter) -> list[dict]:
    """Each passage cut into pieces of ``max_length`` tokens (special tokens included), as collator rows."""
    chunks = []
    for start in range(0, len(passages), _TOKENIZE_BATCH):
        encoded = tokenizer(passages[start : start + _TOKENIZE_BATCH], truncation=True, max_length=max_length,
                            return_overflowing_tokens=True, return_special_tokens_mask=True)
        sources = encoded["overflow_to_sample_mapping"]
        for i, ids in enumerate(encoded["input_ids"]):
            first = i == 0 or sources[i] != sources[i - 1]
            if len(ids) < MIN_CHUNK_TOKENS and not first:
                count("short_chunks_dropped", 1)
                continue
            chunks.append({"input_ids": ids, "special_tokens_mask": encoded["special_tokens_mask"][i]})
    return chunks


# --- objectives -------------------------------------------------------------------------------------------


class Objective(Protocol):
    module: torch.nn.Module  # every trained parameter, saved whole in checkpoints
    run: Callable[..., Any]  # what computes the loss: ``module``, or its DistributedDataParallel wrapper

    def loss(self, rows: list[Any], seed: int, part: Part) -> torch.Tensor:
        """The loss of this process's ``part`` of the global batch ``rows``, weighted (``Part.weight``)."""
        ...

    def save(self, folder: Path) -> None: ...


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report: a decoder or MLM head is expected to start with new weights."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _to(features: dict[str, Any], dev: str) -> dict[str, Any]:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def _with_pooling(base: SentenceTransformer, mode: str, dev: str) -> SentenceTransformer:
    """The base model's transformer module under a new pooling layer."""
    transformer = base[0]
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)
    return SentenceTransformer(modules=[transformer, pooling], device=dev)


class Tsdae:
    """Encoder (CLS pooling) + decoder tied to it; the loss is the decoder's reconstruction cross-entropy."""

    def __init__(self, base: SentenceTransformer, noise_ratio: float, dev: str, pooling: str = POOLING["tsdae"]):
        self.encoder = _with_pooling(base, pooling, dev)
        self.noise_ratio = noise_ratio
        self.dev = dev
        try:
            with _quiet_transformers():
                self.module = DenoisingAutoEncoderLoss(self.encoder, tie_encoder_decoder=True).to(dev)
        except ValueError as err:
            arch = type(self.encoder.transformers_model).__name__
            raise InputError(f"TSDAE needs an encoder that transformers can also load as a decoder (an "
                             f"*LMHeadModel: BERT, RoBERTa, ...); {arch} has none. Use pretrain method 'mlm'."
                             ) from err
        self.run = self.module

    def loss(self, rows: list[str], seed: int, part: Part = Part()) -> torch.Tensor:
        rng = random.Random(seed)
        noisy = [delete_words(sentence, self.noise_ratio, rng) for sentence in rows]
        source, target = (self.encoder.preprocess(texts) for texts in (noisy, rows))
        mine = part.of(target)
        loss = self.run([_to(part.of(source), self.dev), _to(mine, self.dev)], None)
        if part.world == 1:
            return loss
        pad = self.module.tokenizer_decoder.pad_token_id  # the loss: mean over the targets' non-pad tokens
        return loss * part.weight((mine["input_ids"][:, 1:] != pad).sum(), (target["input_ids"][:, 1:] != pad).sum())

    def save(self, folder: Path) -> None:
        save_model(self.encoder, folder)


class MaskedLM:
    """The base encoder's weights under a masked-LM head, trained on masked passage chunks."""

    def __init__(self, base: SentenceTransformer, mlm_probability: float, dev: str, pooling: str = POOLING["mlm"]):
        self.base = base
        self.dev = dev
        self.pooling = pooling
        with _quiet_transformers():
            self.module = AutoModelForMaskedLM.from_pretrained(base.transformers_model.config._name_or_path)
        base.to("cpu")  # only its modules are needed again, at save time: one encoder on the device, not two
        self.module.to(dev)
        # no seed of its own: given one, the collator draws its first batch's masks from that seed, not the step's
        self.collator = DataCollatorForLanguageModeling(base.tokenizer, mlm_probability=mlm_probability)
        self.run = self.module

    def loss(self, rows: list[dict], seed: int, part: Part = Part()) -> torch.Tensor:
        self.collator.generator = torch.Generator().manual_seed(seed)  # masks drawn per step: resumable
        batch = self.collator(rows)  # the global batch's masks, as one process draws them
        mine = part.of(batch)
        loss = self.run(**_to(mine, self.dev)).loss  # the mean over the masked tokens
        return loss if part.world == 1 else loss * part.weight((mine["labels"] != -100).sum(),
                                                              (batch["labels"] != -100).sum())

    def save(self, folder: Path) -> None:
        """Copy the trained encoder back into the base's transformer module and save it with mean pooling."""
        target = self.base.transformers_model
        missing, unexpected = target.load_state_dict(self.module.base_model.state_dict(), strict=False)
        if unexpected or any(not key.startswith("pooler.") for key in missing):
            raise RuntimeError(f"MLM encoder weights do not match the base model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        save_model(_with_pooling(self.base, self.pooling, self.dev), folder)


class SimCse:
    """Unsupervised SimCSE: each sentence against itself under another dropout mask, in-batch negatives."""

    def __init__(self, base: SentenceTransformer, scale: float, dev: str, pooling: str, world_size: int = 1):
        self.encoder = _with_pooling(base, pooling, dev)
        self.dev = dev
        self.module = MultipleNegativesRankingLoss(self.encoder, scale=scale,
                                                   gather_across_devices=world_size > 1).to(dev)
        self.run = self.module

    def loss(self, rows: list[str], seed: int, part: Part = Part()) -> torch.Tensor:
        features = _to(part.of(self.encoder.preprocess(rows)), self.dev)
        # two forward passes over the same batch: dropout (seeded per step) makes the two views differ
        return self.run([features, dict(features)], None)

    def save(self, folder: Path) -> None:
        save_model(self.encoder, folder)


def ct_pairs(rows: list[str], pairs: int, negatives: int) -> tuple[list[str], list[str]]:
    """CT's batch read from ``rows`` in order: pair i is (s, s) when i % (negatives + 1) == 0, else (s, t).

    The layout of sentence-transformers' ``ContrastiveTensionDataLoader`` (one identical pair, then
    ``negatives`` random ones), but over a batch already drawn from the seeded step, so a resumed run sees the
    same pairs. Fewer rows than the batch needs (a tiny corpus) give fewer pairs.
    """
    it = iter(rows)
    firsts, seconds = [], []
    for i in range(pairs):
        first = next(it, None)
        second = first if i % (negatives + 1) == 0 else next(it, None)
        if first is None or second is None:
            break
        firsts.append(first)
        seconds.append(second)
    return firsts, seconds


class ContrastiveTension:
    """Two copies of the encoder; ``ContrastiveTensionLoss`` on CT pairs, or in-batch negatives (``ct_inbatch``).

    sentence-transformers' losses keep the encoder they are given as ``model2``, train a deep copy as ``model1``
    beside it, and name ``model2`` the model to use after training (its CT docs: it usually does better), so
    ``model2``, this class's ``encoder``, is what is saved. For ``ct`` the labels are left to the loss: a pair is
    positive when its two token sequences are equal, so a sentence that recurs in the corpus is never pushed
    from itself. ``ct_inbatch`` learns its similarity scale (starting at ``cfg.scale``), as the loss does.
    """

    def __init__(self, base: SentenceTransformer, cfg: PretrainSettings, dev: str, pooling: str):
        self.encoder = _with_pooling(base, pooling, dev)
        self.dev = dev
        self.in_batch = cfg.method == "ct_inbatch"
        self.pairs, self.negatives = cfg.batch_size, cfg.ct_negatives
        if self.in_batch:
            self.module = GatheredInBatchTension(self.encoder, scale=cfg.scale).to(dev)
        else:
            self.module = ContrastiveTensionLoss(self.encoder).to(dev)
        self.run = self.module

    def loss(self, rows: list[str], seed: int, part: Part = Part()) -> torch.Tensor:
        if self.in_batch:
            return self.run([_to(part.of(self.encoder.preprocess(rows)), self.dev)], None)
        columns = ct_pairs(rows, self.pairs, self.negatives)
        # the loss sums over its pairs: each slice's sum counts whole (the ranks' mean is divided by their number)
        loss = self.run([_to(part.of(self.encoder.preprocess(texts)), self.dev) for texts in columns], None)
        return loss if part.world == 1 else loss * part.world

    def save(self, folder: Path) -> None:
        save_model(self.encoder, folder)  # model2 in the loss


# --- checkpoints ------------------------------------------------------------------------------------------


def _checkpoints(folder: Path) -> list[Path]:
    return by_step(folder.glob("checkpoint-*.pt"))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint (each is renamed into place once fully written, so none is partial)."""
    found = _checkpoints(folder)
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Write ``checkpoint-<step>.pt`` atomically and keep only the newest few."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{step}.pt"
    tmp = folder / f".{path.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in _checkpoints(folder)[:-_KEEP_CHECKPOINTS]:
        old.unlink()
    return path


# --- the loop ---------------------------------------------------------------------------------------------


@dataclass
class _State:
    step: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # losses since the last history point
    resumed_from: int | None = None


def _batch(n: int, cfg: PretrainSettings, step: int, cache: dict[int, np.ndarray]) -> list[int]:
    """Step ``step``'s example indices: a seeded permutation per epoch, cut into full batches."""
    size = rows_per_step(cfg)
    per_epoch = max(1, n // size)
    epoch, k = divmod(step, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    return cache[epoch][k * size : (k + 1) * size].tolist()


def _resume(folder: Path, objective: Objective, optimizer, scheduler, dev: str) -> _State:
    path = latest_checkpoint(folder)
    if path is None:
        return _State()
    saved = torch.load(path, map_location=dev, weights_only=True)
    objective.module.load_state_dict(saved["module"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    logger.info("resuming pretraining from %s (step %d)", path, saved["step"])
    history = [(int(s), float(v)) for s, v in saved["history"]]
    return _State(saved["step"], history, list(saved["window"]), resumed_from=saved["step"])


def _checkpoint(folder: Path, state: _State, objective: Objective, optimizer, scheduler) -> None:
    save_checkpoint(folder, state.step, {
        "step": state.step, "module": objective.module.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "history": state.history, "window": state.window,
    })


def _train_step(objective: Objective, examples: list, cfg: PretrainSettings, step: int, optimizer, scheduler,
                cache: dict[int, np.ndarray], dev: str, bf16: bool, part: Part) -> float:
    seed = step_seed(cfg.seed, step)
    torch.manual_seed(part.dropout_seed(seed))  # dropout
    rows = [examples[i] for i in _batch(len(examples), cfg, step, cache)]
    with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=bf16):
        loss = objective.loss(rows, seed, part)
    loss.backward()  # under DDP: the gradients averaged over the ranks
    torch.nn.utils.clip_grad_norm_(objective.module.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.detach().float()
    if part.world > 1:  # the global batch's loss: the ranks' mean
        torch.distributed.all_reduce(value)
        value /= part.world
    return float(value)


def _parallel(objective: Objective, dev: str, world_size: int) -> Part:
    """Under torchrun: the objective's loss computed through DDP (rank 0's weights broadcast to every rank), and
    this rank's part of each batch."""
    if world_size == 1:
        return Part()
    from torch.nn.parallel import DistributedDataParallel

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev == "cuda" else "gloo")
    ids = [torch.cuda.current_device()] if dev == "cuda" else None
    # parameters the loss does not reach (BERT's pooler under CLS or mean pooling) have no gradient
    objective.run = DistributedDataParallel(objective.module, device_ids=ids, find_unused_parameters=True)
    return Part(distributed.rank(), world_size)


def fit(objective: Objective, examples: list, cfg: PretrainSettings, checkpoints: Path, dev: str,
        on_progress: ProgressFn | None = None, world_size: int = 1) -> _State:
    """Train ``objective`` for ``cfg.steps`` steps in all, continuing from the newest checkpoint if any.

    ``world_size`` > 1: this process is one rank of a torchrun job; rank 0 alone writes checkpoints."""
    params = [p for p in objective.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = constant_schedule(optimizer, min(cfg.warmup_steps, cfg.steps))
    state = _resume(checkpoints, objective, optimizer, scheduler, dev)
    objective.module.train()
    part = _parallel(objective, dev, world_size)
    bf16 = models.bf16_pays(objective.module, dev)  # autocast: the weights and the optimizer stay fp32
    cache: dict[int, np.ndarray] = {}
    every = log_every(cfg)
    with tqdm(total=cfg.steps, initial=state.step, desc=f"pretrain ({cfg.method})", unit="step",
              disable=world_size > 1) as bar:  # a torchrun job's rank 0 reports its progress to the launcher
        while state.step < cfg.steps:
            loss = _train_step(objective, examples, cfg, state.step, optimizer, scheduler, cache, dev, bf16, part)
            state.window.append(loss)
            state.step += 1
            bar.update(1)
            logged = state.step % every == 0 or state.step == cfg.steps
            if logged:
                state.history.append((state.step, float(np.mean(state.window))))
                state.window = []
                bar.set_postfix(loss=f"{state.history[-1][1]:.4f}")
            if state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps and distributed.is_main():
                _checkpoint(checkpoints, state, objective, optimizer, scheduler)
            if logged:
                logger.debug("pretrain step %d/%d: loss %.4f", state.step, cfg.steps, state.history[-1][1])
                if on_progress is not None:
                    on_progress(state.step, cfg.steps, state.history[-1][1])
    objective.module.eval()
    objective.run = objective.module
    return state


def _base_pooling(base: SentenceTransformer) -> str:
    """The pooling mode of the base's first pooling layer (mean when it has none or combines several)."""
    mode = next((m.pooling_mode for m in base if isinstance(m, Pooling)), "mean")
    return mode if isinstance(mode, str) else "mean"


def _sentence_objective(cfg: PretrainSettings, base: SentenceTransformer, dev: str, pooling: str,
                        world_size: int = 1) -> Objective:
    if cfg.method == "tsdae":
        return Tsdae(base, cfg.noise_ratio, dev, pooling)
    if cfg.method == "simcse":
        return SimCse(base, cfg.scale, dev, pooling, world_size)
    return ContrastiveTension(base, cfg, dev, pooling)


def pretrain(cfg: PretrainSettings, base_model: str, texts: Iterable[str], checkpoints: Path, out_dir: Path | None,
             on_progress: ProgressFn | None = None, world_size: int = 1) -> PretrainReport:
    """Pretrain ``base_model`` on ``texts`` (passages); save the encoder as a sentence-transformers folder in
    ``out_dir`` (None: a torchrun rank other than 0, which saves nothing)."""
    started = time.perf_counter()
    counters: dict[str, int] = {}

    def count(name: str, value: int) -> None:
        counters[name] = counters.get(name, 0) + value

    dev = models.device()
    base = models.load_bi_encoder(base_model, max_seq_length=cfg.max_seq_length)
    pooling = cfg.pooling or POOLING[cfg.method] or _base_pooling(base)
    limit = cfg.steps * rows_per_step(cfg)  # more examples than the run can see are never needed
    torch.manual_seed(cfg.seed)  # the decoder's or MLM head's new weights
    if cfg.method == "mlm":
        passages, total = reservoir_sample(texts, limit, cfg.seed)
        examples = mlm_chunks(base.tokenizer, passages, cfg.max_seq_length, count)
        objective: Objective = MaskedLM(base, cfg.mlm_probability, dev, pooling)
        count("passages", total)
    else:
        examples, total = reservoir_sample(sentences(texts, cfg.min_sentence_words, count), limit, cfg.seed)
        objective = _sentence_objective(cfg, base, dev, pooling, world_size)
        count("sentences", total)
    if not examples:
        raise InputError(f"pretrain ({cfg.method}): the corpus yields no training example "
                         f"(sentences need at least {cfg.min_sentence_words} words)")
    if world_size > 1 and len(examples) < rows_per_step(cfg):  # a smaller batch would not split evenly
        raise InputError(f"pretrain ({cfg.method}): the corpus yields {len(examples)} training examples, fewer than "
                         f"a batch of {rows_per_step(cfg)} takes; on {world_size} devices every batch must be whole "
                         "(set pretrain.devices: 1, or a smaller pretrain.batch_size)")
    count("examples", len(examples))
    state = fit(objective, examples, cfg, checkpoints, dev, on_progress, world_size)
    if out_dir is not None:
        objective.save(out_dir)
    return PretrainReport(cfg.method, pooling, state.step, state.resumed_from, len(examples),
                          time.perf_counter() - started, state.history, counters)
