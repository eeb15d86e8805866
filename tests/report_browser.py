"""Open pages in headless Chromium over the DevTools protocol, with the standard library only.

Chromium's `--remote-debugging-pipe` reads protocol messages (JSON, each ended by a NUL byte) on
file descriptor 3 and writes replies and events on descriptor 4. We spawn it with those two
descriptors wired to pipes, attach to a page target, and collect what the page logs: console
errors (`Runtime.consoleAPICalled`), uncaught exceptions (`Runtime.exceptionThrown`) and the
browser's own log entries (`Log.entryAdded`: failed loads, blocked requests, ...).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--hide-scrollbars",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
]

#: Evaluated in the page after load: every <img> and whether it decoded.
IMAGES_JS = """
Array.from(document.images).map(img => ({
  alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight
}))
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    images: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)
    screenshot: bytes = b""


class Chromium:
    """One headless Chromium process, driven over the pipe transport."""

    def __init__(self, binary: str, profile: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Move the child's ends above 9 so that placing them at 3 and 4 cannot clobber either.
        high_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)
        self.log = profile.parent / f"{profile.name}.log"
        log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.pid = os.posix_spawn(
                binary,
                [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                    (os.POSIX_SPAWN_DUP2, high_r, 3),
                    (os.POSIX_SPAWN_DUP2, high_w, 4),
                ],
                setpgroup=0,
            )
        finally:
            for fd in (high_r, high_w, log_fd):
                os.close(fd)
        self.write_fd, self.read_fd = to_child_w, from_child_r
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    # -- protocol -------------------------------------------------------------------------

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send a command and wait for its reply; events that arrive meanwhile are kept."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        reply = self._until(lambda m: m.get("id") == self.next_id, f"reply to {method}")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, *methods: str) -> dict:
        """The next event of one of these kinds (one that already arrived first)."""
        for i, event in enumerate(self.events):
            if event.get("method") in methods:
                return self.events.pop(i)
        return self._until(lambda m: m.get("method") in methods, " or ".join(methods))

    def _until(self, wanted: Any, what: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
                self.events.append(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium sent no {what} in {self.timeout:.0f} s")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe; see {self.log}")
                self.buffer += chunk

    # -- pages ----------------------------------------------------------------------------

    def open(self, url: str) -> PageResult:
        """Load `url` in a new tab; return its images, the errors it logged and a screenshot."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        dialogs = []
        while True:  # an alert() would block the load: dismiss it and count it as an error
            event = self.wait_event("Page.loadEventFired", "Page.javascriptDialogOpening")
            if event["method"] == "Page.loadEventFired":
                break
            dialogs.append(
                f"dialog ({event['params'].get('type')}): {event['params'].get('message')}"
            )
            self.send("Page.handleJavaScriptDialog", {"accept": False}, session=session)
        images = self.send(
            "Runtime.evaluate",
            {"expression": IMAGES_JS, "returnByValue": True, "awaitPromise": True},
            session=session,
        )["result"]["value"]
        metrics = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = self.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": 1280,
                    "height": min(metrics["height"], 6000),
                    "scale": 1,
                },
            },
            session=session,
        )["data"]
        self.send("Runtime.evaluate", {"expression": "1"}, session=session)  # flush late events
        errors = dialogs + [e for e in (_error(m) for m in self.events) if e]
        self.send("Target.closeTarget", {"targetId": target})
        return PageResult(images=images, errors=errors, screenshot=base64.b64decode(shot))

    def render(
        self, url: str, texts: list[str], timeout: float = 120.0, width: int = 1280
    ) -> tuple[str, bytes]:
        """Load `url` (a page drawn by script) in a viewport `width` pixels wide and poll its
        text until every one of `texts` shows; return the text and a screenshot of the viewport.
        TimeoutError if they never do (the text then is in the message)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.send("Page.enable", session=session)
        metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.send(
                "Runtime.evaluate",
                {
                    "expression": "document.body ? document.body.innerText : ''",
                    "returnByValue": True,
                },
                session=session,
            )["result"].get("value", "")
            if all(t in text for t in texts):
                break
            time.sleep(0.5)
        else:
            self.send("Target.closeTarget", {"targetId": target})
            raise TimeoutError(f"{url} never showed {texts}; it showed: {text[:2000]}")
        time.sleep(1.0)  # let the table finish its layout before the picture
        shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        self.send("Target.closeTarget", {"targetId": target})
        return text, base64.b64decode(shot)

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.1)
        else:
            os.killpg(self.pid, signal.SIGKILL)  # the group we created: chromium and its helpers
            os.waitpid(self.pid, 0)
        os.close(self.write_fd)
        os.close(self.read_fd)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(message: dict[str, Any]) -> str:
    """The text of an error the page logged, or '' for anything else."""
    method, params = message.get("method"), message.get("params", {})
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = params.get("args", [])
        return "console.error: " + " ".join(
            str(a.get("value", a.get("description", ""))) for a in args
        )
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        exc = details.get("exception", {})
        return "exception: " + str(exc.get("description") or details.get("text"))
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        return f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip()
    return ""
