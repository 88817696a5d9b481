"""The training recipe: set up → cache → train → preview → save, on every rank.

`train_worker` is the whole loop. It runs unchanged in one local process (a world of
one) and inside each Ray Train worker; `WorkerContext` carries what differs: rank,
world size, the checkpoint to resume from and how to report a checkpoint.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fluxray.advise.convergence import ConvergenceWatch
from fluxray.advise.similarity import SubjectJudge
from fluxray.config import JobConfig
from fluxray.data.buckets import check_fits, make_items, rank_batch
from fluxray.data.cache import CacheStore, build_caches, model_key
from fluxray.errors import FluxrayError
from fluxray.model.generate import generate
from fluxray.model.kohya import kohya_path, save_kohya
from fluxray.model.lora import (add_lora, export_state_dict, lora_metadata, lora_named_params,
                                restore_lora_scale, save_lora, set_lora_scale)
from fluxray.model.pipeline import is_guidance_distilled, load_pipeline, resolve_device, resolve_dtype, resolve_model_path
from fluxray.track.flops import lora_step_flops, peak_flops
from fluxray.train.engine import activation_estimate, choose_zero_stage, gathered, init_engine, partition_numel
from fluxray.train.flow import ema_decay_at, ema_update
from fluxray.train.preview import SimilarityLog, log_previews, unlogged_previews
from fluxray.train.step import StepSpec, training_loss, validation_cases, validation_loss_sum


STATE_FILE = "fluxray_state.json"
LORA_STATE_FILE = "fluxray_lora.safetensors"


@dataclass
class WorkerContext:
    """What differs between a local run and a Ray Train worker."""

    rank: int = 0
    world_size: int = 1
    resume_dir: Path | None = None
    #: Called on every rank at each save with (metrics, local checkpoint dir).
    report: Callable[[dict, Path], None] = lambda metrics, ckpt: None
    #: Where this rank writes a checkpoint before `report` hands it over.
    checkpoint_dir: Callable[[int], Path] = field(default=lambda step: Path("checkpoints") / f"step{step:06d}")
    #: Previews go to a preview actor (`fluxray.train.preview`): no rank renders them.
    preview_actor: bool = False
    #: Rank 0's handle on that actor; the Ray worker entry creates it and kills it.
    preview_renderer: Any = None


@dataclass
class RunPaths:
    """Everything a run writes, under the storage root."""

    root: Path
    name: str

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.name

    @property
    def final_lora(self) -> Path:
        return self.root / "loras" / f"{self.name}.safetensors"

    def step_lora(self, step: int) -> Path:
        return self.run_dir / "loras" / f"{self.name}-step{step:06d}.safetensors"


def _seed_for(seed: int, rank: int, micro_step: int) -> int:
    # Randomness derived from (seed, rank, step): a resumed run draws the same noise.
    return (seed * 1_000_003 + rank * 7_919 + micro_step) % (2**63)


def _all_reduce_sum(values: list[float], world_size: int) -> list[float]:
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=resolve_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


class _Progress:
    """tqdm on a terminal; a plain log line every few steps otherwise (`ray job logs`)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled, self.total = enabled, total
        self.bar = None
        self.every = max(1, total // 50)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, sec_per_step: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            eta = sec_per_step * (self.total - step)
            print(f"step {step}/{self.total} loss {loss:.4f} {1 / max(sec_per_step, 1e-9):.2f} step/s "
                  f"eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_worker(cfg: JobConfig, ctx: WorkerContext, tracker=None) -> dict:
    """Run (or resume) the whole job on this rank; returns a summary. `tracker` only on rank 0."""
    from fluxray.data.prepare import read_prepared

    rank, world = ctx.rank, ctx.world_size
    is_main = rank == 0
    device = resolve_device()
    base_dtype = resolve_dtype(cfg.model.dtype, device)
    bf16 = device.type == "cuda" and cfg.train.mixed_precision in ("auto", "bf16")
    torch.manual_seed(cfg.train.seed)
    paths = RunPaths(cfg.storage_root, cfg.save.name)

    # -- data ---------------------------------------------------------------------------
    from PIL import Image

    dataset = read_prepared(Path(cfg.dataset.path))
    trigger = cfg.dataset.trigger_word or dataset.info.trigger_word
    images = [path for path, _ in dataset.items]
    captions = [text for _, text in dataset.items]
    sizes = []
    for path in images:
        with Image.open(path) as im:  # header only
            sizes.append(im.size)
    items = make_items(sizes, cfg.dataset.resolutions)
    check_fits(items, cfg.train.batch_size, world)
    prompts = cfg.sample_prompts(trigger)

    # -- model and caches ---------------------------------------------------------------
    model_path = resolve_model_path(cfg)
    pipe = load_pipeline(model_path, base_dtype, cfg.model.revision, device, text_encoders=False)
    store = CacheStore(cfg.storage_root, model_key(model_path, cfg.model.revision), cfg.model.max_sequence_length)

    encoders_loaded = False

    def load_text_encoders():
        nonlocal encoders_loaded
        from fluxray.model import pipeline as pipeline_mod

        pipeline_mod.attach_text_encoders(pipe, model_path, base_dtype, cfg.model.revision, device)
        encoders_loaded = True

    t0 = time.time()
    caches = build_caches(pipe, store=store, images=images, items=items,
                          texts=captions + [""] + [p.prompt for p in prompts],
                          load_text_encoders=load_text_encoders, rank=rank, world_size=world,
                          cache_latents=cfg.dataset.cache_latents, cache_texts=cfg.dataset.cache_text_embeddings,
                          barrier=torch.distributed.barrier if world > 1 else (lambda: None))
    cache_seconds = time.time() - t0
    renderer = ctx.preview_renderer
    if renderer is not None:  # once: the actor never loads the text encoders
        renderer.start.remote(prompts, {p.prompt: caches.texts[p.prompt] for p in prompts})
    # The step reads only the caches: drop the text encoders and the VAE encoder.
    if cfg.dataset.cache_text_embeddings:
        pipe.text_encoder = pipe.text_encoder_2 = None
    if cfg.dataset.cache_latents:
        pipe.vae.encoder = None
        if device.type == "cuda":  # the decoder waits on the CPU until a preview needs it
            pipe.vae.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    transformer = pipe.transformer
    spec = StepSpec(shift_factor=pipe.vae.config.shift_factor or 0.0, scaling_factor=pipe.vae.config.scaling_factor,
                    guidance=cfg.train.guidance if is_guidance_distilled(transformer) else None,
                    timestep_sampling=cfg.train.timestep_sampling, timestep_shift=cfg.train.timestep_shift,
                    caption_dropout=cfg.dataset.caption_dropout, device=device,
                    dtype=torch.bfloat16 if bf16 else base_dtype)

    # -- LoRA and the DeepSpeed engine ----------------------------------------------------
    base_params = sum(p.numel() for p in transformer.parameters())
    gpu_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    tokens = max(w * h for w, h in {it.size for it in items}) // 256 + cfg.model.max_sequence_length
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    layers = transformer.config.num_layers + transformer.config.num_single_layers
    checkpointing = cfg.train.gradient_checkpointing == "on"
    act = activation_estimate(hidden, layers, tokens, cfg.train.batch_size, 2 if bf16 else 4, checkpointing)
    if cfg.train.gradient_checkpointing == "auto" and gpu_mem is not None:
        checkpointing = base_params * 2 + act > 0.85 * gpu_mem
        act = activation_estimate(hidden, layers, tokens, cfg.train.batch_size, 2, checkpointing)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    stage, reason = choose_zero_stage(cfg.distributed.zero_stage, base_params=base_params,
                                      bytes_per_param=2 if bf16 else 4, gpu_memory=gpu_mem, activation_bytes=act)
    if is_main:
        print(f"ZeRO stage {stage}: {reason}", flush=True)

    lora_params = add_lora(transformer, cfg.lora, seed=cfg.train.seed)
    names = list(lora_named_params(transformer))
    if cfg.train.compile:
        transformer = torch.compile(transformer)
    engine, optimizer, schedule = init_engine(transformer, lora_params, cfg, world, stage, bf16)
    module = engine.module
    shards = None
    if stage == 3:  # what each rank really holds of the transformer, from DeepSpeed's partitions
        shards = [None] * world
        torch.distributed.all_gather_object(shards, partition_numel(module))
    with gathered(lora_params, stage):
        ema = [p.detach().float().clone() for p in lora_params] if cfg.train.ema else None

    # -- resume ---------------------------------------------------------------------------
    start = 0
    if ctx.resume_dir is not None:
        start, ema, resumed_state = _load_checkpoint(engine, ctx.resume_dir, lora_params, names, ema, stage, world)
        if is_main:
            print(f"resumed from {ctx.resume_dir} at step {start}", flush=True)

    val = validation_cases(items, captions, cfg.validation.images, cfg.validation.sigmas, cfg.train.seed)
    per_rank = math.ceil(len(val) / world)
    my_val = val[rank * per_rank:(rank + 1) * per_rank]
    watch = ConvergenceWatch(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
    if ctx.resume_dir is not None:  # the curve so far: early stop and the best file carry on
        watch.restore(resumed_state.get("convergence"), start)

    def validate(step: int) -> float:
        engine.eval()
        # The weights the LoRA file gets (the EMA when on): the curve, the plateau and the best
        # checkpoint judge the files a user keeps, not the live weights.
        with _holding(lora_params, ema, stage):
            s = validation_loss_sum(engine, my_val, caches.latents, caches.texts, spec)
            # Under ZeRO-3 every rank must run the same number of forwards: pad with repeats.
            if stage == 3 and len(my_val) < per_rank:
                validation_loss_sum(engine, val[:per_rank - len(my_val)], caches.latents, caches.texts, spec)
        total = _all_reduce_sum([s], world)[0]
        engine.train()
        loss = total / len(val)
        if tracker:
            tracker.log_metrics({"val_loss": loss}, step)
        watch.add(step, loss, tracker)  # every rank: they all agree when to stop early
        return loss

    def file_tensors() -> dict[str, torch.Tensor]:
        with gathered(lora_params, stage):
            values = ema if ema is not None else [p.detach() for p in lora_params]
            return export_state_dict(dict(zip(names, values)), cfg.lora.scale, cfg.save.dtype)

    def save_file(step: int, tensors, preview_only: bool = False) -> Path | None:
        if not is_main:
            return None
        meta = lora_metadata(trigger_word=trigger, base_model=cfg.model.path, rank=cfg.lora.rank,
                             alpha=cfg.lora.alpha or cfg.lora.rank, steps=step,
                             resolution=cfg.dataset.resolutions, name=paths.name,
                             extra={"ema": cfg.train.ema, "dataset_hash": dataset.info.content_hash})
        path = save_lora(paths.step_lora(step), tensors, meta)
        if cfg.save.kohya and not preview_only:
            save_kohya(path, tensors, meta)
        watch.saved(step, path, tracker)
        if tracker and not preview_only:
            tracker.log_artifact(path, "checkpoints")
        return path

    # The previews' similarity to the training images (`validation.embedding_model`): scored where
    # they are rendered (rank 0 inline, else the preview actor), logged by rank 0.
    judge = None
    if cfg.validation.embedding_model and is_main and not ctx.preview_actor and cfg.sample.every:
        judge = SubjectJudge.for_job(cfg, images, prompts, trigger)
    similarity = SimilarityLog(tracker)

    def previews(step: int, tensors) -> float:
        """Seconds this rank stops training for the step's previews."""
        t = time.time()
        if not ctx.preview_actor:
            shown = sample_previews(pipe, module, lora_params, tensors, names, prompts, caches.texts, rank, world,
                                    stage, step, tracker)
            if judge is not None:
                similarity.add([(step, judge.score(shown))])
            engine.train()
        elif renderer is not None:  # the step's LoRA file is saved: hand it over, don't wait
            renderer.submit.remote(step, None if tensors is None else str(paths.step_lora(step)))
        return time.time() - t

    if is_main and tracker:
        tracker.status(state="running", step=start, total=cfg.train.steps, zero_stage=stage,
                       zero3_shards=shards, cache_seconds=cache_seconds, cache=caches.stats.__dict__)
    sample_seconds = 0.0
    if start == 0:
        validate(0)
        if cfg.sample.every:
            sample_seconds += previews(0, None)
    elif renderer is not None:
        for step, lora in unlogged_previews(paths.run_dir, start, cfg.sample.every, paths.step_lora):
            renderer.submit.remote(step, lora)

    # -- the loop -------------------------------------------------------------------------
    progress = _Progress(cfg.train.steps, start, is_main)
    engine.train()
    last_loss = float("nan")
    done = start
    train_seconds = 0.0
    last_status = 0.0
    peak = peak_flops(torch.cuda.get_device_name(device)) if bf16 else None  # MFU only where it means something
    for step in range(start, cfg.train.steps):
        t = time.time()
        losses, flops = [], 0.0
        for micro in range(cfg.train.grad_accum):
            ms = step * cfg.train.grad_accum + micro
            batch = rank_batch(items, cfg.train.batch_size, cfg.train.seed, world, rank, ms)
            gen = torch.Generator().manual_seed(_seed_for(cfg.train.seed, rank, ms))
            loss = training_loss(engine, batch, [captions[it.index] for it in batch], caches.latents,
                                 caches.texts, spec, gen)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            flops += lora_step_flops(transformer.config, *batch[0].size, cfg.model.max_sequence_length, len(batch))
        done = step + 1
        if ema is not None:
            with gathered(lora_params, stage):
                ema_update(ema, lora_params, ema_decay_at(step, cfg.train.ema_decay))
        _maybe_crash_for_test(done, rank, paths.run_dir)
        loss_sum, = _all_reduce_sum([sum(losses) / len(losses)], world)
        last_loss = loss_sum / world
        dt = time.time() - t
        train_seconds += dt
        if is_main and tracker:
            gn = engine.get_global_grad_norm()
            images = cfg.train.batch_size * cfg.train.grad_accum * world
            tracker.log_metrics({"loss": last_loss, "lr": schedule.get_last_lr()[0],
                                 "grad_norm": float(gn) if gn is not None else float("nan"),
                                 "step_time": dt, "images_per_sec": images / dt,
                                 **({"mfu": flops / dt / peak} if peak else {})}, done)
        progress.update(done, last_loss, train_seconds / (done - start))
        final = done == cfg.train.steps
        if done % cfg.validation_every == 0 or final:
            validate(done)
            final = final or (cfg.train.early_stop and watch.converged)
        tensors = None
        if done % cfg.save.every == 0 or final:
            tensors = file_tensors()
            with _saving(paths.step_lora(done), cfg.storage_root, done):
                save_file(done, tensors)
            with _saving(ctx.checkpoint_dir(done), cfg.storage_root, done):
                _save_checkpoint(engine, ctx, done, lora_params, ema, stage, world, names, is_main,
                                 {"loss": last_loss, "step": done}, {"convergence": watch.state()})
        if cfg.sample.every and (done % cfg.sample.every == 0 or final):
            if tensors is None:
                # Every previewed step keeps its LoRA file (locally, not as an MLflow artifact), so
                # `POST /v1/generate` with `<run>@<step>` can reproduce any preview.
                tensors = file_tensors()
                save_file(done, tensors, preview_only=True)
            sample_seconds += previews(done, tensors)
        if is_main and tracker and (final or time.time() - last_status > 1.0):  # a file write, not every step
            last_status = time.time()
            tracker.status(step=done, loss=last_loss, sec_per_step=train_seconds / (done - start),
                           sample_seconds=sample_seconds)
            if renderer is not None:
                similarity.poll(renderer)
        if final:
            break
    progress.close()
    preview_wait, rendered = 0.0, {"render_seconds": sample_seconds, "skipped": []}
    if renderer is not None:  # the final previews are logged before the job ends
        import ray

        t = time.time()
        rendered = ray.get(renderer.finish.remote())
        preview_wait = time.time() - t
        similarity.drain(renderer)

    summary = {"steps": done, "convergence": watch.summary(), "start_step": start, "loss": last_loss, "zero_stage": stage,
               "zero3_shards": shards,
               "sample_seconds": sample_seconds, "preview_render_seconds": rendered["render_seconds"],
               "preview_wait_seconds": preview_wait, "previews_skipped": rendered["skipped"],
               "train_seconds": train_seconds, "cache": caches.stats.__dict__, "encoders_loaded": encoders_loaded}
    if is_main:
        final_path = paths.final_lora
        final_path.parent.mkdir(parents=True, exist_ok=True)
        src = paths.step_lora(done)
        if src.exists():
            import shutil

            shutil.copyfile(src, final_path)
            if kohya_path(src).exists():
                shutil.copyfile(kohya_path(src), kohya_path(final_path))
        summary["lora"] = str(final_path)
        if tracker:
            tracker.log_lora(final_path)
            tracker.status(state="finished", step=done, lora=str(final_path), sample_seconds=sample_seconds,
                           preview_render_seconds=rendered["render_seconds"], preview_wait_seconds=preview_wait)
        print(f"LoRA written to {final_path}", flush=True)
        print(watch.result.message, flush=True)  # "likely converged at step N; best checkpoint: ..."
    return summary


# ---------------------------------------------------------------------------------------
# Previews, checkpoints
# ---------------------------------------------------------------------------------------

def sample_previews(pipe, module, lora_params, tensors, names, prompts, texts, rank, world, stage, step, tracker):
    """Each rank renders its share of the prompts with the file's LoRA; rank 0 logs them all and
    returns them (in prompt order; None on the other ranks).

    `tensors` are the exact tensors of the step's LoRA file (None at step 0: the base model),
    loaded into the adapter at scale 1, so a preview is what generate gives for that file.
    """
    module.eval()
    mine = list(range(rank, len(prompts), world))
    results = {}
    with _holding(lora_params, None if tensors is None else [tensors[n] for n in names], stage):
        pipe.vae.to(next(module.parameters()).device)
        if tensors is None:
            module.disable_adapters()
        spare = 0
        if stage == 3:
            # ZeRO-3 gathers the base weights inside every forward, all ranks together: this rank pads
            # its forwards (one per sampling step) up to the busiest rank's with a throw-away render.
            steps = torch.tensor([sum(prompts[k].steps for k in mine)], device=next(module.parameters()).device)
            torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
            spare = int(steps) - sum(prompts[k].steps for k in mine)
        for k in mine:
            p = prompts[k]
            old = set_lora_scale(module, p.lora_scale)
            results[k] = generate(pipe, texts[p.prompt], seed=p.seed, width=p.width, height=p.height, steps=p.steps,
                                  guidance=p.guidance)
            restore_lora_scale(module, old)
        if spare:
            p = prompts[0]
            generate(pipe, texts[p.prompt], seed=p.seed, width=p.width, height=p.height, steps=spare,
                     guidance=p.guidance)
        if tensors is None:
            module.enable_adapters()
        if pipe.vae.device.type == "cuda" and pipe.vae.encoder is None:  # back off the GPU (cached latents)
            pipe.vae.to("cpu")
    if world > 1:
        gathered_results = [None] * world if rank == 0 else None
        torch.distributed.gather_object(results, gathered_results, dst=0)
        if rank == 0:
            for part in gathered_results:
                results.update(part)
    if rank == 0:
        shown = [results[k] for k in sorted(results)]
        log_previews(tracker, shown, step)
        return shown
    return None


def _save_checkpoint(engine, ctx: WorkerContext, step, lora_params, ema, stage, world, names, is_main, metrics,
                     loop_state: dict):
    """All ranks write the DeepSpeed state (LoRA, optimizer, scheduler; not the frozen base) and
    rank 0 a portable copy (LoRA, EMA, step, `loop_state`) that resumes on any world size; then
    one report."""
    from safetensors.torch import save_file

    ckpt = ctx.checkpoint_dir(step)
    ckpt.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt), tag="ds", exclude_frozen_parameters=True)
    with gathered(lora_params, stage):
        if is_main:
            tensors = {f"lora/{n}": p.detach().float().cpu().contiguous() for n, p in zip(names, lora_params)}
            if ema is not None:
                tensors.update({f"ema/{n}": e.cpu().contiguous() for n, e in zip(names, ema)})
            save_file(tensors, str(ckpt / LORA_STATE_FILE))
            # Written last: its presence marks a complete checkpoint.
            (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world, "zero_stage": stage,
                                                       "rng": "derived from (train.seed, rank, step)",
                                                       **loop_state}))
    ctx.report(metrics, ckpt)


