"""The training recipe: one rank's whole job, as named phases that run in order.

    setup_data    the prepared dataset, its aspect buckets, the validation set, the preview prompts
    load_model    the memory plan's `auto` choices; the base pipeline in `model.dtype` (its block linears
                  quantized as they load with `model.quantize`), without its text encoders
    fill_caches   latents and caption embeddings (each rank its share); then the encoders go
    setup_lora    the fp32 LoRA, gradient checkpointing, the ZeRO stage, the DeepSpeed engine, the EMA
    resume        LoRA, AdamW state, EMA, LR schedule, step and validation curve from a checkpoint
    train         the step loop, with validation, saves and previews on their schedules
    finish        the last previews, the final LoRA file, the summary

`train_worker` runs them unchanged in one local process (a world of one) and inside each Ray
Train worker; `WorkerContext` carries what differs: rank, world size, the checkpoint to resume
from and how to report one. Each phase can be driven alone, as the tests do.
"""

from __future__ import annotations

import gc
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
from fluxray.config import JobConfig, SamplePrompt
from fluxray.data.buckets import Item, check_fits, make_items, rank_batch
from fluxray.data.cache import CacheStore, build_caches, model_key
from fluxray.model.generate import generate
from fluxray.model.kohya import kohya_path, save_kohya
from fluxray.model.lora import (add_lora, export_state_dict, lora_metadata, lora_named_params,
                                restore_lora_scale, save_lora, set_lora_scale)
from fluxray.model.pipeline import is_guidance_distilled, load_pipeline, resolve_device, resolve_model_path
from fluxray.model.quantize import module_bytes
from fluxray.track.flops import lora_step_flops, peak_flops
from fluxray.track.local import RunPaths
from fluxray.train.checkpoint import capture_state, read_checkpoint, restore_state, saving, write_checkpoint
from fluxray.train.engine import ParamMeter, gathered, init_engine, load_partitioned_transformer, partition_numel
from fluxray.train.flow import ema_decay_at, ema_update
from fluxray.train.precision import resolve_precision
from fluxray.train.preview import SimilarityLog, log_previews, unlogged_previews
from fluxray.train.step import StepSpec, training_loss, validation_cases, validation_loss_sum


@dataclass
class WorkerContext:
    """What differs between a local run and a Ray Train worker."""

    rank: int = 0
    world_size: int = 1
    resume_dir: Path | None = None
    #: Called on every rank at each save with (metrics, the checkpoint folder: rank 0's, None elsewhere).
    report: Callable[[dict, Path | None], None] = lambda metrics, ckpt: None
    #: Where rank 0 writes a checkpoint before `report` hands it over.
    checkpoint_dir: Callable[[int], Path] = field(default=lambda step: Path("checkpoints") / f"step{step:06d}")
    #: Previews go to a preview actor (`fluxray.train.preview`): no rank renders them.
    preview_actor: bool = False
    #: Rank 0's handle on that actor; the Ray worker entry creates it and kills it.
    preview_renderer: Any = None


@dataclass
class TrainData:
    """The prepared dataset as the loop reads it."""

    trigger: str
    content_hash: str
    images: list[Path]
    captions: list[str]
    #: Every (image, aspect bucket) pair the resolutions allow.
    items: list[Item]
    prompts: list[SamplePrompt]


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
    return LoraRecipe(cfg, ctx, tracker).run()


