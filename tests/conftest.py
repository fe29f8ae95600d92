"""Session-wide test settings: offline, quiet Prefect, and a private cache for the tiny models."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# each test session (each xdist worker) gets its own Prefect home: the temporary servers that `gplflow run`
# subprocesses start keep their SQLite database there, and two sessions must not share one
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gplflow-test-prefect-")


@pytest.fixture(scope="session", autouse=True)
def _private_prefect_home():
    yield
    shutil.rmtree(os.environ["PREFECT_HOME"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tiny models built by tests go to a temporary cache, never the user's ~/.cache."""
    os.environ["GPLFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("gplflow-cache"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The tests' tiny models gain nothing from threads, and busy-waiting OpenMP threads crawl on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
