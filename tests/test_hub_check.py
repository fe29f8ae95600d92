"""Hub models fail fast: with the Hugging Face Hub unreachable and HF_HUB_OFFLINE unset, ``gplflow run --plan``
ends in seconds with one line per model that is neither a local folder nor cached, and exit code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from gplflow.flows.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAPER_MODELS = ("GPL/msmarco-distilbert-margin-mse", "BeIR/query-gen-msmarco-t5-base-v1",
                "sentence-transformers/msmarco-distilbert-base-v3", "sentence-transformers/msmarco-MiniLM-L-6-v3",
                "cross-encoder/ms-marco-MiniLM-L-6-v2")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def _hub_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "GPLFLOW_HUB_TIMEOUT": "2"}


def test_the_paper_config_with_the_hub_unreachable_fails_in_seconds_with_a_line_per_model(tmp_path: Path) -> None:
    env = _hub_env(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gplflow.flows.cli", "run", str(ROOT / "configs" / "gpl-paper.yaml"),
                           "--plan", "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert time.monotonic() - start < 30
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Hugging Face Hub is unreachable" in lines[0] and "refused" in lines[0]
    for name in PAPER_MODELS:  # one line per model, with its slot and the fix
        [line] = [x for x in lines if repr(name) in x]
        assert "not in the Hugging Face cache" in line and "--set models." in line
    assert any(line.strip().startswith("fix:") for line in lines)
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_a_hub_that_never_answers_times_out_and_cached_or_local_models_need_no_hub(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections are taken into the backlog; nothing ever answers them
    try:
        for key, value in _hub_env(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}").items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        config = tmp_path / "c.yaml"
        config.write_text("name: t\nprofile: tiny\ncorpus: {path: docs}\nmodels: {base: some-org/a-model}\n")
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.txt").write_text("bees make honey")
        start = time.monotonic()
        result = CliRunner().invoke(app, ["run", str(config), "--plan", "--run-dir", str(tmp_path / "run")])
        assert time.monotonic() - start < 10
        assert result.exit_code == 2
        assert "did not answer within 2 s" in result.output
        assert "'some-org/a-model' is not a local folder" in result.output
        # the same config with local models only never asks the hub
        start = time.monotonic()
        from gplflow.flows.config import PipelineConfig
        from gplflow.flows.validate import validate_run

        validate_run(PipelineConfig.load(config, ["models.base=tiny"]), str(tmp_path / "run"))
        assert time.monotonic() - start < 1
    finally:
        silent.close()
