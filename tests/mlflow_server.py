"""A real `mlflow server` on 127.0.0.1 for tests: a free port found by binding, the server
started on it, polled until `/health` answers; started again on another port if it could not
bind (another process took the port in between). Stopped by its process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _start(folder: Path, port: int, timeout: float) -> tuple[subprocess.Popen, str] | None:
    """Start a server on `port`; None if it exited before answering (the port was taken)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            (folder / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return None
        if _healthy(url):
            return proc, url
        time.sleep(0.5)
    stop(proc)
    raise AssertionError(f"mlflow server on port {port} did not answer /health")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group; SIGKILL if it has not gone after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout: float = 120.0) -> Iterator[str]:
    """A running server over a new SQLite store in `folder`; yields its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(ATTEMPTS):
        started = _start(folder, free_port(), timeout)
        if started is not None:
            break
    else:
        raise AssertionError(f"mlflow server did not start in {ATTEMPTS} attempts")
    proc, url = started
    try:
        yield url
    finally:
        stop(proc)
