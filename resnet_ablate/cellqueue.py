"""The work queue of a grid, kept in Optuna's storage so that many processes can share it.

Each pending cell is an enqueued trial of one study per grid (user attribute ``cell_key``). A
worker claims a waiting trial atomically (``set_trial_state_values`` to RUNNING succeeds for
exactly one caller, the mechanism Optuna's own ``Study.ask`` uses) and then runs the cell only if
its trial is the lowest-numbered live trial of that cell: two ``ablate run`` started at once may
both enqueue a cell, but only one trial per cell ever trains. A journal file under ``results/``
serves one machine; a database URL (``--queue postgresql://...``) serves several.

A running trial carries its host, process id and a heartbeat; a trial whose process is gone (on
this host) or whose heartbeat is stale (elsewhere) is failed so its cell can be enqueued again.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import optuna

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0
ATTR_KEY = "cell_key"


def storage_for(url: str | None, results: Path, grid_name: str) -> optuna.storages.BaseStorage:
    """Optuna storage: a journal file under results/queue/ by default, else a database URL."""
    import optuna

    if url and "://" in url:
        return optuna.storages.RDBStorage(url)
    path = Path(url) if url else results / "queue" / f"{grid_name}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_journal(path)


def open_journal(path: Path) -> optuna.storages.BaseStorage:
    """The journal at `path`, its torn last line dropped; a corrupt one is one clear error.

    A write cut short (a crash, a full disk) leaves a last line without its newline. Optuna
    skips such a line when it reads, but its next append would glue onto it and make a corrupt
    line that every later read stops at; so it is cut off here, under the journal's own lock
    (no writer is mid-append then). The operation it held never took effect for anyone.
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    backend = JournalFileBackend(str(path), lock_obj=lock)
    lock.acquire()
    try:
        drop_torn_tail(path)
    finally:
        lock.release()
    try:
        return JournalStorage(backend)
    except ValueError as err:  # json.JSONDecodeError included
        raise UserError(
            f"{path}: the queue journal is corrupt ({err}); move it aside and run again "
            "(the queue is rebuilt from the MLflow store, which keeps every result)"
        ) from None


