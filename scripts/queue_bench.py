"""Claims per second from the cell queue: N worker processes claim and complete trivial cells
(no training) until the queue is empty, on a journal file or a database.

    python scripts/queue_bench.py                      # journal file in a temporary folder
    python scripts/queue_bench.py --queue postgresql://USER:PASSWORD@HOST:PORT/DB
    python scripts/queue_bench.py --temporary-postgres # a PostgreSQL cluster of its own (tests/)

A claim is what a worker does before each cell: take a waiting trial, record its owner and first
heartbeat, check that no twin is live, and at the end complete it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnet_ablate.cellqueue import CellQueue, storage_for  # noqa: E402


def worker(url: str, folder: str, name: str, start: mp.Event, counts: mp.Queue) -> None:
    queue = CellQueue(storage_for(url, Path(folder), name), name)
    start.wait()
    claimed = 0
    while (mine := queue.claim()) is not None:
        queue.complete(mine, 0.0, "finished")
        claimed += 1
    counts.put(claimed)


def bench(url: str, cells: int, workers: int) -> tuple[float, int]:
    """(claims per second, claims) for `cells` cells and `workers` processes."""
    folder = tempfile.mkdtemp(prefix="ablate-queue-bench-")
    name = f"bench-{uuid.uuid4().hex[:8]}"
    queue = CellQueue(storage_for(url, Path(folder), name), name)
    queue.enqueue([f"cell-{i:04d}" for i in range(cells)])
    ctx = mp.get_context("spawn")
    start, counts = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(url, folder, name, start, counts)) for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(3.0)  # let every process import and open the storage before the clock starts
    t0 = time.perf_counter()
    start.set()
    claimed = sum(counts.get() for _ in procs)
    seconds = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    return claimed / seconds, claimed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", help="a database URL (default: a journal file)")
    parser.add_argument("--temporary-postgres", action="store_true")
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    def report(url: str | None, what: str) -> None:
        for _ in range(args.repeats):
            rate, claimed = bench(url or "", args.cells, args.workers)
            print(f"{what}: {claimed} claims by {args.workers} workers, {rate:.0f} claims/s")

    if args.temporary_postgres:
        from tests.services import postgres_cluster

        with postgres_cluster() as cluster:
            report(cluster.create_database("bench"), "PostgreSQL")
    else:
        report(args.queue, "database" if args.queue else "journal file")


if __name__ == "__main__":
    main()
