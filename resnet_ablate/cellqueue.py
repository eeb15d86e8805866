"""The work queue of a grid, kept in Optuna's storage so that many processes can share it.

Each pending cell is an enqueued trial of one study per grid (user attribute ``cell_key``). A
worker claims a waiting trial atomically (``set_trial_state_values`` to RUNNING succeeds for
exactly one caller, the mechanism Optuna's own ``Study.ask`` uses) and then runs the cell only if
its trial is the lowest-numbered live trial of that cell: two ``ablate run`` started at once may
both enqueue a cell, but only one trial per cell ever trains. A journal file under ``results/``
serves one machine; a database URL (``--queue postgresql://...``) serves several.

A running trial carries its host, process id and a heartbeat; a trial whose owner stopped
beating is failed so its cell can be enqueued again, and live workers do this while the grid
runs (``take_over``). On a database the heartbeat is Optuna's own (``record_heartbeat``), stamped
and judged by the database's clock, so machines whose clocks disagree still agree on who is
dead; on a journal file (one machine) it is the owner's process id, else its wall-clock beat.
``ABLATE_STALE_SECONDS`` sets how long a silent owner counts as alive (default 120 s; beats every
sixth of it); ``ABLATE_HOST`` names this machine (default: its host name).

``agree_once`` gives every process that shares the storage one value created once: the grid's
parent run, however many machines start the grid at the same moment.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import optuna

ATTR_KEY = "cell_key"
ENV_STALE = "ABLATE_STALE_SECONDS"
ENV_HOST = "ABLATE_HOST"


def stale_seconds() -> int:
    """How long a running trial's owner may stay silent before its cell is taken over."""
    value = os.environ.get(ENV_STALE, "120")
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise UserError(f"{ENV_STALE}={value}: give a whole number of seconds, at least 1")
    return seconds


def heartbeat_seconds() -> float:
    """How often a worker beats: six beats fit in the stale time."""
    return max(0.5, stale_seconds() / 6)


def host_name() -> str:
    """This machine as the queue knows it: ``$ABLATE_HOST``, else the host name."""
    return os.environ.get(ENV_HOST) or socket.gethostname()


def storage_for(url: str | None, results: Path, grid_name: str) -> optuna.storages.BaseStorage:
    """Optuna storage: a journal file under results/queue/ by default, else a database URL
    (with Optuna's heartbeat on, judged by the database's clock)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the console is the tool's own

    if url and "://" in url:
        return _database_storage(url)
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


def _database_storage(url: str, tries: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's storage on a database, heartbeat on. Machines that start together on a new
    database race to create its tables; the losers see the winner's tables on a retry."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(1, tries + 1):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=max(1, math.ceil(heartbeat_seconds())),
                    grace_period=stale_seconds(),
                )
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == tries:
                raise
            time.sleep(random.SystemRandom().uniform(0.2, 0.5) * attempt)  # global RNG untouched
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Claim:
    """A trial this process owns, and the cell it stands for."""

    trial_id: int
    number: int
    key: str


def db_clock(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage keeps heartbeats by the database's clock (a database, not a file)."""
    return getattr(storage, "heartbeat_interval", None) is not None


def stale_ids(storage: optuna.storages.BaseStorage, study_id: int) -> set[int] | None:
    """Running trials whose owner stopped beating, by the database's clock; None on a file."""
    if not db_clock(storage):
        return None
    return set(storage._get_stale_trial_ids(study_id))  # type: ignore[attr-defined]


