"""Database URLs checked before anything is written, and one value agreed through the queue."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from pathlib import Path

import pytest

from resnet_ablate.cellqueue import agree_once, stale_seconds, storage_for
from resnet_ablate.databases import check_shared, check_urls, is_database, masked
from resnet_ablate.errors import UserError


def test_database_urls_are_told_from_files_and_servers():
    assert is_database("postgresql://u:p@db:5432/q")
    assert is_database("postgresql+psycopg://u@db/q")
    for url in (None, "", "results/queue/x.journal", "sqlite:///x.db", "http://h:5000"):
        assert not is_database(url)


def test_passwords_are_never_printed():
    assert masked("postgresql://ablate:s3cret@db:5432/q") == "postgresql://ablate:***@db:5432/q"


def test_a_shared_queue_with_a_local_store_is_refused_naming_the_uri_to_use():
    with pytest.raises(UserError, match=r"--tracking-uri http://") as err:
        check_shared("postgresql://ablate:s3cret@db/q", "sqlite:////tmp/results/mlflow.db")
    assert "s3cret" not in str(err.value)
    check_shared("postgresql://ablate@db/q", "http://mlflow:5000")  # shared: fine
    check_shared(None, "sqlite:////tmp/results/mlflow.db")  # one machine: fine


def test_a_missing_driver_names_the_extra():
    with pytest.raises(UserError, match=r"resnet-ablate\[postgres\]"):
        check_urls("postgresql+psycopg2://ablate:x@127.0.0.1:1/q", "http://mlflow:5000")


def test_a_database_that_is_down_is_one_sentence():
    with pytest.raises(UserError, match="the database cannot be used") as err:
        check_urls("postgresql://ablate:s3cret@127.0.0.1:1/q", "http://mlflow:5000")
    assert "\n" not in str(err.value) and "s3cret" not in str(err.value)


def test_the_stale_time_is_a_setting(monkeypatch):
    monkeypatch.setenv("ABLATE_STALE_SECONDS", "7")
    assert stale_seconds() == 7
    monkeypatch.setenv("ABLATE_STALE_SECONDS", "soon")
    with pytest.raises(UserError, match="ABLATE_STALE_SECONDS"):
        stale_seconds()


def _agree(folder: str, start, out) -> None:
    storage = storage_for(None, Path(folder), "grid")
    start.wait()
    out.put(agree_once(storage, "parent:grid", lambda: uuid.uuid4().hex, lambda _: True))


def test_processes_started_together_agree_on_one_value(tmp_path):
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(str(tmp_path), start, out)) for _ in range(3)]
    for proc in procs:
        proc.start()
    start.set()
    values = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join()
    assert len(set(values)) == 1
    # A later process gets the same value; one no longer valid is made again, once.
    storage = storage_for(None, tmp_path, "grid")
    assert agree_once(storage, "parent:grid", lambda: "other", lambda _: True) == values[0]
    assert agree_once(storage, "parent:grid", lambda: "new", lambda _: False) == "new"
    assert agree_once(storage, "parent:grid", lambda: "newer", lambda v: v == "new") == "new"
