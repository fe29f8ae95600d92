"""A real Prefect server on a loopback port for tests, and the processes that talk to it.

``running_prefect_server`` starts ``prefect server start`` in its own ``PREFECT_HOME`` (SQLite there, or the
database URL given), waits for ``/api/health``, yields a ``PrefectServer`` and stops the server and every
process it spawned at the end. ``prefect_server_fixture()`` makes it a pytest fixture: in a test module,
``server = prefect_server_fixture()`` gives the tests of that module one server (per database asked for).
``ProcessGroup`` runs a CLI (``prefect deploy``, ``prefect worker start``) against the server in a process
group of its own, so stopping it also stops the flow-run processes a worker started. ``running_postgres``
gives a throw-away PostgreSQL cluster (the Debian packages' binaries) on a loopback port for the server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HEALTH_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it; there is a small window before the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_command(*args: str) -> list[str]:
    """``prefect ARGS`` run by this interpreter, so tests use the venv's Prefect whatever PATH holds."""
    return [sys.executable, "-m", "prefect", *args]


def base_env(home: Path) -> dict[str, str]:
    """The environment of every process in a test topology: private PREFECT_HOME, no telemetry, no prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_LOGGING_COLORS": "false",
            "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
        }
    )
    return env


@dataclass
class ProcessGroup:
    """A subprocess started in a new session: ``stop()`` signals its whole process group."""

    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> ProcessGroup:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return cls(proc, log)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; on timeout stop the group and raise with the end of its log."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"{self.proc.args} still running after {timeout:.0f} s\n{self.tail()}") from None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the group, SIGKILL to what is left after ``grace`` seconds; then reap the leader."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.1)
            if not _group_alive(self.proc.pid):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)

    def tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return text[-chars:]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class PrefectServer:
    """A running server: its API URL and the environment a client process needs to reach it."""

    api_url: str
    home: Path
    process: ProcessGroup
    env: dict[str, str] = field(default_factory=dict)

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self.env, **extra}

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
        log_name: str = "cli",
    ) -> tuple[int, str]:
        """Run ``prefect ARGS`` against this server; returns (exit code, its output)."""
        log = self.home / "logs" / f"{log_name}-{time.monotonic_ns()}.log"
        group = ProcessGroup.start(prefect_command(*args), env or self.env, log, cwd=cwd)
        try:
            code = group.wait(timeout)
        finally:
            group.stop(grace=2.0)
        return code, group.tail(20_000)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


def wait_healthy(api_url: str, server: ProcessGroup, timeout: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(f"prefect server exited with {server.proc.returncode}\n{server.tail()}")
        try:
            with _NO_PROXY.open(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s\n{server.tail()}")


@contextlib.contextmanager
def running_prefect_server(
    home: Path, database_url: str | None = None, ui: bool = False, timeout: float = HEALTH_TIMEOUT_S
) -> Iterator[PrefectServer]:
    """Start ``prefect server start`` on 127.0.0.1 and a free port; stop it and its children on exit."""
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(home)
    server_env = {**env, "PREFECT_UI_ENABLED": "true" if ui else "false"}
    if database_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    group = ProcessGroup.start(
        prefect_command("server", "start", "--host", "127.0.0.1", "--port", str(port)),
        server_env,
        home / "logs" / "server.log",
    )
    try:
        wait_healthy(api_url, group, timeout)
        yield PrefectServer(api_url, home, group, env={**env, "PREFECT_API_URL": api_url})
    finally:
        group.stop()


def prefect_server_fixture(
    scope: str = "module", databases: tuple[str, ...] = ("sqlite",)
) -> Callable[..., Iterator[PrefectServer]]:
    """A fixture yielding a ``PrefectServer``, once per database (``sqlite``, ``postgresql``) asked for.

    In a test module: ``server = prefect_server_fixture()``. The PostgreSQL case skips where it is not installed.
    """
    unknown = set(databases) - {"sqlite", "postgresql"}
    if unknown:
        raise ValueError(f"databases: unknown {sorted(unknown)}, expected 'sqlite' or 'postgresql'")

    @pytest.fixture(scope=scope, params=list(databases))
    def _server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
        with contextlib.ExitStack() as stack:
            database_url = stack.enter_context(running_postgres()) if request.param == "postgresql" else None
            home = tmp_path_factory.mktemp(f"prefect-home-{request.param}")
            yield stack.enter_context(running_prefect_server(home, database_url=database_url))

    return _server


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def postgres_bindir() -> Path | None:
    """The folder of ``pg_ctl`` and ``initdb`` (PATH, else Debian's /usr/lib/postgresql/N/bin), or None."""
    found = shutil.which("pg_ctl")
    candidates = [found] if found else sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    for candidate in candidates:
        bindir = Path(candidate).resolve().parent
        if (bindir / "initdb").exists():
            return bindir
    return None


@contextlib.contextmanager
def running_postgres(timeout: float = 60.0) -> Iterator[str]:
    """A fresh PostgreSQL cluster on 127.0.0.1 and a free port; yields its asyncpg URL for Prefect.

    PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user (``runuser``).
    The cluster is stopped (immediate mode) and its files removed on exit. Skips when PostgreSQL is absent.
    """
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (pg_ctl, initdb)")
    as_root = os.geteuid() == 0
    if as_root and (shutil.which("runuser") is None or not _user_exists("postgres")):
        pytest.skip("running as root without runuser or a postgres user: PostgreSQL refuses to run as root")
    as_user = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = tempfile.mkdtemp(prefix="gplflow-pg-")  # not under pytest's 0700 tmp: the postgres user needs it
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    data, port = Path(root) / "data", free_port()

    def run(*cmd: str | Path) -> None:
        args = [*as_user, *map(str, cmd)]
        done = subprocess.run(args, timeout=timeout, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: {done.stderr or done.stdout}")

    try:
        run(bindir / "initdb", "-D", data, "-U", "prefect", "--auth=trust", "--no-sync", "-E", "UTF8")
        run(
            bindir / "pg_ctl",
            "-D",
            data,
            "-l",
            Path(root) / "postgres.log",
            "-w",
            "-t",
            str(int(timeout)),
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        try:
            run(bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
            yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
        finally:
            run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
