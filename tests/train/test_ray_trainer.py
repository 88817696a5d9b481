"""What the Ray Train layer hands the workers and Ray: the driver's switches and MLflow server,
and where the run's checkpoints live (the integration runs are in test_distributed.py)."""

import pytest

from fluxray.config import build_config
from fluxray.errors import ConfigError
from fluxray.train.ray_trainer import ray_storage, worker_env


def test_workers_get_the_fluxray_switches_and_the_mlflow_server_of_the_driver(monkeypatch):
    monkeypatch.setenv("FLUXRAY_CRASH_AT", "15:1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-workers")
    monkeypatch.setenv("FLUXRAY_API_TOKEN", "the-services-secret")  # an operator's shell that also serves
    env = worker_env()
    assert env["FLUXRAY_CRASH_AT"] == "15:1" and env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert env["PYTHONUNBUFFERED"] == "1" and "AWS_SECRET_ACCESS_KEY" not in env
    # Blanked: a worker's base environment is its raylet's, which may hold the operator's.
    assert env["FLUXRAY_API_TOKEN"] == "" and "the-services-secret" not in env.values()


def test_checkpoints_live_under_the_root_or_in_storage_checkpoints(tmp_path):
    assert ray_storage(build_config({}, [f"storage.root={tmp_path}"])) == str(tmp_path / "ray")
    cfg = build_config({}, [f"storage.root={tmp_path}", "storage.checkpoints=s3://bucket/fluxray"])
    assert ray_storage(cfg) == "s3://bucket/fluxray"


def test_an_object_store_root_is_refused_with_where_to_put_it():
    with pytest.raises(ConfigError, match=r"storage\.root: must be a path .* storage\.checkpoints, got 's3://b/x'"):
        build_config({}, ["storage.root=s3://b/x"])
