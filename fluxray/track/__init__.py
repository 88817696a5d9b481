"""Experiment tracking: the run's local record and its MLflow run."""

from __future__ import annotations

from fluxray.config import JobConfig


def make_tracker(cfg: JobConfig, mlflow_run_id: str | None):
    """Rank 0's tracker: the local run record, plus MLflow when the job has a run."""
    from fluxray.track.tracker import Tracker

    run_dir = cfg.storage_root / "runs" / cfg.save.name
    mlflow_run = None
    if mlflow_run_id:
        from fluxray.track.mlflow_run import MlflowRun, tracking_uri

        mlflow_run = MlflowRun(tracking_uri(cfg), mlflow_run_id)
    return Tracker(run_dir, mlflow_run)
