"""What is checked before anything is written: the results folder can be written, and a
tracking server given by URL answers. Each failure is one ``TrackingError`` sentence."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import TrackingError


def check_results_dir(results: Path) -> None:
    """Make sure results/ can be written before anything trains."""
    if results.exists() and not results.is_dir():
        raise TrackingError(f"{results}: is a file, not a folder; pass --results DIR")
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise TrackingError(
            f"{results}: cannot write results here ({err.strerror or err}); "
            f"fix its permissions or pass --results DIR"
        ) from None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking URI must answer ``/health`` before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingError(
        f"tracking server {uri} is unreachable ({problem}); start it (mlflow server) or "
        f"point --tracking-uri elsewhere"
    )
