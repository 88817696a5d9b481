"""How long will it take? Before start, from the FLOP count and the target GPUs; while running,
an ETA refined from the measured step time, with the time spent sampling shown apart.

The FLOPs come from `fluxray.track.flops` (the count MFU uses); previews and the validation
loss are forward passes, counted the same way. Whether the steps recompute activations is the
memory plan's choice (`fluxray.advise.memory`). Nothing here imports torch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from fluxray.advise.memory import REFERENCE_GPU, choose, model_configs, target_gpu
from fluxray.config import JobConfig
from fluxray.errors import ConfigError
from fluxray.track.flops import find_gpu, lora_step_flops


# ---------------------------------------------------------------------------------------
# The model and the work of one job, in FLOPs
# ---------------------------------------------------------------------------------------

def model_dims(cfg: JobConfig) -> tuple[dict, str]:
    """The transformer config the count uses, and where it came from (FLUX.1-dev's when not on disk)."""
    models = model_configs(cfg)
    return models.transformer, models.source


def forward_flops(dims: dict, width: int, height: int, text_tokens: int) -> float:
    """One forward pass (a preview step, a validation case): what checkpointing adds to a step."""
    return (lora_step_flops(dims, width, height, text_tokens, gradient_checkpointing=True)
            - lora_step_flops(dims, width, height, text_tokens))


def training_sizes(cfg: JobConfig, sizes: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """The bucket of every training example: from the images when known, else one square per resolution."""
    if sizes:
        from fluxray.data.buckets import make_items

        return [it.size for it in make_items(sizes, cfg.dataset.resolutions)]
    return [(r, r) for r in cfg.dataset.resolutions]


def sample_events(cfg: JobConfig, steps: int | None = None) -> int:
    """Preview rounds of a run: step 0, every `sample.every` steps and the last step."""
    steps = steps or cfg.train.steps
    if not cfg.sample.every:
        return 0
    return 1 + steps // cfg.sample.every + (1 if steps % cfg.sample.every else 0)


@dataclass(frozen=True)
class FlopBudget:
    """FLOPs of a whole job, as one worker's share of the wall time (data parallel)."""

    step: float  # one optimizer step of one worker: batch x grad_accum examples, no recompute
    recompute: float  # what full gradient checkpointing adds to that step
    train: float  # all steps
    validation: float  # every fixed-noise validation, this worker's share of the cases
    sampling: float  # every preview round, this worker's share of the prompts

    @property
    def sample_share(self) -> float:
        return self.sampling / max(self.train + self.validation + self.sampling, 1.0)


def flop_budget(cfg: JobConfig, sizes: list[tuple[int, int]] | None = None, workers: int | None = None,
                checkpointing: bool = False, dims: dict | None = None) -> FlopBudget:
    """The FLOPs of training, validation and previews for this config (pure arithmetic)."""
    dims = dims or model_dims(cfg)[0]
    world = workers or cfg.distributed.workers
    text = cfg.model.max_sequence_length
    buckets = training_sizes(cfg, sizes)
    per_example = sum(lora_step_flops(dims, w, h, text) for w, h in buckets) / len(buckets)
    fwd = sum(forward_flops(dims, w, h, text) for w, h in buckets) / len(buckets)
    examples = cfg.train.batch_size * cfg.train.grad_accum
    step, recompute = examples * per_example, examples * fwd
    validations = 1 + cfg.train.steps // cfg.validation_every + (1 if cfg.train.steps % cfg.validation_every else 0)
    cases = cfg.validation.images * len(cfg.validation.sigmas)
    prompts = cfg.sample_prompts("[trigger]")
    per_round = sum(p.steps * forward_flops(dims, p.width, p.height, text) for p in prompts)
    # Prompts are spread across ranks; a round lasts as long as the busiest rank's share.
    per_round *= math.ceil(len(prompts) / world) / max(len(prompts), 1)
    return FlopBudget(step=step, recompute=recompute if checkpointing else 0.0,
                      train=cfg.train.steps * (step + (recompute if checkpointing else 0.0)),
                      validation=validations * math.ceil(cases / world) * fwd,
                      sampling=sample_events(cfg) * per_round)


# ---------------------------------------------------------------------------------------
# Before start: time and GPU-hours
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """Time and GPU-hours of a job on `workers` x `gpu` at the assumed MFU."""

    gpu: str
    workers: int
    mfu: float
    step_tflop: float  # one optimizer step of one worker (model FLOPs, as MFU counts them)
    checkpointing: bool
    checkpointing_reason: str  # the memory plan's setting
    train_seconds: float
    validation_seconds: float
    sample_seconds: float
    dims_source: str
    note: str = ""  # why the figure is for this GPU, when it is not the one the job will use

    @property
    def total_seconds(self) -> float:
        return self.train_seconds + self.validation_seconds + self.sample_seconds

    @property
    def gpu_hours(self) -> float:
        return self.total_seconds * self.workers / 3600

    def format(self) -> str:
        return (f"estimate on {self.workers} x {self.gpu} at {self.mfu:.0%} MFU: {_hms(self.total_seconds)} "
                f"({self.gpu_hours:.2f} GPU-hours)\n"
                + (f"  ({self.note})\n" if self.note else "") +
                f"  training   {_hms(self.train_seconds)}  ({self.step_tflop:.1f} TFLOP per step; "
                f"{self.checkpointing_reason})\n"
                f"  previews   {_hms(self.sample_seconds)}\n"
                f"  validation {_hms(self.validation_seconds)}\n"
                f"  model: {self.dims_source}")


def estimate(cfg: JobConfig, gpu: str | None = REFERENCE_GPU, mfu: float = 0.4, *, workers: int | None = None,
             sizes: list[tuple[int, int]] | None = None, gpu_memory_gib: float | None = None) -> Estimate:
    """Time of the job on `workers` GPUs named `gpu` (e.g. "H100", "A100 40GB", "L40S") at `mfu`;
    `gpu=None`: this machine's (`memory.target_gpu`), with a note saying which."""
    card, note = target_gpu(cfg, gpu)
    if not card.bf16_tflops:
        note = f"no peak FLOPs known for {card.name}: the figure is for {REFERENCE_GPU} GPUs; --gpu names another"
        card = find_gpu(REFERENCE_GPU)
    if not 0 < mfu <= 1:
        raise ConfigError(f"estimate: mfu must be in (0, 1], got {mfu}")
    world = workers or cfg.distributed.workers
    models = model_configs(cfg)
    chosen, _ = choose(cfg, card, (gpu_memory_gib or card.memory_gib) * 2**30, models=models, sizes=sizes,
                            workers=world)
    on = chosen.setting.checkpointing
    budget = flop_budget(cfg, sizes, world, on, models.transformer)
    rate = card.bf16_tflops * 1e12 * mfu
    return Estimate(gpu=card.name, workers=world, mfu=mfu, step_tflop=budget.step / 1e12, checkpointing=on,
                    checkpointing_reason=chosen.setting.describe(), train_seconds=budget.train / rate,
                    validation_seconds=budget.validation / rate, sample_seconds=budget.sampling / rate,
                    dims_source=models.source, note=note)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


# ---------------------------------------------------------------------------------------
# While running: the ETA
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Eta:
    """Where a running job stands and how long it still needs."""

    step: int
    total_steps: int
    sec_per_step: float | None  # training only: median of the recent measured step times
    train_seconds_left: float | None
    sample_seconds: float  # spent on previews so far
    sample_seconds_left: float | None
    seconds_left: float | None


def eta(records: list[dict], total_steps: int, *, status: dict | None = None, sample_every: int = 0,
        start_step: int = 0, prior_sec_per_step: float | None = None, recent: int = 20) -> Eta:
    """ETA from metrics.jsonl `records` (their `step_time`) and status.json's `sample_seconds`.

    Training time left is the median of the last `recent` step times times the steps left;
    preview time left is the measured seconds per preview round times the rounds left (this
    process's rounds: it started at `start_step`). Before any step is measured,
    `prior_sec_per_step` (e.g. from `estimate`) stands in.
    """
    status = status or {}
    timed = [r for r in records if "step_time" in r]
    step = max([int(r["step"]) for r in timed] + [int(status.get("step") or 0), start_step])
    times = [float(r["step_time"]) for r in timed[-recent:]]
    per_step = statistics.median(times) if times else prior_sec_per_step
    left = max(total_steps - step, 0)
    train_left = per_step * left if per_step is not None else None
    spent = float(status.get("sample_seconds") or 0.0)
    sample_left = None
    if not sample_every:
        sample_left = 0.0
    else:
        done_rounds = _rounds(start_step, step, sample_every, total_steps, include_start=start_step == 0)
        todo = _rounds(step, total_steps, sample_every, total_steps, include_start=False)
        if done_rounds and spent:
            sample_left = spent / done_rounds * todo
        elif todo == 0:
            sample_left = 0.0
    total = train_left + sample_left if train_left is not None and sample_left is not None else None
    return Eta(step=step, total_steps=total_steps, sec_per_step=per_step, train_seconds_left=train_left,
               sample_seconds=spent, sample_seconds_left=sample_left, seconds_left=total)


def _rounds(after: int, upto: int, every: int, total: int, include_start: bool) -> int:
    """Preview rounds at steps in (after, upto], plus step `after` itself when `include_start`."""
    n = upto // every - after // every
    if upto == total and total % every:
        n += 1  # the last step always previews
    return n + (1 if include_start else 0)
