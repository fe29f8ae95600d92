"""generate.method llm through an OpenAI-compatible endpoint: a real HTTP server on loopback (tests/llm_server.py).

Retries, Retry-After, timeouts, malformed bodies and dropped connections; one-line errors for other 4xx, a wrong
model and a dead server; bounded concurrency; shard resume without re-requests; the key nowhere on disk or in logs.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from artifact_rows import write_artifact
from llm_server import FakeLLMServer, Reply, passage_of

from gplflow.adapters.errors import InputError
from gplflow.adapters.llm_base import Sampling
from gplflow.adapters.llm_endpoint import EndpointError, EndpointGenerator, EndpointSettings, _retry_after, check_server
from gplflow.adapters.llm_prompts import build_prompt
from gplflow.adapters.store import ArtifactStore
from gplflow.adapters.text import passage_text
from gplflow.tasks.base import Ref
from gplflow.tasks.generate import GenerateConfig, GenerateInputs, llm_problems, run_generate

KEY_ENV, KEY = "GPLFLOW_TEST_LLM_KEY", "sk-test-7f3a9c1e5b2d-do-not-log"
DOCS = [(f"d{i}", title, text) for i, (title, text) in enumerate([
    ("Coral reefs", "Coral reefs are built by colonies of tiny animals."),
    ("", "Dense retrieval ranks passages by the dot product of vectors."),
    ("Volcanoes", "A volcano is an opening in the crust through which magma rises."),
    ("Tea", "Green tea and black tea come from the same plant."),
    ("Bees", "Honey bees communicate with a waggle dance inside the hive."),
    ("Chess", "Castling moves the king two squares toward a rook."),
    ("Glaciers", "Glaciers store most of the fresh water on Earth."),
    ("", "Photosynthesis turns light, water and carbon dioxide into sugar."),
    ("Rivers", "The Amazon carries more water than any other river."),
    ("", "   "),
    ("Salt", "Sea water is salty because rivers carry dissolved minerals into the sea."),
    ("Moon", "The Moon causes most of the tides on Earth."),
])]


@pytest.fixture
def server():
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def endpoint_cfg(server: FakeLLMServer, **endpoint) -> GenerateConfig:
    return GenerateConfig(method="llm", queries_per_passage=3, seed=5, prompt="few_shot", endpoint={
        "base_url": server.base_url, "model": "tiny-chat", "api_key_env": KEY_ENV, "max_concurrency": 4,
        "timeout_s": 5, "max_retries": 2, **endpoint})


def inputs_for(run_dir: Path, cfg: GenerateConfig, shard_size: int = 10_000) -> GenerateInputs:
    corpus = write_artifact(ArtifactStore(run_dir), "corpus", DOCS)
    return GenerateInputs(run_dir=str(run_dir), cfg=cfg, corpus=Ref("corpus", corpus.fingerprint),
                          shard_size=shard_size)


def client(server: FakeLLMServer, waits: list[float], **settings) -> EndpointGenerator:
    """An endpoint generator whose backoff sleeps are recorded instead of slept."""
    s = EndpointSettings(server.base_url, "tiny-chat", api_key_env=KEY_ENV, **{"max_retries": 3, **settings})
    return EndpointGenerator(s, build_prompt("zero_shot"), Sampling(2, 1.0, 0.9, 16), 100, sleep=waits.append)


def test_endpoint_run_rows_counters_and_bounded_concurrency(tmp_path, server):
    server.latency_s = 0.05
    cfg = endpoint_cfg(server, max_concurrency=3)
    artifact = run_generate(inputs_for(tmp_path, cfg))
    rows = artifact.read_table().to_pylist()
    texts = [passage_text(t, x) for _, t, x in DOCS]
    expected = [(f"{d}-q{k}", d, f"what is {' '.join(p.split()[:2]).lower()} number {k}", -0.5 - 0.1 * k)
                for (d, _, _), p in zip(DOCS, texts, strict=True) if p for k in range(3)]
    assert [(r["query_id"], r["doc_id"], r["text"]) for r in rows] == [e[:3] for e in expected]
    assert [r["logprob"] for r in rows] == pytest.approx([e[3] for e in expected])
    bodies = server.chat_requests()
    assert len(bodies) == 11 and server.max_in_flight == 3  # never more than max_concurrency at once
    assert {b["n"] for b in bodies} == {3} and {b["model"] for b in bodies} == {"tiny-chat"}
    assert all(b["logprobs"] is True and b["temperature"] == 1.0 and b["top_p"] == 0.95 for b in bodies)
    assert len({b["seed"] for b in bodies}) == 11  # a seed per passage
    c = artifact.counters
    assert c["requests"] == 11 and c["retries"] == 0 and c["empty_passage"] == 1
    assert c["prompt_tokens"] == sum(len(m["content"].split()) for b in bodies for m in b["messages"])
    assert c["completion_tokens"] == sum(len(r["text"].split()) for r in rows)
    assert artifact.manifest["llm"]["backend"] == "endpoint" and artifact.manifest["llm"]["model"] == "tiny-chat"
    assert artifact.manifest["llm"]["prompt"]["examples"] == 3  # the built-in few-shot examples
    assert {auth for _, _, auth in server.requests} == {f"Bearer {KEY}"}  # the key was used …


def test_the_key_is_nowhere_in_the_run_directory_logs_or_parameters(tmp_path, server, caplog):
    caplog.set_level(logging.DEBUG)
    server.script = [Reply("status", 500), Reply("status", 429, headers={"Retry-After": "0"})]
    inputs = inputs_for(tmp_path, endpoint_cfg(server))
    artifact = run_generate(inputs)
    assert artifact.counters["retries"] == 2 and {auth for _, _, auth in server.requests} == {f"Bearer {KEY}"}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files) and any(p.suffix == ".parquet" for p in files)
    for path in files:  # … and is written nowhere: not in a part, a manifest, a staging record
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in caplog.text and "retry 1 of 2" in caplog.text
    assert KEY not in inputs.model_dump_json()  # the Prefect task's parameter
    assert KEY_ENV in inputs.model_dump_json()  # the variable's name is


def test_retries_on_429_500_malformed_dropped_and_timeout(server):
    waits: list[float] = []
    server.script = [Reply("status", 429, headers={"Retry-After": "7"}), Reply("status", 503),
                     Reply("malformed"), Reply("drop"), Reply("slow", delay_s=2.0)]
    gen = client(server, waits, timeout_s=0.5, max_retries=5, backoff_s=0.01)
    started = time.monotonic()
    results, usage = gen.generate(["Coral reefs grow slowly."], ["d0"], 1, lambda _n: None)
    assert time.monotonic() - started < 5
    assert [c.text for c in results[0].completions] == ["what is coral reefs number 0", "what is coral reefs number 1"]
    assert usage.counters["requests"] == 6 and usage.counters["retries"] == 5
    assert waits[0] == 7.0  # Retry-After honoured
    assert all(0 < w <= 0.01 * 2**k for k, w in enumerate(waits[1:], start=1))  # backoff: doubling, jittered


def test_retries_run_out_with_one_line_error(server):
    server.script = [Reply("status", 500)] * 4
    with pytest.raises(EndpointError) as err:
        client(server, [], max_retries=2).generate(["Bees dance."], ["d0"], 1, lambda _n: None)
    assert len(server.chat_requests()) == 3
    assert "failed 3 times for model 'tiny-chat'; last: HTTP 500: scripted 500" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("status", "body", "message"), [
    (400, {"error": {"message": "logprobs are not supported", "type": "invalid_request_error"}},
     "answered HTTP 400 to a chat completion for model 'tiny-chat': logprobs are not supported"),
    (401, {"error": {"message": f"bad key {KEY}"}}, "answered HTTP 401 to a chat completion for model 'tiny-chat': "
                                                    "bad key ***"),
    (422, {"detail": "n must be at most 1"}, "answered HTTP 422 to a chat completion for model 'tiny-chat': "
                                             "n must be at most 1"),
])
def test_other_4xx_stop_at_once_naming_status_and_message(server, status, body, message):
    server.script = [Reply("status", status, body=body)]
    with pytest.raises(EndpointError) as err:
        client(server, []).generate(["Bees dance.", "Tea grows."], ["d0", "d1"], 1, lambda _n: None)
    assert message in str(err.value) and KEY not in str(err.value)
    assert len(server.chat_requests()) <= 2  # no retry of the refused request


def test_retry_after_forms():
    assert _retry_after(type("R", (), {"headers": {"retry-after": "2.5"}})()) == 2.5
    assert _retry_after(type("R", (), {"headers": {"retry-after-ms": "300"}})()) == 0.3
    assert _retry_after(type("R", (), {"headers": {"retry-after": "99999"}})()) == 300.0  # capped
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= _retry_after(type("R", (), {"headers": {"retry-after": date}})()) <= 31
    assert _retry_after(type("R", (), {"headers": {"retry-after": "soon"}})()) is None
    assert _retry_after(type("R", (), {"headers": {}})()) is None


def test_preflight_wrong_model_dead_server_and_unset_key(server, monkeypatch):
    ok = EndpointSettings(server.base_url, "tiny-chat", api_key_env=KEY_ENV)
    check_server(ok)
    with pytest.raises(EndpointError, match=r"^generate.endpoint.model: .* does not serve 'llama-3'; it serves: "
                                            r"'tiny-chat'$"):
        check_server(EndpointSettings(server.base_url, "llama-3"))
    with FakeLLMServer() as gone:
        dead = gone.base_url
    with pytest.raises(EndpointError, match=r"^generate.endpoint.base_url: no answer from http://127.0.0.1:\d+/v1 "
                                            r"\(ConnectError"):
        check_server(EndpointSettings(dead, "tiny-chat", timeout_s=2))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(InputError, match=f"the environment variable {KEY_ENV} is not set"):
        check_server(ok)
    assert not server.chat_requests()  # a pre-flight never sends a passage


def test_validate_checks_reach_the_endpoint_before_any_stage(server, tmp_path):
    """The checks ``validate_run`` makes for generate.method llm, as (key, problem) pairs."""
    assert list(llm_problems(endpoint_cfg(server))) == []
    wrong = list(llm_problems(endpoint_cfg(server, model="other")))
    assert wrong == [("generate.endpoint.model", f"{server.base_url} does not serve 'other'; it serves: 'tiny-chat'")]
    (tmp_path / "t.txt").write_text("{passage} {query}", encoding="utf-8")
    both = list(llm_problems(endpoint_cfg(server, base_url="http://127.0.0.1:9/v1").model_copy(
        update={"template": str(tmp_path / "t.txt")})))
    assert [k for k, _ in both] == ["generate.template", "generate.endpoint.base_url"]
    assert "unknown placeholder {query}" in both[0][1] and "no answer from http://127.0.0.1:9/v1" in both[1][1]


def test_a_run_is_validated_once_the_cli_and_the_flow_asking_the_server_one_get_models(server, tmp_path):
    from gplflow.flows.config import PipelineConfig
    from gplflow.flows.validate import validate_run

    (tmp_path / "c.jsonl").write_text('{"_id": "1", "text": "x"}\n', encoding="utf-8")
    overrides = [f"corpus.path={tmp_path / 'c.jsonl'}", "profile=tiny", "flow=genq", "train.loss=mnrl",
                 "generate.method=llm", f"generate.endpoint.base_url={server.base_url}",
                 "generate.endpoint.model=tiny-chat", f"generate.endpoint.api_key_env={KEY_ENV}"]
    cfg = PipelineConfig.load(None, overrides)

    def models_asked() -> int:
        return sum(path.endswith("/models") for path, _, _ in server.requests)

    validate_run(cfg, str(tmp_path / "run"), None, overrides)  # the CLI, before Prefect starts
    validate_run(cfg, str(tmp_path / "run"), None, overrides)  # the flow, as it begins
    assert models_asked() == 1
    validate_run(cfg, str(tmp_path / "other"), None, overrides)  # another run is checked on its own
    assert models_asked() == 2


@pytest.mark.parametrize("pasted", ["hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", "sk_live_4f9a7c21e8", "a7f3c9e1b5d2"
                                    "f4a8c6e0b1d3f5a7c9e1b3d5"])
def test_a_key_pasted_as_the_variable_name_is_refused_without_being_repeated(pasted):
    from gplflow.flows.config import ConfigError, PipelineConfig

    base = ["corpus.path=x.jsonl", "generate.method=llm", "generate.endpoint.base_url=http://127.0.0.1:9/v1",
            "generate.endpoint.model=m"]
    with pytest.raises(ConfigError) as err:
        PipelineConfig.load(None, [*base, f"generate.endpoint.api_key_env={pasted}"])
    assert "looks like a key" in str(err.value) and pasted not in str(err.value)
    assert str(err.value).startswith("--set generate.endpoint.api_key_env=…: ")
    for name in ("OPENAI_API_KEY", "LLM_API_KEY", "TOGETHER_API_KEY_2"):  # names as people write them pass
        assert PipelineConfig.load(None, [*base, f"generate.endpoint.api_key_env={name}"]).generate.endpoint


def test_the_summary_names_the_endpoint_and_the_keys_variable_never_the_key():
    from gplflow.flows.config import PipelineConfig
    from gplflow.tasks.generate import summary_line

    base = ["corpus.path=x.jsonl", "generate.method=llm"]
    cfg = PipelineConfig.load(None, [*base, "generate.endpoint.base_url=http://gpu:8000/v1",
                                     "generate.endpoint.model=qwen", f"generate.endpoint.api_key_env={KEY_ENV}"])
    counters = {"requests": 12, "retries": 1, "prompt_tokens": 3400, "completion_tokens": 220}
    line = summary_line(cfg, "/cache/t5", {"counters": counters})
    assert line == (f"generator: qwen at http://gpu:8000/v1 (key from ${KEY_ENV}), prompt few_shot; 12 requests "
                    "(retries: 1), 3400 prompt and 220 completion tokens")
    assert KEY not in line
    local = PipelineConfig.load(None, [*base, "models.generator=my/llm", "generate.prompt=zero_shot"])
    assert summary_line(local, "/cache/llm", None) == "generator: local causal LM my/llm (/cache/llm), prompt zero_shot"
    assert summary_line(PipelineConfig.load(None, ["corpus.path=x.jsonl", "generate.method=extractive"]), "", None) \
        == "generator: extractive pseudo-queries (no model)"


def test_a_failed_run_resumes_without_requesting_finished_shards(tmp_path, server):
    """Shards of 4 passages, one request at a time: the server refuses the 6th passage (in shard 1), the run
    stops; the rerun requests no passage of shard 0 again."""
    cfg = endpoint_cfg(server, max_concurrency=1)
    inputs = inputs_for(tmp_path, cfg, shard_size=4)
    refused = passage_text(*DOCS[5][1:])
    server.fail_when = lambda body: Reply("status", 400) if passage_of(body) == refused else None
    with pytest.raises(EndpointError, match="HTTP 400"):
        run_generate(inputs)
    first = server.requests_per_passage()
    shard0 = [passage_text(t, x) for _, t, x in DOCS[:4]]
    shard2 = [passage_text(t, x) for _, t, x in DOCS[8:]]
    assert all(first[p] == 1 for p in shard0) and first[refused] == 1 and not set(shard2) & set(first)
    server.fail_when = None
    artifact = run_generate(inputs)
    total = server.requests_per_passage()
    assert all(total[p] == 1 for p in shard0)  # checkpointed: never requested again
    assert artifact.rows == 11 * 3 and len(total) == 11
    assert artifact.counters["requests"] == 11  # the shards' own records: each passage once


def test_config_holds_no_key_and_reading_it_does_not_import_openai(tmp_path):
    from gplflow.flows.config import ConfigError, PipelineConfig

    base = ["corpus.path=x.jsonl", "generate.method=llm", "generate.endpoint.base_url=http://127.0.0.1:9/v1",
            "generate.endpoint.model=m"]
    config = tmp_path / "run.yaml"
    config.write_text(f"corpus: {{path: x.jsonl}}\ngenerate:\n  method: llm\n  endpoint:\n    base_url: "
                      f"http://127.0.0.1:9/v1\n    model: m\n    api_key_env: {KEY}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:  # a key pasted where its variable's name goes is not repeated
        PipelineConfig.load(config)
    assert "must be the name of an environment variable" in str(err.value) and KEY not in str(err.value)
    code = ("import sys\nfrom gplflow.flows.config import PipelineConfig\n"
            f"cfg = PipelineConfig.load(None, {[*base, 'generate.endpoint.api_key_env=MY_KEY']!r})\n"
            "import gplflow.flows.cli, gplflow.tasks.generate\n"
            "assert cfg.generate.endpoint.api_key_env == 'MY_KEY'\n"
            "print('openai' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_killed_run_resumes_without_requesting_finished_shards(tmp_path, server):
    """The generating process is SIGKILLed as the server receives the 6th passage (shard 1 of 4-passage shards);
    the rerun sends no request for shard 0."""
    inputs = inputs_for(tmp_path, endpoint_cfg(server, max_concurrency=1), shard_size=4)
    (tmp_path / "inputs.json").write_text(inputs.model_dump_json(), encoding="utf-8")
    code = ("import sys\nfrom gplflow.tasks.generate import GenerateInputs, run_generate\n"
            "run_generate(GenerateInputs.model_validate_json(open(sys.argv[1]).read()))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "inputs.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = passage_text(*DOCS[5][1:])

    def kill_on_victim(body):
        if passage_of(body) == victim and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            return Reply("drop")
        return None

    server.fail_when = kill_on_victim
    try:
        assert proc.wait(timeout=120) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
    shard0 = [passage_text(t, x) for _, t, x in DOCS[:4]]
    assert all(server.requests_per_passage()[p] == 1 for p in shard0)
    server.fail_when = None
    artifact = run_generate(inputs)
    total = server.requests_per_passage()
    assert all(total[p] == 1 for p in shard0) and total[victim] == 2
    assert artifact.rows == 11 * 3
