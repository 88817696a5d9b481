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
    libraries' quiet settings (`fluxray.logs`), but never a secret such as the service's
    FLUXRAY_API_TOKEN: a worker runs the job's code."""
    from fluxray.logs import worker_env as quiet_env

    # Ray Train's print patch also sends each print through its logger: every progress line
    # would show twice in `ray job logs`. The token is blanked, not only left out: a worker starts
    # from its raylet's environment, which has it if the shell that ran `ray start` exported it.
    env = {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "FLUXRAY_API_TOKEN": "", **quiet_env()}
    env.update({k: v for k, v in os.environ.items()
                if (k.startswith("FLUXRAY_") and "TOKEN" not in k) or k == "MLFLOW_TRACKING_URI"})
    return env


def connect() -> None:
    import ray

    if not ray.is_initialized():
        # Joins a running cluster (`ray start --head`, or $RAY_ADDRESS under `ray job submit`),
        # else starts a local one.
        from fluxray.cluster import connect

        connect(log_to_driver=True, configure_logging=False)


def run_ray(cfg: JobConfig, run_id: str | None, queue_key: str | None = None) -> dict:
    """Fit the job on `distributed.workers` Ray Train workers; returns rank 0's summary.

    Called once the job is admitted (`fluxray.cluster.admission`): its resources were free, so
    workers that still do not start within `distributed.start_timeout_s` fail the job at once
    with the reason, instead of Ray Train retrying in silence.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fluxray.logs import ray_train_log_level
    from fluxray.cluster.admission import worker_resources
    from fluxray.train.preview import use_preview_actor

    connect()
    resources = worker_resources(cfg, ray.cluster_resources().get("GPU", 0.0))
    gpus = resources.get("GPU", 0.0)
    # Decided once, here, so that every rank agrees on who renders.
    actor = use_preview_actor(cfg, gpus, ray.available_resources())
    if cfg.sample.every:
        print(f"previews: {'on a preview actor' if actor else 'inline, on the workers'} "
              f"(sample.mode={cfg.sample.mode})", flush=True)
    timeout = cfg.distributed.start_timeout_s
    # Read by Ray Train's controller, which gets the driver's value of it.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(timeout)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_main,
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id, "preview_actor": actor,
                           "queue_key": queue_key},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.distributed.workers, use_gpu=bool(gpus),
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.distributed.placement.upper()),
        run_config=RunConfig(
            name=cfg.save.name, storage_path=ray_storage(cfg),
            # A worker group that cannot start is not retried (controller_failure_limit=0).
            failure_config=FailureConfig(max_failures=cfg.distributed.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.save.keep_last),
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=LoggingConfig(log_level=ray_train_log_level())),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        if "WorkerGroupStartupTimeoutError" in _causes(e):
            from fluxray.cluster import node_free
            from fluxray.errors import FluxrayError
            from fluxray.cluster.admission import job_demand, queue_snapshot, waiting_for

            others = [q for q in queue_snapshot() if q["key"] != queue_key and q["state"] != "queued"]
            why = waiting_for(job_demand(cfg, gpus), node_free(), others)
            raise FluxrayError(f"distributed.start_timeout_s: the workers did not start within {timeout:g} s, "
                               f"{why}") from None
        raise
    summary_file = cfg.storage_root / "runs" / cfg.save.name / "summary.json"
    import json

    return json.loads(summary_file.read_text()) if summary_file.exists() else {"metrics": result.metrics}


def _causes(e: BaseException) -> str:
    """The class names in an exception's chain (Ray Train wraps the controller's error)."""
    names = []
    while e is not None and len(names) < 10:
        names.append(type(e).__name__)
        names.append(type(getattr(e, "controller_failure", None)).__name__)
        e = e.__cause__ or e.__context__
    return " ".join(names)


def _worker_main(config: dict) -> None:
    """Entry of each Ray Train worker."""
    import json

    import ray.train
    from ray.train import Checkpoint

    from fluxray.logs import setup_worker

    # Before the model libraries are imported: some speak when first imported (torchao, bitsandbytes).
    setup_worker()
    from fluxray.cluster.admission import mark_running
    from fluxray.train.checkpoint import checkpoint_step, latest_checkpoint
    from fluxray.train.job import run_dir
    from fluxray.train.loop import WorkerContext, train_worker
    from fluxray.train.preview import start_renderer
    from fluxray.track import make_tracker

    cfg = JobConfig.model_validate(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    print(f"rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()}", flush=True)

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
    if tracker is not None:  # the workers are placed: the job runs, and the next in the queue may start
        mark_running(config.get("queue_key"))
        tracker.status(state="running", reason=None, workers=world)
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
