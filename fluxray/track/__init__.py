"""Experiment tracking: the run's local record, its MLflow run and the FLOP counts of MFU."""

from __future__ import annotations

from fluxray.config import JobConfig


def make_tracker(cfg: JobConfig, mlflow_run_id: str | None, previews: bool = False):
    """Rank 0's tracker: the local run record plus the job's MLflow run.

    `mlflow_run_id` is None when the driver could not reach MLflow (and said so): the
    tracker opens the run itself once MLflow answers, and spools until then. `previews`: the
    preview actor's, which logs images only, with its own spool (rank 0 owns the metrics).
    """
    from fluxray.track.mlflow_run import PENDING_FILE, PREVIEW_PENDING_FILE, MlflowRun, ray_job_id
    from fluxray.track.tracker import Tracker

    run_dir = cfg.storage_root / "runs" / cfg.save.name
    spool = run_dir / (PREVIEW_PENDING_FILE if previews else PENDING_FILE)
    tracker = Tracker(run_dir, MlflowRun(cfg, mlflow_run_id, spool, down=mlflow_run_id is None), metrics=not previews)
    job = ray_job_id()
    if job:  # the driver of a `ray job submit` has not joined Ray yet when it opens the run
        tracker.set_tags({"ray.job_id": job})
    return tracker
