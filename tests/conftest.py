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


@pytest.fixture(scope="module")
def cpu_devices():
    """``GPLFLOW_DEVICE=cpu`` for a module: CPU processes stand in for devices, on a GPU host too (the processes a
    test starts inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPLFLOW_DEVICE", "cpu")
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules that hold slow or server tests first, each module's tests kept together and in order.

    `make test` hands whole files to two xdist workers in collection order (`--no-loadscope-reorder`): a long
    module handed out last keeps one worker busy while the other has nothing left to do."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]  # the unit `--dist loadfile` hands out

    heavy = {module(item) for item in items if item.get_closest_marker("slow") or item.get_closest_marker("server")}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(module(item), index)
    items.sort(key=lambda item: (module(item) not in heavy, first_seen[module(item)]))
