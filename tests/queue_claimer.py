"""A claimer process for the queue test: imports only the queue, so it starts fast."""

from __future__ import annotations

from pathlib import Path

from resnet_ablate.cellqueue import CellQueue, storage_for


def claim_all(folder: str) -> list[str]:
    """Take cells from the grid `g`'s queue under `folder` until it is empty; their keys."""
    queue = CellQueue(storage_for(None, Path(folder), "g"), "cells:g")
    mine = []
    while (claim := queue.claim()) is not None:
        mine.append(claim.key)
        queue.complete(claim, 0.0, "finished")
    return mine