def owner_alive(trial: optuna.trial.FrozenTrial, now: float, stale: set[int] | None = None) -> bool:
    """Whether a running trial's owner still runs. On a database: it beat within the stale time
    (database clock; `stale` from ``stale_ids``). On a file: its pid on this host, else its
    heartbeat."""
    if stale is not None:
        return trial._trial_id not in stale
    attrs = trial.user_attrs
    if attrs.get("host") == host_name() and "pid" in attrs:
        try:
            os.kill(int(attrs["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if "heartbeat" not in attrs:  # just claimed: its owner is about to write host and pid
        return now - trial.datetime_start.timestamp() < stale_seconds()
    return now - float(attrs["heartbeat"]) < stale_seconds()


def beat(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """One heartbeat of a running trial: Optuna's (database clock) where the storage has one,
    and the wall-clock attribute a file's readers judge."""
    if db_clock(storage):
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
    storage.set_trial_user_attr(trial_id, "heartbeat", time.time())


def mark_owner(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
    """Record this process as the owner of a running trial (host, pid, first heartbeat)."""
    beat(storage, trial_id)
    storage.set_trial_user_attr(trial_id, "host", host_name())
    storage.set_trial_user_attr(trial_id, "pid", os.getpid())


def reap_stale(
    storage: optuna.storages.BaseStorage, study_id: int
) -> list[optuna.trial.FrozenTrial]:
    """Fail the running trials of a study whose owner is gone; returns those this process
    failed (as they were). Two processes reaping at once fail each trial once."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    now, reaped = time.time(), []
    stale = stale_ids(storage, study_id)
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_alive(trial, now, stale):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "stale", True)
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                reaped.append(trial)
        except UpdateFinishedTrialError:  # another process reaped (or its owner ended) it
            continue
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

        now, stale = time.time(), stale_ids(self.storage, self.study_id)
        return {
            str(t.user_attrs.get(ATTR_KEY))
            for t in self._trials(TrialState.RUNNING)
            if owner_alive(t, now, stale) and not _mine(t)
        }

    def take_over(self) -> int:
        """Fail the trials of owners that stopped beating and queue their cells again (unless
        a twin completed them); returns how many cells were queued again."""
        from optuna.trial import TrialState

        reaped = reap_stale(self.storage, self.study_id)
        if not reaped:
            return 0
        done = {t.user_attrs.get(ATTR_KEY) for t in self._trials(TrialState.COMPLETE)}
        keys = sorted({str(t.user_attrs.get(ATTR_KEY)) for t in reaped} - done)
        return self.enqueue(keys) if keys else 0

    def claim(self) -> Claim | None:
        """Take the next waiting cell for this process, or None when the queue is empty."""
        from optuna.trial import TrialState

        # One read of the queue serves the whole pass: the twins it shows as live or done stay
        # so (finished states are final), and a twin queued later has a higher number.
        while True:
            trials = self._trials()
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            if not waiting:
                return None
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
                if self._first_live(mine, trials):
                    return mine
                self.release(mine, duplicate=True)

    def _first_live(self, mine: Claim, trials: list[optuna.trial.FrozenTrial]) -> bool:
        """Whether this trial should train its cell: no finished twin, no lower live twin."""
        from optuna.trial import TrialState

        twins = [t for t in trials if t.user_attrs.get(ATTR_KEY) == mine.key]
        twins = [t for t in twins if t.number != mine.number]
        if any(t.state == TrialState.COMPLETE for t in twins):
            return False
        lower = [t for t in twins if t.number < mine.number]
        if any(t.state == TrialState.WAITING for t in lower):
            return False
        running = [t for t in lower if t.state == TrialState.RUNNING]
        if not running:
            return True
        now, stale = time.time(), stale_ids(self.storage, self.study_id)
        return not any(owner_alive(t, now, stale) for t in running)

    def complete(self, mine: Claim, value: float, status: str) -> None:
        """The cell reached a result (finished or diverged): it is never queued again."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        with contextlib.suppress(UpdateFinishedTrialError):  # reaped: this owner was silent
            self.storage.set_trial_user_attr(mine.trial_id, "status", status)
            self.storage.set_trial_state_values(
                mine.trial_id, state=TrialState.COMPLETE, values=[value]
            )

    def release(self, mine: Claim, *, duplicate: bool = False, status: str = "") -> None:
        """Give a cell back: failed or interrupted (queued again next time), or a duplicate."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        with contextlib.suppress(UpdateFinishedTrialError):  # reaped: this owner was silent
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
        while not self._stop.wait(heartbeat_seconds()):
            with contextlib.suppress(Exception):  # a missed beat is harmless; the next retries
                beat(self._storage, self._trial_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _mine(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether this process owns a running trial."""
    attrs = trial.user_attrs
    return attrs.get("host") == host_name() and attrs.get("pid") == os.getpid()


def agree_once(
    storage: optuna.storages.BaseStorage,
    name: str,
    make: Callable[[], str],
    valid: Callable[[str], bool],
    wait_seconds: float = 120.0,
) -> str:
    """One value for every process sharing `storage`, made once (the grid's parent run).

    Creating the study `name` succeeds for exactly one process (the database's unique name, or
    the journal's lock): that one calls `make()` and stores the result; the others wait for it.
    A stored value that is no longer `valid` (its run was deleted) is made again. Should the
    maker die before storing it, a waiting process makes it after `wait_seconds`.
    """
    from optuna.exceptions import DuplicatedStudyError
    from optuna.study import StudyDirection

    try:
        study_id = storage.create_new_study([StudyDirection.MINIMIZE], name)
    except DuplicatedStudyError:
        study_id = storage.get_study_id_from_name(name)
    else:
        value = make()
        storage.set_study_user_attr(study_id, "value", value)
        return value
    deadline = time.monotonic() + wait_seconds
    while (value := storage.get_study_user_attrs(study_id).get("value")) is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if value is not None and valid(str(value)):
        return str(value)
    value = make()
    storage.set_study_user_attr(study_id, "value", value)
    return value
