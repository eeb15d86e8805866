"""Reading a test's MLflow record: the client of a working folder's store, a grid's cell runs,
a metric's steps."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient


def client_for(workdir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workdir / 'results' / 'mlflow.db'}")


def cell_runs(client: MlflowClient, grid: str = "smoke"):
    experiment = client.get_experiment_by_name(grid)
    assert experiment is not None
    return client.search_runs(
        [experiment.experiment_id], filter_string="tags.`ablate.role` = 'cell'"
    )


def steps(client: MlflowClient, run_id: str, key: str = "train_err") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))
