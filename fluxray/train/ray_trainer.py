"""Ray Train layer: a TorchTrainer whose workers each run `train_worker` with DeepSpeed inside.

The scaling, failure and checkpoint settings come from `distributed` and `save`. The run
lives at `<ray_storage>/<name>`: fitting again with the same name resumes from its last
checkpoint (Ray Train restores it), which is how `--resume` and a resubmitted job work.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fluxray.config import JobConfig


def ray_storage(cfg: JobConfig) -> str:
    """Ray Train's `storage_path`: `storage.checkpoints` (a shared path or s3://, gs://), else `<root>/ray`."""
    return cfg.storage.checkpoints or str(cfg.storage_root / "ray")


def worker_env() -> dict[str, str]:
    """Driver environment that every worker gets: unbuffered prints (`ray job logs`), the MLflow
    server, the `FLUXRAY_*` switches (such as the `FLUXRAY_CRASH_AT` fault injection) and the
    libraries' quiet settings (`fluxray.logs`)."""
    from fluxray.logs import worker_env as quiet_env

    # Ray Train's print patch also sends each print through its logger: every progress line
    # would show twice in `ray job logs`.
    env = {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **quiet_env()}
    env.update({k: v for k, v in os.environ.items() if k.startswith("FLUXRAY_") or k == "MLFLOW_TRACKING_URI"})
    return env


def _connect() -> None:
    import ray

    if not ray.is_initialized():
        # Joins a running cluster (`ray start --head`, or $RAY_ADDRESS under `ray job submit`),
        # else starts a local one.
        from fluxray.cluster import connect

        connect(log_to_driver=True, configure_logging=False)


def use_gpu(cfg: JobConfig) -> tuple[bool, float]:
    """(use_gpu, gpus per worker): `auto` follows whether the cluster has GPUs."""
    import ray

    g = cfg.distributed.gpus_per_worker
    if g == "auto":
        g = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return g > 0, float(g)


def run_ray(cfg: JobConfig, run_id: str | None) -> dict:
    """Fit the job on `distributed.workers` Ray Train workers; returns rank 0's summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fluxray.logs import ray_train_log_level
    from fluxray.train.preview import use_preview_actor

    _connect()
    gpu, gpus = use_gpu(cfg)
    resources = {"CPU": cfg.distributed.cpus_per_worker}
    if gpu:
        resources["GPU"] = gpus
    # Decided once, here, so that every rank agrees on who renders.
    actor = use_preview_actor(cfg, gpus if gpu else 0.0, ray.available_resources())
    if cfg.sample.every:
        print(f"previews: {'on a preview actor' if actor else 'inline, on the workers'} "
              f"(sample.mode={cfg.sample.mode})", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_main,
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id, "preview_actor": actor},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.distributed.workers, use_gpu=gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.save.name, storage_path=ray_storage(cfg),
            failure_config=FailureConfig(max_failures=cfg.distributed.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.save.keep_last),
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=LoggingConfig(log_level=ray_train_log_level())),
    )
    result = trainer.fit()
    summary_file = cfg.storage_root / "runs" / cfg.save.name / "summary.json"
    import json

    return json.loads(summary_file.read_text()) if summary_file.exists() else {"metrics": result.metrics}


def _worker_main(config: dict) -> None:
    """Entry of each Ray Train worker."""
    import json

    import ray.train
    from ray.train import Checkpoint

    from fluxray.logs import setup_worker
    from fluxray.train.checkpoint import checkpoint_step, latest_checkpoint
    from fluxray.train.job import run_dir
    from fluxray.train.loop import WorkerContext, train_worker
    from fluxray.train.preview import start_renderer
    from fluxray.track import make_tracker

    setup_worker()
    cfg = JobConfig.model_validate(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    ray_copy = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        ray_copy = Path(tempfile.mkdtemp(prefix="fluxray-resume-"))
        ckpt.to_directory(str(ray_copy))
    # A run that went on with `--local` after Ray Train's last save resumes from the newer save.
    found = [p for p in (ray_copy, latest_checkpoint([run_dir(cfg) / "checkpoints"])) if p is not None]
    resume_dir = max(found, key=checkpoint_step) if found else None
    scratch = Path(tempfile.mkdtemp(prefix=f"fluxray-ckpt-r{rank}-"))

    def checkpoint_dir(step: int) -> Path:
        return scratch / f"step{step:06d}"

    def report(metrics: dict, path: Path | None) -> None:
        # One report per save, on every rank; rank 0 hands over the checkpoint (it holds the whole state).
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)) if path else None,
                         checkpoint_dir_name=f"checkpoint-step{metrics['step']:06d}")
        # Wait until the controller has recorded it (it polls every ~2 s): a driver killed after
        # this line resumes from this save, not from the one before.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if path:
            shutil.rmtree(path, ignore_errors=True)

    tracker = make_tracker(cfg, config.get("mlflow_run_id")) if rank == 0 else None
    # Rank 0 owns the preview actor, rather than the driver: Ray kills an actor with the process
    # that owns it, so a failed worker group (and Ray Train's restart of it) leaves none behind.
    # Started first, it loads its pipeline while the workers fill their caches.
    renderer = start_renderer(cfg, config.get("mlflow_run_id")) if rank == 0 and config["preview_actor"] else None
    try:
        summary = train_worker(cfg, WorkerContext(rank=rank, world_size=world, resume_dir=resume_dir,
                                                  report=report, checkpoint_dir=checkpoint_dir,
                                                  preview_actor=config["preview_actor"],
                                                  preview_renderer=renderer), tracker)
        if rank == 0:
            path = cfg.storage_root / "runs" / cfg.save.name / "summary.json"
            path.write_text(json.dumps(summary, default=str))
    finally:
        if renderer is not None:
            ray.kill(renderer)
        if tracker:
            tracker.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if ray_copy:
            shutil.rmtree(ray_copy, ignore_errors=True)