@contextmanager
def _saving(path: Path, root: Path, step: int):
    """A failed save leaves no half-written checkpoint, and a full disk fails the job with one clear
    error; the previous checkpoint is untouched, so the job resumes from it once there is space."""
    try:
        yield
    except Exception as e:
        full = _no_space_left(e, path)  # before the cleanup frees space
        if path.is_dir() and not (path / STATE_FILE).exists():
            shutil.rmtree(path, ignore_errors=True)  # never resumed from (no state file), but holds space
        if full:
            raise FluxrayError(f"{path}: No space left on device (ENOSPC) while saving step {step} under "
                               f"storage.root {root}; the previous checkpoint is intact: free space and run "
                               "the job again to resume from it") from e
        raise


def _no_space_left(e: BaseException, path: Path) -> bool:
    # torch.save reports a full disk as "unexpected pos N vs M", safetensors as "os error 28":
    # trust errno or the words where there are any, else ask the disk.
    for err in (e, e.__cause__, e.__context__):
        if err is not None and (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                                or "No space left" in str(err) or "os error 28" in str(err)):
            return True
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < 1 << 20


@contextmanager
def _holding(lora_params, values, stage):
    """The LoRA parameters hold `values` inside the block (None: their own), then their own again."""
    if values is None:
        yield
        return
    with gathered(lora_params, stage, modifier_rank=0):
        saved = [p.detach().clone() for p in lora_params]
        for p, v in zip(lora_params, values):
            p.data.copy_(v.to(p.dtype))
    try:
        yield
    finally:
        with gathered(lora_params, stage, modifier_rank=0):
            for p, v in zip(lora_params, saved):
                p.data.copy_(v)


