"""Preemption handled like Ctrl-C: SIGTERM (what SLURM and Kubernetes send before they kill a
job) raises ``Interrupted`` in the main thread, so the training that runs records its run as
killed, keeps its checkpoint, and the command exits with the signal's code (128 + its number:
130 for Ctrl-C, 143 for SIGTERM). Only the first signal raises: a second one, which a process
group kill delivers to a worker that its parent also forwards to, must not cut short the
recording of the first.
"""

from __future__ import annotations

import signal
import threading

#: Handled like Ctrl-C. SIGINT keeps Python's own handler (KeyboardInterrupt) where it is set.
TERMINATING = (signal.SIGTERM,)


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signum_of(err: BaseException) -> int:
    """The signal behind an interruption: its own, or SIGINT for a plain KeyboardInterrupt."""
    return getattr(err, "signum", signal.SIGINT)


def signal_name(signum: int) -> str:
    """`Ctrl-C` for SIGINT (what users press), else the signal's name (`SIGTERM`)."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """The shell's convention for a command ended by a signal: 128 + its number."""
    return 128 + signum


class _Once:
    """The handler: raise ``Interrupted`` on the first signal, ignore the ones after it."""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.fired:
            return
        self.fired = True
        raise Interrupted(signum)


def handle_termination() -> None:
    """Turn termination signals into ``Interrupted`` in this process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = _Once()
    for signum in TERMINATING:
        signal.signal(signum, handler)
