"""What the training loop calls to record a run; MLflow sits behind it on rank 0.

`Tracker` writes the local run record and forwards to MLflow when a run id is given;
other ranks get `None` and record nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fluxray.track.local import RunRecord

log = logging.getLogger(__name__)


class Tracker:
    """Local record first, then MLflow (if configured)."""

    def __init__(self, run_dir: Path, mlflow_run=None):
        self.record = RunRecord(run_dir)
        self.mlflow = mlflow_run  # an object with the same methods, or None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.record.log_metrics(metrics, step)
        if self.mlflow:
            self.mlflow.log_metrics(metrics, step)

    def log_image(self, image, key: str, step: int) -> None:
        path = self.record.save_image(image, key, step)
        if self.mlflow:
            self.mlflow.log_image(image, key, step, path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.mlflow:
            self.mlflow.set_tags(tags)

    def status(self, **fields) -> None:
        self.record.set_status(**fields)

    def close(self) -> None:
        if self.mlflow:
            self.mlflow.close()