def _load_checkpoint(engine, ckpt: Path, lora_params, names, ema, stage, world):
    from safetensors.torch import load_file

    state = json.loads((ckpt / STATE_FILE).read_text())
    # By `names` (the order of `lora_params`): safetensors hands the keys back sorted.
    tensors = load_file(str(ckpt / LORA_STATE_FILE))
    if state["world_size"] == world and state["zero_stage"] == stage:
        engine.load_checkpoint(str(ckpt), tag="ds", load_module_strict=False)
    else:
        # A different GPU count or stage: DeepSpeed's shards don't fit, so keep the LoRA and
        # EMA and restart the optimizer moments (logged, not silent).
        print(f"checkpoint from {state['world_size']} workers at ZeRO-{state['zero_stage']}; "
              f"now {world} at ZeRO-{stage}: LoRA and EMA restored, optimizer state restarts", flush=True)
        with gathered(lora_params, stage, modifier_rank=0):
            for p, n in zip(lora_params, names):
                p.data.copy_(tensors[f"lora/{n}"].to(p.dtype))
        engine.lr_scheduler.last_epoch = state["step"]
    if ema is not None:
        ema = [tensors[f"ema/{n}"].clone() if f"ema/{n}" in tensors else e for n, e in zip(names, ema)]
    return int(state["step"]), ema, state


def _maybe_crash_for_test(step: int, rank: int, run_dir: Path) -> None:
    """Fault injection for the failure tests: `FLUXRAY_CRASH_AT=<step>:<rank>` kills that worker once."""
    spec = os.environ.get("FLUXRAY_CRASH_AT")
    if not spec:
        return
    at, who = (int(x) for x in spec.split(":"))
    marker = run_dir / f".crashed-{at}-{who}"
    if step == at and rank == who and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("injected failure\n")
        print(f"FLUXRAY_CRASH_AT: rank {rank} exits at step {step}", flush=True)
        os._exit(1)