class LoraRecipe:
    """One rank's job; `run` calls the phases in order, each sets what the next ones read."""

    def __init__(self, cfg: JobConfig, ctx: WorkerContext, tracker=None):
        self.cfg, self.ctx, self.tracker = cfg, ctx, tracker
        self.rank, self.world = ctx.rank, ctx.world_size
        self.is_main = self.rank == 0  # who logs, writes the LoRA files and the checkpoint
        self.device = resolve_device()
        self.precision = resolve_precision(cfg, self.device)
        self.paths = RunPaths(cfg.storage_root, cfg.save.name)
        self.renderer = ctx.preview_renderer
        self.watch = ConvergenceWatch(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta)
        self.similarity = SimilarityLog(tracker, self.watch)
        self.start = self.done = 0
        self.last_loss = float("nan")
        self.cache_seconds = self.sample_seconds = self.train_seconds = 0.0
        self.encoders_loaded = False
        self.judge: SubjectJudge | None = None
        self.meter = ParamMeter()  # this rank's transformer parameter bytes, peak per phase
        torch.manual_seed(cfg.train.seed)

    def run(self) -> dict:
        self.setup_data()
        self.load_model()
        self.fill_caches()
        self.setup_lora()
        self.resume()
        self.train()
        return self.finish()

    # -- phases ---------------------------------------------------------------------------

    def setup_data(self) -> None:
        """The prepared dataset, its (image, bucket) items, the fixed validation set and the prompts."""
        from PIL import Image

        from fluxray.data.prepare import read_prepared

        cfg = self.cfg
        dataset = read_prepared(Path(cfg.dataset.path))
        trigger = cfg.dataset.trigger_word or dataset.info.trigger_word
        images = [path for path, _ in dataset.items]
        sizes = []
        for path in images:
            with Image.open(path) as im:  # header only
                sizes.append(im.size)
        self.image_sizes = sizes
        items = make_items(sizes, cfg.dataset.resolutions)
        check_fits(items, cfg.train.batch_size, self.world)
        self.data = TrainData(trigger=trigger, content_hash=dataset.info.content_hash, images=images,
                              captions=[text for _, text in dataset.items], items=items,
                              prompts=cfg.sample_prompts(trigger))
        self.val = validation_cases(items, self.data.captions, cfg.validation.images, cfg.validation.sigmas,
                                    cfg.train.seed)
        self.val_per_rank = math.ceil(len(self.val) / self.world)
        self.my_val = self.val[self.rank * self.val_per_rank:(self.rank + 1) * self.val_per_rank]

    def load_model(self) -> None:
        """The memory plan's `auto` choices (`choose_setting`), then the base pipeline, its weights in
        `model.dtype` on this rank's device (the block linears quantized as they load when the setting
        says so), without the text encoders (a cached job never needs T5; `fill_caches` attaches them
        if a caption is missing), and what the step needs to know of it (`spec`)."""
        cfg = self.cfg
        self.model_path = resolve_model_path(cfg)
        self.choose_setting()
        with self.meter.during("load", watch=False):
            transformer = None
            if self.setting.zero_stage == 3 and os.environ.get("FLUXRAY_ZERO3_LOAD") != "whole":
                # Partitioned from the start: no rank ever holds the whole transformer.
                transformer = load_partitioned_transformer(self.model_path, self.precision.base, cfg.model.revision,
                                                           self.meter)
            self.pipe = load_pipeline(self.model_path, self.precision.base, cfg.model.revision, self.device,
                                      text_encoders=False, quantize=self.setting.quantize, transformer=transformer)
            if transformer is None:  # `FLUXRAY_ZERO3_LOAD=whole`: the old load-then-partition path, the meter's control
                self.meter.attach(self.pipe.transformer)
        vae = self.pipe.vae.config
        self.spec = StepSpec(
            shift_factor=vae.shift_factor or 0.0, scaling_factor=vae.scaling_factor,
            guidance=cfg.train.guidance if is_guidance_distilled(self.pipe.transformer) else None,
            timestep_sampling=cfg.train.timestep_sampling, timestep_shift=cfg.train.timestep_shift,
            caption_dropout=cfg.dataset.caption_dropout, device=self.device, dtype=self.precision.base,
            autocast=self.precision.compute)

    def choose_setting(self) -> None:
        """Quantization, ZeRO stage and gradient checkpointing: what the config sets, and for each `auto`
        the memory plan's pick for this rank's GPU (`fluxray.advise.memory.choose`: the fastest setting
        that fits with headroom; on a CPU the fastest). Rank 0 logs it with its numbers."""
        from fluxray.advise.memory import choose, local_gpu

        gpu = local_gpu() if self.device.type == "cuda" else None
        chosen, why = choose(self.cfg, gpu, sizes=self.image_sizes, workers=self.world)
        self.setting = chosen.setting
        self.memory_plan = {"setting": chosen.setting.describe(), "planned_peak_bytes": chosen.peak,
                            "gpu": gpu.label if gpu else None, "why": why}
        if self.is_main:
            print(f"memory plan: {chosen.line(gpu)}; {why}", flush=True)

    def fill_caches(self) -> None:
        """Latents of every item and embeddings of every caption and prompt (each rank fills its share
        of what is missing); then the text encoders and the VAE encoder go: the step reads the caches."""
        with self.meter.during("caches", watch=False):
            self._fill_caches()

    def _fill_caches(self) -> None:
        from fluxray.model import pipeline as pipeline_mod

        cfg, pipe, data, device = self.cfg, self.pipe, self.data, self.device

        def load_text_encoders():
            pipeline_mod.attach_text_encoders(pipe, self.model_path, self.precision.base, cfg.model.revision, device)
            self.encoders_loaded = True

        t0 = time.time()
        store = CacheStore(cfg.storage_root, model_key(self.model_path, cfg.model.revision),
                           cfg.model.max_sequence_length)
        self.caches = build_caches(
            pipe, store=store, images=data.images, items=data.items,
            texts=data.captions + [""] + [p.prompt for p in data.prompts], load_text_encoders=load_text_encoders,
            rank=self.rank, world_size=self.world, cache_latents=cfg.dataset.cache_latents,
            cache_texts=cfg.dataset.cache_text_embeddings,
            barrier=torch.distributed.barrier if self.world > 1 else (lambda: None))
        self.cache_seconds = time.time() - t0
        if self.renderer is not None:  # once: the actor never loads the text encoders
            self.renderer.start.remote(data.prompts, {p.prompt: self.caches.texts[p.prompt] for p in data.prompts})
        if cfg.dataset.cache_text_embeddings:
            pipe.text_encoder = pipe.text_encoder_2 = None
        if cfg.dataset.cache_latents:
            pipe.vae.encoder = None
            if device.type == "cuda":  # the decoder waits on the CPU until a preview needs it
                pipe.vae.to("cpu")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def setup_lora(self) -> None:
        """The LoRA (fp32), gradient checkpointing, the ZeRO stage, the DeepSpeed engine and the EMA."""
        with self.meter.during("engine", watch=False):
            self._setup_lora()

    def _setup_lora(self) -> None:
        cfg, precision = self.cfg, self.precision
        transformer = self.pipe.transformer
        self.checkpointing = self.setting.checkpointing
        if self.checkpointing:
            transformer.enable_gradient_checkpointing()
        stage = self.setting.zero_stage
        setting = cfg.distributed.zero_stage
        reason = (f"distributed.zero_stage={setting} in the config" if setting != "auto"
                  else f"the memory plan's pick ({self.memory_plan['why']})")
        if self.is_main:
            print(f"ZeRO stage {stage}: {reason}", flush=True)
            print(f"precision: {precision.describe(self.setting.quantize)}", flush=True)

        params = add_lora(transformer, cfg.lora, seed=cfg.train.seed)
        for p in params:  # peft makes the LoRA in the base's dtype: it trains in fp32 (see precision)
            p.data = p.data.to(precision.trainable)
        self.lora = init_engine(transformer, params, list(lora_named_params(transformer)), cfg, self.world, stage)
        self.shards = None
        if stage == 3:  # what each rank really holds of the transformer, from DeepSpeed's partitions
            self.shards = [None] * self.world
            torch.distributed.all_gather_object(self.shards, partition_numel(self.lora.module))
        if cfg.train.ema:
            self.lora.ema = [v.detach().float().clone() for v in self.lora.values()]

    def resume(self) -> None:
        """From `ctx.resume_dir`: the LoRA (module and master copy), AdamW's state, the EMA, the LR
        schedule's position, the step and the validation curve; what could not be kept is logged."""
        if self.ctx.resume_dir is None:
            return
        state = read_checkpoint(self.ctx.resume_dir)
        notes = restore_state(self.lora, state, self.world)
        self.start = self.done = state.step
        self.watch.restore(state.loop.get("convergence"), self.start)  # early stop and the best file carry on
        if self.is_main:
            for line in notes:
                print(f"resume: {line}", flush=True)
            print(f"resumed from {self.ctx.resume_dir} at step {self.start}", flush=True)

    def train(self) -> None:
        """The step loop from `start`: validation every `validation_every`, a save (LoRA file and
        checkpoint) every `save.every`, previews every `sample.every`; to `train.steps`, or to an
        early stop."""
        cfg, tracker = self.cfg, self.tracker
        # The previews' similarity to the training images (`validation.embedding_model`), scored where
        # they are rendered: rank 0 inline (the preview actor scores its own), logged by rank 0.
        if cfg.validation.embedding_model and self.is_main and not self.ctx.preview_actor and cfg.sample.every:
            self.judge = SubjectJudge.for_job(cfg, self.data.images, self.data.prompts, self.data.trigger)
        if self.is_main and tracker:
            tracker.status(state="running", step=self.start, total=cfg.train.steps, zero_stage=self.lora.stage,
                           memory_plan=self.memory_plan,
                           zero3_shards=self.shards, cache_seconds=self.cache_seconds,
                           cache=self.caches.stats.__dict__)
        if self.start == 0:
            self.validate(0)
            if cfg.sample.every:
                self.preview(0, None)
        elif self.renderer is not None:
            for step, lora in unlogged_previews(self.paths.run_dir, self.start, cfg.sample.every, self.paths.step_lora):
                self.renderer.submit.remote(step, lora)

        progress = _Progress(cfg.train.steps, self.start, self.is_main)
        self.lora.engine.train()
        last_status = 0.0
        for step in range(self.start, cfg.train.steps):
            t = time.time()
            with self.meter.during("steps"):
                loss, flops = self.train_step(step)
            self.done = step + 1
            _maybe_crash_for_test(self.done, self.rank, self.paths.run_dir)
            self.last_loss = _all_reduce_sum([loss], self.world)[0] / self.world
            dt = time.time() - t
            self.train_seconds += dt
            self.log_step(dt, flops)
            progress.update(self.done, self.last_loss, self.train_seconds / (self.done - self.start))
            final = self.done == cfg.train.steps
            if self.done % cfg.validation_every == 0 or final:
                self.validate(self.done)
                # Only rank 0 has the likeness scores: every rank stops on its word.
                final = final or (cfg.train.early_stop and _all_reduce_sum([float(self.is_main and self.watch.converged)],
                                                                           self.world)[0] > 0)
            tensors = None
            if self.done % cfg.save.every == 0 or final:
                tensors = self.save(self.done)
            if cfg.sample.every and (self.done % cfg.sample.every == 0 or final):
                if tensors is None:
                    # Every previewed step keeps its LoRA file (locally, not as an MLflow artifact), so
                    # `POST /v1/generate` with `<run>@<step>` can reproduce any preview.
                    tensors = self.file_tensors()
                    self.save_lora_file(self.done, tensors, preview_only=True)
                self.preview(self.done, tensors)
            if self.is_main and tracker and (final or time.time() - last_status > 1.0):  # a file write, not every step
                last_status = time.time()
                tracker.status(step=self.done, loss=self.last_loss,
                               sec_per_step=self.train_seconds / (self.done - self.start),
                               sample_seconds=self.sample_seconds)
                if self.renderer is not None:
                    self.similarity.poll(self.renderer)
            if final:
                break
        progress.close()

    def finish(self) -> dict:
        """The preview actor's last previews, the final LoRA file (`loras/<name>.safetensors`, and its
        kohya copy), the finished status; returns the run's summary."""
        tracker, paths = self.tracker, self.paths
        preview_wait, rendered = 0.0, {"render_seconds": self.sample_seconds, "skipped": []}
        if self.renderer is not None:  # the final previews are logged before the job ends
            import ray

            t = time.time()
            rendered = ray.get(self.renderer.finish.remote())
            preview_wait = time.time() - t
            self.similarity.drain(self.renderer)
        summary = {"steps": self.done, "convergence": self.watch.summary(), "start_step": self.start,
                   "loss": self.last_loss, "zero_stage": self.lora.stage, "zero3_shards": self.shards,
                   "sample_seconds": self.sample_seconds, "preview_render_seconds": rendered["render_seconds"],
                   "preview_wait_seconds": preview_wait, "previews_skipped": rendered["skipped"],
                   "train_seconds": self.train_seconds, "cache": self.caches.stats.__dict__,
                   "encoders_loaded": self.encoders_loaded, "memory_plan": self.memory_plan,
                   "base_bytes": module_bytes(self.lora.module), "param_bytes": self.param_bytes()}
        if not self.is_main:
            return summary
        final_path = paths.final_lora
        final_path.parent.mkdir(parents=True, exist_ok=True)
        src = paths.step_lora(self.done)
        if src.exists():
            shutil.copyfile(src, final_path)
            if kohya_path(src).exists():
                shutil.copyfile(kohya_path(src), kohya_path(final_path))
        summary["lora"] = str(final_path)
        if tracker:
            tracker.log_lora(final_path)
            tracker.status(state="finished", step=self.done, lora=str(final_path), sample_seconds=self.sample_seconds,
                           preview_render_seconds=rendered["render_seconds"], preview_wait_seconds=preview_wait)
        print(f"LoRA written to {final_path}", flush=True)
        print(self.watch.result.message, flush=True)  # "likely converged at step N; best checkpoint: ..."
        return summary

    def param_bytes(self) -> dict:
        """Each rank's peak transformer parameter bytes per phase, as fractions of the whole model
        (`fractions`, one dict a rank) and in bytes (`whole`, `peaks`). All ranks."""
        peaks = [self.meter.peaks]
        if self.world > 1:
            peaks = [None] * self.world
            torch.distributed.all_gather_object(peaks, self.meter.peaks)
        whole = self.meter.whole
        return {"whole": whole, "peaks": peaks,
                "fractions": [{k: v / whole for k, v in p.items()} for p in peaks] if whole else []}

    # -- what the step loop does --------------------------------------------------------

    def micro_batch(self, micro_step: int) -> tuple[list[Item], list[str], torch.Generator]:
        """This rank's batch, captions and random generator of one micro-step (derived, not drawn)."""
        cfg = self.cfg
        batch = rank_batch(self.data.items, cfg.train.batch_size, cfg.train.seed, self.world, self.rank, micro_step)
        gen = torch.Generator().manual_seed(_seed_for(cfg.train.seed, self.rank, micro_step))
        return batch, [self.data.captions[it.index] for it in batch], gen

    def train_step(self, step: int) -> tuple[float, float]:
        """Optimizer step `step` + 1 (its `train.grad_accum` micro-batches), then the EMA's update;
        returns this rank's mean loss and the step's FLOPs."""
        cfg, lora = self.cfg, self.lora
        losses, flops = [], 0.0
        for micro in range(cfg.train.grad_accum):
            batch, captions, gen = self.micro_batch(step * cfg.train.grad_accum + micro)
            loss = training_loss(lora.engine, batch, captions, self.caches.latents, self.caches.texts, self.spec, gen)
            lora.micro_step(loss)
            losses.append(loss.item())
            flops += lora_step_flops(lora.module.config, *batch[0].size, cfg.model.max_sequence_length, len(batch))
        if lora.ema is not None:
            with gathered(lora.params, lora.stage):
                ema_update(lora.ema, lora.params, ema_decay_at(step, cfg.train.ema_decay))
        return sum(losses) / len(losses), flops

    def log_step(self, seconds: float, flops: float) -> None:
        if not (self.is_main and self.tracker):
            return
        cfg, device = self.cfg, self.device
        # MFU only where it means something: a GPU computing in bf16.
        gpu_bf16 = device.type == "cuda" and self.precision.compute is not None
        peak = peak_flops(torch.cuda.get_device_name(device)) if gpu_bf16 else None
        images = cfg.train.batch_size * cfg.train.grad_accum * self.world
        self.tracker.log_metrics({"loss": self.last_loss, "lr": self.lora.schedule.get_last_lr()[0],
                                  "grad_norm": self.lora.grad_norm, "step_time": seconds,
                                  "images_per_sec": images / seconds,
                                  **({"mfu": flops / seconds / peak} if peak else {})}, self.done)

    def validate(self, step: int) -> float:
        """The fixed-noise validation loss of the weights the LoRA file gets (the EMA when on): the curve,
        the plateau and the best checkpoint judge the files a user keeps, not the live weights."""
        lora = self.lora
        lora.engine.eval()
        with self.meter.during("validation"), _holding(lora.params, lora.ema, lora.stage):
            s = validation_loss_sum(lora.engine, self.my_val, self.caches.latents, self.caches.texts, self.spec)
            # Under ZeRO-3 every rank must run the same number of forwards: pad with repeats.
            if lora.stage == 3 and len(self.my_val) < self.val_per_rank:
                validation_loss_sum(lora.engine, self.val[:self.val_per_rank - len(self.my_val)], self.caches.latents,
                                    self.caches.texts, self.spec)
        total = _all_reduce_sum([s], self.world)[0]
        lora.engine.train()
        loss = total / len(self.val)
        if self.tracker:
            self.tracker.log_metrics({"val_loss": loss}, step)
        self.watch.add(step, loss, self.tracker)  # every rank: they all agree when to stop early
        return loss

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA file's tensors: the EMA when on, else the fp32 values AdamW updates. All ranks."""
        lora = self.lora
        values = lora.ema if lora.ema is not None else lora.values()
        # Copies: in fp32 at scale 1 the export would hand back the live tensors, which the next step changes.
        return export_state_dict({n: v.detach().clone() for n, v in zip(lora.names, values)}, self.cfg.lora.scale,
                                 self.cfg.save.dtype)

    def save_lora_file(self, step: int, tensors, preview_only: bool = False) -> Path | None:
        """The step's LoRA file (rank 0); a save also writes its kohya copy and logs it to MLflow."""
        if not self.is_main:
            return None
        cfg = self.cfg
        meta = lora_metadata(trigger_word=self.data.trigger, base_model=cfg.model.path, rank=cfg.lora.rank,
                             alpha=cfg.lora.alpha or cfg.lora.rank, steps=step, resolution=cfg.dataset.resolutions,
                             name=self.paths.name, extra={"ema": cfg.train.ema, "dataset_hash": self.data.content_hash})
        path = save_lora(self.paths.step_lora(step), tensors, meta)
        if cfg.save.kohya and not preview_only:
            save_kohya(path, tensors, meta)
        self.watch.saved(step, path, self.tracker)
        if self.tracker and not preview_only:
            self.tracker.log_artifact(path, "checkpoints")
        return path

    def save(self, step: int) -> dict[str, torch.Tensor]:
        """The step's LoRA file and a checkpoint (rank 0 writes both), then one report; returns the
        file's tensors."""
        with self.meter.during("save", watch=False):
            return self._save(step)

    def _save(self, step: int) -> dict[str, torch.Tensor]:
        tensors = self.file_tensors()
        root = self.cfg.storage_root
        with saving(self.paths.step_lora(step), root, step):
            self.save_lora_file(step, tensors)
        state = capture_state(self.lora, step, self.world, {"convergence": self.watch.state()})
        ckpt = None
        if self.is_main:
            ckpt = self.ctx.checkpoint_dir(step)
            with saving(ckpt, root, step):
                write_checkpoint(ckpt, state)
        self.ctx.report({"loss": self.last_loss, "step": step}, ckpt)
        return tensors

    def preview(self, step: int, tensors) -> None:
        """The step's previews: rendered here (inline, every rank stops) or handed to the preview
        actor (rank 0, from the step's saved file; training goes on)."""
        t = time.time()
        if not self.ctx.preview_actor:
            lora = self.lora
            with self.meter.during("previews"):
                shown = sample_previews(self.pipe, lora.module, lora.params, tensors, lora.names, self.data.prompts,
                                        self.caches.texts, self.rank, self.world, lora.stage, step, self.tracker)
            if self.judge is not None:
                self.similarity.add([(step, self.judge.score(shown))])
            lora.engine.train()
        elif self.renderer is not None:
            self.renderer.submit.remote(step, None if tensors is None else str(self.paths.step_lora(step)))
        self.sample_seconds += time.time() - t

# ---------------------------------------------------------------------------------------
# Previews
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
