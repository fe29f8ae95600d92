"""Query generation with a local decoder-only (causal) language model: prompt, seeded sampling, log-probs.

The boundary to torch and transformers for ``generate.method: llm`` without an endpoint. A passage is cut to
``max_input_length`` tokens, put into the prompt (the tokenizer's chat template when it has one, else the
prompt as plain text), and the prompts are generated from in length-sorted, left-padded batches (a decoder-only
model continues from the right end of every row). Each completion keeps the mean log-probability of its tokens
under the model's raw distribution (before temperature and top-p), the figure InPars filters on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gplflow.adapters import models, oom
from gplflow.adapters.llm_base import Completion, PassageResult, Sampling, Usage
from gplflow.adapters.llm_prompts import Prompt

logger = logging.getLogger(__name__)


def load_causal_lm(ref: str):
    """A (tokenizer, model) pair for generation: left padding, a pad token, on the chosen device, bf16 weights
    where that pays."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = models.resolve(ref)
    models.tokenizer_threads()
    with models._explain_offline(ref):
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, models.for_inference(model.to(models.device()))


class CausalGenerator:
    """Wraps a (tokenizer, model) pair from ``load_causal_lm`` with a prompt and sampling settings."""

    def __init__(self, tokenizer: Any, model: Any, prompt: Prompt, sampling: Sampling, max_input_length: int,
                 batch_size: int):
        self.tokenizer, self.model, self.prompt, self.sampling = tokenizer, model, prompt, sampling
        self.max_input_length, self.batch_size = max_input_length, batch_size
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self._eos = {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None}

    def encode(self, passage: str) -> list[int] | None:
        """Prompt token ids for a passage cut to ``max_input_length`` tokens; None for a blank passage."""
        if not passage.strip():
            return None
        cut = self.tokenizer(passage, add_special_tokens=False, truncation=True, max_length=self.max_input_length,
                             return_offsets_mapping=True)
        if not cut["input_ids"]:
            return None
        passage = passage[: cut["offset_mapping"][-1][1]]
        if self.chat:
            text = self._chat_text(passage)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(self.prompt.plain(passage))["input_ids"]

    def _chat_text(self, passage: str) -> str:
        messages = self.prompt.messages(passage)
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # a template without a system role raises its own (jinja) TemplateError
            merged = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
            return self.tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)

    def generate(self, passages: Sequence[str], keys: Sequence[str], seed: int,
                 progress: Callable[[int], Any]) -> tuple[list[PassageResult | None], Usage]:
        """``sampling.n`` completions per passage from length-sorted batches; batch b samples with a seed derived
        from (seed, b), so the same passages, batch size and seed give the same completions."""
        encoded = [self.encode(p) for p in passages]
        found: list[PassageResult | None] = [None] * len(passages)
        order = sorted((i for i, ids in enumerate(encoded) if ids is not None),
                       key=lambda i: (len(encoded[i]), keys[i]))
        progress(len(passages) - len(order))
        usage = Usage()
        for batch_no, start in enumerate(range(0, len(order), self.batch_size)):
            members = order[start : start + self.batch_size]
            batch_seed = int(np.random.SeedSequence([seed % 2**64, batch_no]).generate_state(1, np.uint64)[0])

            def sample(part: Sequence[int], batch_seed: int = batch_seed) -> list[PassageResult]:
                return self.sample([encoded[i] for i in part], batch_seed)

            for part, results in oom.halve_on_oom(sample, members, what="generate.batch_size"):
                for i, result in zip(part, results, strict=True):
                    found[i] = result
                    usage.add(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
            progress(len(members))
        return found, usage

    def sample(self, batch: Sequence[list[int]], seed: int) -> list[PassageResult]:
        """``sampling.n`` completions for each encoded prompt, reproducible for the same batch and seed (the caller's
        torch random state is left as it was)."""
        from transformers import LogitsProcessorList

        p, dev = self.sampling, self.model.device
        padded = self.tokenizer.pad({"input_ids": list(batch)}, return_tensors="pt")
        recorder = _LogprobRecorder()
        forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed)
            with models.inference(dev.type, bf16=models.bf16_pays(self.model, dev.type)):
                out = self.model.generate(
                    input_ids=padded["input_ids"].to(dev), attention_mask=padded["attention_mask"].to(dev),
                    do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=0,
                    max_new_tokens=p.max_new_tokens, num_return_sequences=p.n, pad_token_id=self.tokenizer.pad_token_id,
                    logits_processor=LogitsProcessorList([recorder]),
                    **({"stop_strings": list(p.stop), "tokenizer": self.tokenizer} if p.stop else {}))
        new = out[:, padded["input_ids"].shape[1] :].cpu()
        valid = self._valid(new)
        logprobs = recorder.means(out[:, -1], valid)
        texts = self.tokenizer.batch_decode(torch.where(valid, new, self.tokenizer.pad_token_id),
                                            skip_special_tokens=True)
        # generate() repeats each prompt n times in a row: rows i*n … i*n+n-1 belong to prompt i.
        results = []
        for i, ids in enumerate(batch):
            rows = range(i * p.n, (i + 1) * p.n)
            results.append(PassageResult([Completion(texts[r].strip(), logprobs[r]) for r in rows],
                                         prompt_tokens=len(ids), completion_tokens=int(valid[list(rows)].sum())))
        return results

    def _valid(self, new: torch.Tensor) -> torch.Tensor:
        """Which generated positions are the completion's own: up to and including its first end-of-sequence token,
        and not the padding that follows a row stopped by a stop string."""
        is_eos = torch.zeros_like(new, dtype=torch.bool)
        for e in self._eos:
            is_eos |= new == e
        ended_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int() > 0
        padding = (new == self.tokenizer.pad_token_id) & ~is_eos
        return ~ended_before & ~padding


class _LogprobRecorder:
    """A logits processor that keeps the log-probability of each sampled token under the model's distribution.

    Custom processors run before temperature and top-p, so the scores seen are the model's own. At step t it
    learns the token chosen at step t-1 (the last column of ``input_ids``); the final token is added by ``means``.
    Only one step's distribution is held at a time, not the logits of the whole generation.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self.steps.append(self._chosen(input_ids[:, -1]))
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _chosen(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._last.gather(1, tokens[:, None].to(self._last.device)).squeeze(1).cpu()

    def means(self, last_tokens: torch.Tensor, valid: torch.Tensor) -> list[float | None]:
        """Mean log-prob over each row's valid positions (None for a row with none)."""
        if self._last is None:
            return [None] * valid.shape[0]
        chosen = torch.stack([*self.steps, self._chosen(last_tokens)], dim=1)[:, : valid.shape[1]]
        mask = valid[:, : chosen.shape[1]].float()
        counts = mask.sum(dim=1)
        means = (chosen * mask).sum(dim=1) / counts.clamp(min=1)
        return [float(m) if c > 0 else None for m, c in zip(means.tolist(), counts.tolist(), strict=True)]
