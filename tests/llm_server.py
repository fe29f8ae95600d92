"""A small OpenAI-compatible server on loopback, for the endpoint back-end's tests and benchmark.

It speaks ``GET /v1/models`` and ``POST /v1/chat/completions`` (``n`` choices, token log-probs when asked) with
answers made from the passage in the prompt, and follows a script: per chat request, in order, a ``Reply``
says whether to answer normally, with an HTTP error (and headers such as Retry-After), late (a timeout), with a
malformed body, or by dropping the connection. Every request is recorded (path, body, Authorization header).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DOCUMENT = re.compile(r"Document: (.*?)\n", re.S)


@dataclass(frozen=True)
class Reply:
    kind: str = "ok"  # ok | status | slow | malformed | drop
    status: int = 200
    body: Any = None  # for status: the JSON error body (an OpenAI-style error object by default)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # slow: answer after this long


def passage_of(body: dict[str, Any]) -> str:
    """The passage a chat request asks about: the last ``Document:`` line of its last message."""
    text = body["messages"][-1]["content"]
    found = _DOCUMENT.findall(text)
    return found[-1].strip() if found else text


def default_answer(passage: str, i: int) -> str:
    return f"what is {' '.join(passage.split()[:2]).lower()} number {i}"


class FakeLLMServer:
    """``with FakeLLMServer() as server: server.base_url`` — threads, loopback only, stopped on exit."""

    def __init__(self, models: tuple[str, ...] = ("tiny-chat",), latency_s: float = 0.0,
                 answer: Callable[[str, int], str] = default_answer, script: list[Reply] | None = None):
        self.models, self.latency_s, self.answer = models, latency_s, answer
        self.script = list(script or [])
        self.requests: list[tuple[str, dict[str, Any], str]] = []  # (path, body, authorization)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.fail_when: Callable[[dict[str, Any]], Reply | None] | None = None  # per-request override
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def chat_requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for path, body, _ in self.requests if path.endswith("/chat/completions")]

    def requests_per_passage(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for body in self.chat_requests():
            counts[passage_of(body)] = counts.get(passage_of(body), 0) + 1
        return counts

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self.lock:
            if self.fail_when is not None and (reply := self.fail_when(body)) is not None:
                return reply
            return self.script.pop(0) if self.script else Reply()

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        passage, n = passage_of(body), int(body.get("n") or 1)
        choices = []
        for i in range(n):
            text = self.answer(passage, i)
            choice: dict[str, Any] = {"index": i, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": [{"token": t, "logprob": -0.5 - 0.1 * i, "bytes": None,
                                                   "top_logprobs": []} for t in text.split()]}
            choices.append(choice)
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        completion_tokens = sum(len(c["message"]["content"].split()) for c in choices)
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 resets connections when 32 clients connect at once


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm and the client's delayed ACK
        # hold the body back ~40 ms on a kept-alive connection, which is the test server's cost, not the client's.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def fake(self) -> FakeLLMServer:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        with self.fake.lock:
            self.fake.requests.append((self.path, {}, self.headers.get("Authorization", "")))
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                         "owned_by": "test"} for m in self.fake.models]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with self.fake.lock:
            self.fake.requests.append((self.path, body, self.headers.get("Authorization", "")))
            self.fake.in_flight += 1
            self.fake.max_in_flight = max(self.fake.max_in_flight, self.fake.in_flight)
        try:
            self._chat(body)
        finally:
            with self.fake.lock:
                self.fake.in_flight -= 1

    def _chat(self, body: dict[str, Any]) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        reply = self.fake._next_reply(body)
        if self.fake.latency_s:
            time.sleep(self.fake.latency_s)
        if reply.kind == "status":
            payload = reply.body if reply.body is not None else {
                "error": {"message": f"scripted {reply.status}", "type": "test"}}
            self._send(reply.status, payload, reply.headers)
        elif reply.kind == "malformed":
            self._send(200, None, raw=b'{"id": "x", "object": "chat.completion", "choices": "oops"')
        elif reply.kind == "drop":
            self.close_connection = True
            self.connection.close()
        else:
            if reply.kind == "slow":
                time.sleep(reply.delay_s)
            if body.get("model") not in self.fake.models:
                self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "code": 404}})
                return
            self._send(200, self.fake.completion(body))
