"""MLflow: one run per job, created by the driver; rank 0 logs into it by id.

The store defaults to sqlite under the storage root (MLflow 3 rejects a bare `file:`
store for tracking) with artifacts beside it; a cluster points `tracking.uri` (or
$MLFLOW_TRACKING_URI) at an `http://` server.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fluxray.config import JobConfig

log = logging.getLogger("fluxray.mlflow")


def tracking_uri(cfg: JobConfig) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then `sqlite:///<root>/mlflow/mlflow.db`."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{cfg.storage_root / 'mlflow' / 'mlflow.db'}"


def artifact_root(cfg: JobConfig) -> str:
    return (cfg.storage_root / "mlflow" / "artifacts").as_uri()


def start_job_run(cfg: JobConfig, resume: bool = False) -> str | None:
    """Create (or on resume, find) the job's MLflow run and log params and tags; returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.tracking.experiment, artifact_location=artifact_root(cfg) if uri.startswith("sqlite") else None)
    found = client.search_runs([exp_id], filter_string=f"tags.`fluxray.run_name` = '{cfg.save.name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=cfg.save.name, tags={"fluxray.run_name": cfg.save.name})
    return run.info.run_id


class MlflowRun:
    """Rank 0's handle on the job's run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_image(self, image, key: str, step: int, path: Path | None = None) -> None:
        self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def close(self) -> None:
        pass
