"""Query generation through an OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, or the OpenAI API itself).

The boundary to the ``openai`` package, imported only when a client is built (an optional extra: ``pip install
'gplflow[llm]'``). It behaves as a batch client should:

- at most ``max_concurrency`` requests in flight (a thread pool over the synchronous client);
- timeouts, connection failures, 429, 5xx and malformed bodies are retried up to ``max_retries`` times with
  exponential backoff and jitter; a ``Retry-After`` header (seconds or an HTTP date) sets the wait instead;
- any other 4xx stops the stage at once with one line naming the status and the server's message;
- ``check()`` asks ``GET /models`` before any compute: the server answers, and serves the named model.

The API key is read from the environment variable the config names, handed to the client, and never logged:
error messages have it replaced by ``***`` in case a server echoes it.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from gplflow.adapters.errors import GplflowError, InputError
from gplflow.adapters.llm_base import Completion, PassageResult, Sampling, Usage, key_seed, mean
from gplflow.adapters.llm_prompts import Prompt

logger = logging.getLogger(__name__)

NO_KEY = "EMPTY"  # what local servers without authentication accept (vLLM's documented placeholder)
MAX_RETRY_AFTER_S = 300.0  # a Retry-After longer than this is capped, so a run never sleeps for hours
PREFLIGHT_TIMEOUT_S = 10.0


class EndpointError(GplflowError, RuntimeError):
    """The server refused a request (a 4xx other than 429), gave up answering, or does not serve the model."""


@dataclass(frozen=True)
class EndpointSettings:
    base_url: str
    model: str
    api_key_env: str = ""
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0  # the first retry's wait; doubled each retry (with jitter), at most backoff_max_s
    backoff_max_s: float = 60.0
    logprobs: bool = True


def api_key(settings: EndpointSettings) -> str:
    """The key from the environment variable named by ``api_key_env`` (``NO_KEY`` when none is named)."""
    if not settings.api_key_env:
        return NO_KEY
    value = os.environ.get(settings.api_key_env, "")
    if not value.strip():
        raise InputError(f"generate.endpoint.api_key_env: the environment variable {settings.api_key_env} is not "
                         "set (or empty); export the API key in it, or leave api_key_env empty for a server "
                         "without authentication")
    return value


class _Retry(Exception):
    """A failure worth another try: why, and how long the server asked us to wait (None: our own backoff)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class EndpointGenerator:
    """Chat completions for passages, ``sampling.n`` per passage, through an OpenAI-compatible server."""

    def __init__(self, settings: EndpointSettings, prompt: Prompt, sampling: Sampling, max_passage_words: int,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings, self.prompt, self.sampling = settings, prompt, sampling
        self.max_passage_words = max_passage_words
        self._openai, self._client, self._key = _client(settings)
        self._sleep = sleep
        self._lock = threading.Lock()

    def check(self) -> None:
        """The server answers ``GET /models`` and lists the model (see ``check_server``)."""
        _check(self._openai, self._client, self._key, self.settings)

    # --- generation -----------------------------------------------------------------------------------------

    def generate(self, passages: Sequence[str], keys: Sequence[str], seed: int,
                 progress: Callable[[int], Any]) -> tuple[list[PassageResult | None], Usage]:
        """One request per passage, ``max_concurrency`` at a time; the first unrecoverable error stops the rest."""
        usage = Usage()
        found: list[PassageResult | None] = [None] * len(passages)
        todo = []
        for i, text in enumerate(passages):
            words = text.split()[: self.max_passage_words]
            if words:
                todo.append((i, " ".join(words)))
        progress(len(passages) - len(todo))
        pool = ThreadPoolExecutor(max_workers=self.settings.max_concurrency, thread_name_prefix="llm-endpoint")
        try:
            futures: dict[Future, int] = {
                pool.submit(self._passage, text, key_seed(seed, keys[i]), usage): i for i, text in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    found[futures[future]] = future.result()  # raises the first failure
                progress(len(done))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return found, usage

    def _passage(self, passage: str, seed: int, usage: Usage) -> PassageResult:
        s = self.settings
        for attempt in range(s.max_retries + 1):
            self._count(usage, requests=1, retries=int(attempt > 0))
            try:
                return self._request(passage, seed, usage)
            except _Retry as retry:
                if attempt == s.max_retries:
                    raise EndpointError(self._scrub(f"generate.endpoint: {s.base_url} failed {attempt + 1} times "
                                                    f"for model {s.model!r}; last: {retry.reason}")) from None
                wait_s = self._backoff(attempt) if retry.retry_after is None else retry.retry_after
                logger.warning("chat completion failed (%s); retry %d of %d in %.1f s", retry.reason, attempt + 1,
                               s.max_retries, wait_s)
                self._sleep(wait_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _request(self, passage: str, seed: int, usage: Usage) -> PassageResult:
        s, p, oa = self.settings, self.sampling, self._openai
        try:
            response = self._client.chat.completions.create(
                model=s.model, messages=self.prompt.messages(passage), n=p.n, temperature=p.temperature,
                top_p=p.top_p, max_tokens=p.max_new_tokens, seed=seed, **({"stop": list(p.stop)} if p.stop else {}),
                **({"logprobs": True} if s.logprobs else {}))
        except oa.APITimeoutError:
            raise _Retry(f"no answer within {s.timeout_s:g} s (generate.endpoint.timeout_s)") from None
        except oa.APIConnectionError as err:
            raise _Retry(f"connection failed ({_connection_reason(err, s.timeout_s)})") from None
        except oa.APIStatusError as err:
            status = err.status_code
            if status == 429 or status >= 500 or status == 408:
                raise _Retry(f"HTTP {status}: {_server_message(err)}", _retry_after(err.response)) from None
            raise EndpointError(self._scrub(f"generate.endpoint: {s.base_url} answered HTTP {status} to a chat "
                                            f"completion for model {s.model!r}: {_server_message(err)}")) from None
        except (oa.APIResponseValidationError, ValueError) as err:  # a body that is not JSON, or not the shape
            raise _Retry(f"a malformed response ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
        result = _result(response)
        self._count(usage, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        return result

    def _backoff(self, attempt: int) -> float:
        base = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
        return base * (0.5 + random.random() / 2)  # jitter, so clients that failed together do not retry together

    def _count(self, usage: Usage, **values: int) -> None:
        with self._lock:
            usage.add(**values)

    def _scrub(self, text: str) -> str:
        return _scrub(self._key, text)


def _scrub(key: str, text: str) -> str:
    return text.replace(key, "***") if key and key != NO_KEY else text


def check_server(settings: EndpointSettings) -> None:
    """Before any compute: the server answers ``GET /models`` and lists ``settings.model``; else an ``EndpointError``
    (or, for a key variable that is not set, an ``InputError``) saying which."""
    oa, client, key = _client(settings)
    _check(oa, client, key, settings)


def _client(settings: EndpointSettings) -> tuple[Any, Any, str]:
    """(the openai module, a client that never retries by itself, the key)."""
    try:
        import openai  # the optional extra: only a run that talks to a server needs it
    except ImportError:
        raise InputError("generate.endpoint: the openai package is not installed; pip install 'gplflow[llm]'") from None
    key = api_key(settings)
    client = openai.OpenAI(api_key=key, base_url=settings.base_url, timeout=settings.timeout_s, max_retries=0)
    return openai, client, key


def _check(oa: Any, client: Any, key: str, s: EndpointSettings) -> None:
    try:
        page = client.with_options(timeout=min(PREFLIGHT_TIMEOUT_S, s.timeout_s)).models.list()
        served = [m.id for m in page.data]
    except oa.APIStatusError as err:
        raise EndpointError(_scrub(key, f"generate.endpoint.base_url: {s.base_url} answered GET /models with "
                                        f"HTTP {err.status_code}: {_server_message(err)}")) from None
    except oa.APIConnectionError as err:
        raise EndpointError(f"generate.endpoint.base_url: no answer from {s.base_url} "
                            f"({_connection_reason(err, s.timeout_s)}); start the server or fix the URL "
                            "(it usually ends in /v1)") from None
    except (TypeError, AttributeError, ValueError) as err:
        raise EndpointError(f"generate.endpoint.base_url: {s.base_url}/models did not answer with a model list "
                            f"({type(err).__name__}); is this an OpenAI-compatible server?") from None
    if s.model not in served:
        listing = ", ".join(repr(m) for m in served[:20]) or "none"
        raise EndpointError(f"generate.endpoint.model: {s.base_url} does not serve {s.model!r}; it serves: "
                            f"{listing}")


def _result(response: Any) -> PassageResult:
    """The completions of one response; ``_Retry`` when it is not a chat completion with choices."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise _Retry(f"a malformed response (no choices; got {type(response).__name__})")
    completions = []
    for choice in choices:
        message = getattr(choice, "message", None)
        text = getattr(message, "content", None)
        if text is not None and not isinstance(text, str):
            raise _Retry("a malformed response (a choice's message content is not text)")
        completions.append(Completion(text or "", _mean_logprob(choice)))
    used = getattr(response, "usage", None)
    return PassageResult(completions, int(getattr(used, "prompt_tokens", 0) or 0),
                         int(getattr(used, "completion_tokens", 0) or 0))


def _mean_logprob(choice: Any) -> float | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    values = [t.logprob for t in content if isinstance(getattr(t, "logprob", None), int | float)]
    return mean(values)


def _server_message(err: Any) -> str:
    """The server's own words: ``error.message`` of an OpenAI-style body, a ``detail`` or ``message``, or the text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        body = (inner.get("message") or inner.get("detail") or body) if isinstance(inner, dict) else inner
    if not body:
        response = getattr(err, "response", None)
        body = getattr(response, "text", "") or getattr(err, "message", "")
    return " ".join(str(body).split())[:300] or "(no message)"


def _connection_reason(err: Any, timeout_s: float) -> str:
    cause = err.__cause__ or err.__context__
    if "Timeout" in type(err).__name__:
        return f"no answer within {timeout_s:g} s"
    return f"{type(cause).__name__}: {str(cause).splitlines()[0][:120]}" if cause else str(err)


def _retry_after(response: Any) -> float | None:
    """The wait a 429/503 asks for: ``retry-after-ms``, or ``Retry-After`` in seconds or as an HTTP date."""
    headers = getattr(response, "headers", None) or {}
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return min(MAX_RETRY_AFTER_S, max(0.0, float(ms) / 1000))
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return min(MAX_RETRY_AFTER_S, max(0.0, when.timestamp() - time.time()))
    except (TypeError, ValueError, OverflowError):
        return None
