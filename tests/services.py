"""Real services for the several-machines tests: a PostgreSQL cluster in a temporary folder on
127.0.0.1 (Debian's binaries, initdb + pg_ctl, password login), and a real `mlflow server` whose
backend store is a database on it. Both are stopped at the end. Without PostgreSQL's binaries
the tests that need them are skipped, visibly, with the package to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = "ablate"
PASSWORD = "grid-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    if os.getuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@dataclass
class Postgres:
    """A running cluster: its folder, port and binaries."""

    folder: Path
    port: int
    bin: Path

    def url(self, database: str, password: str = PASSWORD, scheme: str = "postgresql") -> str:
        return f"{scheme}://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} password={PASSWORD} dbname={database}"

    def tables(self, database: str) -> list[str]:
        """The tables in a database's public schema (what anything wrote there)."""
        import psycopg

        with psycopg.connect(self.dsn(database)) as conn:
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        return sorted(row[0] for row in rows)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """initdb a cluster in a new temporary folder, start it on 127.0.0.1, stop and remove it."""
    binaries = postgres_bin()
    if binaries is None:
        pytest.skip("PostgreSQL binaries not found: apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="ablate-pg-"))
    data = folder / "data"
    (folder / "pw").write_text(PASSWORD + "\n")
    if os.getuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(folder / "pw", "postgres", "postgres")
    port = free_port()
    initdb = [str(binaries / "initdb"), "-D", str(data), "-U", USER, "-A", "scram-sha-256"]
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run(_as_server_user([*initdb, "--pwfile", str(folder / "pw")]), **run)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    pg_ctl = [str(binaries / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        _as_server_user([*pg_ctl, "-o", options, "-l", str(folder / "log"), "-w", "start"]), **run
    )
    try:
        yield Postgres(folder, port, binaries)
    finally:
        subprocess.run(_as_server_user([*pg_ctl, "-m", "fast", "-w", "stop"]), **run)
        shutil.rmtree(folder, ignore_errors=True)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 backed by a database, that a test can stop and start
    again on the same port (the record lives in the database and the artifact folder)."""

    def __init__(self, backend_uri: str, artifacts: Path):
        self.backend_uri, self.artifacts = backend_uri, artifacts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            self.artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            command,
            cwd=self.artifacts.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.healthy():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def mlflow_server(postgres: Postgres, folder: Path) -> Iterator[MlflowServer]:
    """An `mlflow server` on a new database of the cluster, its artifacts under `folder`."""
    backend = postgres.create_database("mlflow").replace("postgresql://", "postgresql+psycopg://")
    server = MlflowServer(backend, folder / "artifacts")
    server.start()
    try:
        yield server
    finally:
        server.stop()
