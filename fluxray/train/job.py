"""The job driver: resolve the config, prepare the data, open the MLflow run, then train.

`run_job` is what `jobs/train.py`, `fluxray train` and the HTTP API all call. It runs the
loop in this process (`local=True`) or on Ray Train workers (`fluxray.train.ray_trainer`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

from fluxray.config import JobConfig, dump_config
from fluxray.errors import ConfigError

log = logging.getLogger("fluxray.job")


def resolve_job(cfg: JobConfig) -> JobConfig:
    """Fill in what the driver decides once for all workers: the dataset and the run name."""
    from fluxray.data.prepare import is_prepared, prepare_dataset, read_prepared
    from fluxray.model.source import model_source

    model_source(cfg.model.path)  # a typo fails here, before any data is prepared
    what = "a prepared dataset (fluxray prepare) or a folder of images with captions"
    if not cfg.dataset.path:
        raise ConfigError(f"dataset.path: required: {what}")
    src = Path(cfg.dataset.path).expanduser()
    if not src.exists():
        raise ConfigError(f"dataset.path: {str(src)!r} does not exist")
    if not src.is_dir():
        raise ConfigError(f"dataset.path: {src} is a file, not a folder; give {what}")
    update: dict = {}
    if not is_prepared(src):
        # A raw folder (images + captions.json / .txt sidecars): prepare it under the storage root,
        # content-addressed so a resubmit reuses it. The upload itself is never touched.
        from fluxray.data.cache import sha

        trigger = cfg.dataset.trigger_word or _trigger_file(src)
        if not trigger:
            raise ConfigError(f"dataset.trigger_word: required to prepare the raw folder {src} (or put it in trigger.txt)")
        out = cfg.storage_root / "datasets" / f"{src.name}-{sha(str(src.resolve()) + trigger, 10)}"
        if not is_prepared(out):
            captions = next((src / n for n in ("captions.json",) if (src / n).exists()), None)
            report = prepare_dataset(src, captions, trigger_word=trigger, out_dir=out)
            print(report.format(), flush=True)
        update["dataset"] = {**cfg.dataset.model_dump(), "path": str(out), "trigger_word": trigger}
        src = out
    dataset = read_prepared(src)
    info = dataset.info
    if cfg.dataset.trigger_word and cfg.dataset.trigger_word.strip() != info.trigger_word:
        # The captions were written with the prepared trigger: a different one here would train
        # a LoRA that the new word never calls up, and previews without the learned word.
        raise ConfigError(f"dataset.trigger_word: {cfg.dataset.trigger_word!r} differs from {info.trigger_word!r}, "
                          f"the trigger {src} was prepared with; drop the key to use {info.trigger_word!r}, or "
                          f"prepare the images again with the new word (fluxray prepare --trigger ...)")
    trigger = info.trigger_word
    _check_batches(cfg, [path for path, _ in dataset.items])
    if "dataset" not in update:
        update["dataset"] = {**cfg.dataset.model_dump(), "path": str(src.resolve()), "trigger_word": trigger}
    if not cfg.save.name:
        # A trigger may hold what a file name must not ('/', a leading '.'): keep its word characters.
        stem = re.sub(r"[^\w-]+", "_", trigger).strip("_")[:64] or "run"
        update["save"] = {**cfg.save.model_dump(), "name": f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"}
    # A missing model fails here, in the driver, before any worker starts.
    from fluxray.model.pipeline import resolve_model_path

    resolve_model_path(cfg)
    # Absolute paths: Ray workers and `ray job submit` run in other working directories.
    update["storage"] = {"root": str(cfg.storage_root)}
    data = cfg.model_dump()
    for k, v in update.items():
        data[k] = v
    return JobConfig.model_validate(data)


def _check_batches(cfg: JobConfig, images: list[Path]) -> None:
    """Fail before any worker starts when workers x batch cannot be filled from the buckets."""
    from PIL import Image

    from fluxray.data.buckets import check_fits, make_items

    sizes = []
    for path in images:
        with Image.open(path) as im:  # header only
            sizes.append(im.size)
    check_fits(make_items(sizes, cfg.dataset.resolutions), cfg.train.batch_size, cfg.distributed.workers)


def _trigger_file(src: Path) -> str | None:
    f = src / "trigger.txt"
    return f.read_text(encoding="utf-8").strip() if f.exists() else None


def run_dir(cfg: JobConfig) -> Path:
    return cfg.storage_root / "runs" / cfg.save.name


def write_run_config(cfg: JobConfig) -> Path:
    """The resolved config beside the run: what it actually ran with, and what `--resume` reads."""
    d = run_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "config.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path


def run_job(cfg: JobConfig, local: bool = False, resume: bool = False) -> dict:
    """Resolve, record and run one training job; the one function every entry point calls."""
    from fluxray.advise.rules import print_advice
    from fluxray.track import make_tracker
    from fluxray.track.mlflow_run import end_job_run, start_job_run

    submitted = time.time()  # the job's place in the cluster's queue
    if resume and not cfg.save.name:
        raise ConfigError("save.name: --resume needs the name of the run to resume")
    cfg = resolve_job(cfg)
    demand = None
    if not local:  # a job the cluster can never schedule is refused before anything is recorded
        from fluxray.cluster.admission import check_admissible
        from fluxray.train.ray_trainer import connect

        connect()
        demand = check_admissible(cfg)
    print_advice(cfg)  # the guide's advice, printed; it never stops a job
    existing = (run_dir(cfg) / "config.yaml").exists()
    if resume and not existing:
        raise ConfigError(f"save.name: no run named {cfg.save.name!r} under {cfg.storage_root / 'runs'} to resume")
    if existing and not resume:
        print(f"run {cfg.save.name!r} exists: resuming from its last checkpoint", flush=True)
    write_run_config(cfg)
    ticket = None
    if not local:  # PENDING, saying why, until it is first in the cluster's queue and its resources are free
        from fluxray.track.local import RunRecord
        from fluxray.cluster.admission import wait_for_turn

        ticket = wait_for_turn(cfg, demand, submitted, RunRecord(run_dir(cfg)))
    run_id = start_job_run(cfg)
    where = ("in this process (--local: one process, no Ray)" if local
             else f"on {cfg.distributed.workers} Ray Train worker(s)")
    print(f"run {cfg.save.name}: {cfg.train.steps} steps {where}; MLflow run {run_id}", flush=True)
    ok = False
    try:
        if local:
            tracker = make_tracker(cfg, run_id)
            try:
                summary = run_local(cfg, resume=existing, tracker=tracker)
            finally:
                tracker.close()
        else:
            from fluxray.train.ray_trainer import run_ray

            summary = run_ray(cfg, run_id, queue_key=ticket.key)
        ok = True
    finally:
        if ticket is not None:
            ticket.leave()
        # Sends what rank 0 could not send (or says where it waits) and closes the MLflow run.
        end_job_run(cfg, "FINISHED" if ok else "FAILED")
    return {**summary, "run": cfg.save.name, "mlflow_run_id": run_id, "previews": str(run_dir(cfg) / "samples")}


def run_local(cfg: JobConfig, resume: bool = False, tracker=None) -> dict:
    """The whole loop in this process: a world of one, checkpoints under the run folder.

    It resumes from the run's newest checkpoint, local or written by its Ray workers (any world
    size and ZeRO stage).
    """
    from fluxray.train.checkpoint import checkpoint_step
    from fluxray.train.engine import init_single_process_group
    from fluxray.train.loop import WorkerContext, train_worker

    ckpt_root = run_dir(cfg) / "checkpoints"
    resume_dir = latest_checkpoint(cfg) if resume else None

    def report(metrics: dict, ckpt: Path | None) -> None:
        # Keep the newest `save.keep_last` complete checkpoints.
        done = sorted(p for p in ckpt_root.iterdir() if checkpoint_step(p) is not None)
        for old in done[:-cfg.save.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    if cfg.sample.every and cfg.sample.mode == "actor":
        print("sample.mode=actor needs Ray: this local run renders its previews inline", flush=True)
    init_single_process_group()
    ctx = WorkerContext(rank=0, world_size=1, resume_dir=resume_dir, report=report,
                        checkpoint_dir=lambda step: ckpt_root / f"step{step:06d}")
    return train_worker(cfg, ctx, tracker)


def latest_checkpoint(cfg: JobConfig) -> Path | None:
    """The run's newest complete checkpoint: of a local run (`runs/<name>/checkpoints`) or of its
    Ray workers (`<storage.checkpoints or root/ray>/<name>`, when that is a path here)."""
    from fluxray.train import checkpoint
    from fluxray.train.ray_trainer import ray_storage

    folders = [run_dir(cfg) / "checkpoints"]
    if "://" not in ray_storage(cfg):
        folders.append(Path(ray_storage(cfg)) / cfg.save.name)
    return checkpoint.latest_checkpoint(folders)


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=1, default=str)