def drop_torn_tail(path: Path) -> int:
    """Cut the file back to its last newline; returns how many bytes were dropped."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = size
        while keep > 0:  # scan back in blocks for the last newline
            start = max(0, keep - 65536)
            f.seek(start)
            block = f.read(keep - start)
            at = block.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            keep = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


@dataclass(frozen=True)
class Claim:
    """A trial this process owns, and the cell it stands for."""

    trial_id: int
    number: int
    key: str


def owner_alive(trial: optuna.trial.FrozenTrial, now: float) -> bool:
    """Whether a running trial's owner still runs: its pid on this host, else its heartbeat."""
    attrs = trial.user_attrs
    if attrs.get("host") == socket.gethostname() and "pid" in attrs:
        try:
            os.kill(int(attrs["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if "heartbeat" not in attrs:  # just claimed: its owner is about to write host and pid
        return now - trial.datetime_start.timestamp() < STALE_SECONDS
    return now - float(attrs["heartbeat"]) < STALE_SECONDS


def mark_owner(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """Record this process as the owner of a running trial (host, pid, first heartbeat)."""
    storage.set_trial_user_attr(trial_id, "host", socket.gethostname())
    storage.set_trial_user_attr(trial_id, "pid", os.getpid())
    storage.set_trial_user_attr(trial_id, "heartbeat", time.time())


def reap_stale(
    storage: optuna.storages.BaseStorage, study_id: int
) -> list[optuna.trial.FrozenTrial]:
    """Fail the running trials of a study whose owner is gone; returns them (as they were)."""
    from optuna.trial import TrialState

    now, reaped = time.time(), []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        if not owner_alive(trial, now):
            storage.set_trial_user_attr(trial._trial_id, "stale", True)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            reaped.append(trial)
    return reaped


class CellQueue:
    """One grid's queue of cells in an Optuna study (one trial per claim of a cell)."""

    def __init__(self, storage: optuna.storages.BaseStorage, name: str):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = storage
        self.study = optuna.create_study(
            study_name=name, storage=storage, direction="minimize", load_if_exists=True
        )
        self.study_id = storage.get_study_id_from_name(name)

    def _trials(self, *states: optuna.trial.TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states or None)

    def reap_stale(self) -> int:
        """Fail running trials whose process is gone, so their cells can be queued again."""
        return len(reap_stale(self.storage, self.study_id))

    def enqueue(self, keys: list[str]) -> int:
        """Queue each cell that has no waiting or running trial yet; returns how many."""
        from optuna.trial import TrialState

        self.reap_stale()
        live = {
            t.user_attrs.get(ATTR_KEY) for t in self._trials(TrialState.WAITING, TrialState.RUNNING)
        }
        fresh = [key for key in keys if key not in live]
        for key in fresh:
            self.study.enqueue_trial({}, user_attrs={ATTR_KEY: key})
        return len(fresh)

    def running_elsewhere(self) -> set[str]:
        """Cells whose trial runs in another live process."""
        from optuna.trial import TrialState

        now = time.time()
        return {
            str(t.user_attrs.get(ATTR_KEY))
            for t in self._trials(TrialState.RUNNING)
            if owner_alive(t, now) and t.user_attrs.get("pid") != os.getpid()
        }

    def claim(self) -> Claim | None:
        """Take the next waiting cell for this process, or None when the queue is empty."""
        from optuna.trial import TrialState

        while waiting := self._trials(TrialState.WAITING):
            for trial in waiting:
                try:
                    won = self.storage.set_trial_state_values(
                        trial._trial_id, state=TrialState.RUNNING
                    )
                except Exception:  # finished meanwhile by another process
                    won = False
                if not won:
                    continue
                mark_owner(self.storage, trial._trial_id)
                mine = Claim(trial._trial_id, trial.number, str(trial.user_attrs.get(ATTR_KEY)))
                if self._first_live(mine):
                    return mine
                self.release(mine, duplicate=True)
        return None

    def _first_live(self, mine: Claim) -> bool:
        """Whether this trial should train its cell: no finished twin, no lower live twin."""
        from optuna.trial import TrialState

        now = time.time()
        for trial in self._trials():
            if trial.user_attrs.get(ATTR_KEY) != mine.key or trial.number == mine.number:
                continue
            if trial.state == TrialState.COMPLETE:
                return False
            lower_live = trial.state == TrialState.WAITING or (
                trial.state == TrialState.RUNNING and owner_alive(trial, now)
            )
            if trial.number < mine.number and lower_live:
                return False
        return True

    def complete(self, mine: Claim, value: float, status: str) -> None:
        """The cell reached a result (finished or diverged): it is never queued again."""
        from optuna.trial import TrialState

        self.storage.set_trial_user_attr(mine.trial_id, "status", status)
        self.storage.set_trial_state_values(
            mine.trial_id, state=TrialState.COMPLETE, values=[value]
        )

    def release(self, mine: Claim, *, duplicate: bool = False, status: str = "") -> None:
        """Give a cell back: failed or interrupted (queued again next time), or a duplicate."""
        from optuna.trial import TrialState

        if duplicate:
            self.storage.set_trial_user_attr(mine.trial_id, "duplicate", True)
        if status:
            self.storage.set_trial_user_attr(mine.trial_id, "status", status)
        state = TrialState.PRUNED if duplicate else TrialState.FAIL
        self.storage.set_trial_state_values(mine.trial_id, state=state)

    def heartbeat(self, mine: Claim) -> Heartbeat:
        return Heartbeat(self.storage, mine.trial_id)


class Heartbeat:
    """Refreshes a claimed trial's heartbeat from a background thread while its cell trains."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="heartbeat")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat is harmless; the next retries
                self._storage.set_trial_user_attr(self._trial_id, "heartbeat", time.time())

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
