"""How long will it take? Before start, from the FLOP count and the target GPUs; while running,
an ETA refined from the measured step time, with the time spent sampling shown apart.

The FLOPs come from `fluxray.track.flops` (the count MFU uses); previews and the validation
loss are forward passes, counted the same way. Nothing here imports torch except the
`gradient_checkpointing: auto` decision, which asks the loop's own activation estimate.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

from fluxray.config import TINY_MODEL, JobConfig
from fluxray.errors import ConfigError
from fluxray.track.flops import FLUX1_DEV, PEAK_BF16_TFLOPS, lora_step_flops, peak_flops

#: GPU memory in GiB by device name, the most specific name first (as PEAK_BF16_TFLOPS).
GPU_MEMORY_GIB = (
    ("H200", 141), ("GH200", 96), ("H100", 80), ("B200", 180), ("A100 40GB", 40), ("A100-40GB", 40),
    ("A100", 80), ("A800", 80), ("L40S", 48), ("L40", 48), ("A6000", 48), ("A10G", 24), ("A10", 24),
    ("L4", 24), ("RTX 4090", 24), ("RTX 3090", 24),
)
# Share of a GPU that the frozen base plus activations may fill (as the loop decides).
_FIT_FRACTION = 0.85
#: The GPU of an estimate when neither `--gpu` nor this machine names one.
REFERENCE_GPU = "H100"


# ---------------------------------------------------------------------------------------
# The model and the work of one job, in FLOPs
# ---------------------------------------------------------------------------------------

def model_dims(cfg: JobConfig) -> tuple[dict, str]:
    """The transformer config the count uses, and where it came from.

    A local folder (or the built tiny model) and a hub id already in the HF cache give their
    own `transformer/config.json`; anything else is taken to be FLUX.1-dev. A `model.path` that
    is neither a folder nor a hub id is a `ConfigError`.
    """
    from fluxray.model.source import local_model_folder

    folder = local_model_folder(cfg)
    found = folder / "transformer" / "config.json" if folder else None
    if found is not None and found.is_file():
        return json.loads(found.read_text()), str(found)
    return dict(FLUX1_DEV), "FLUX.1-dev" + (" (assumed: the tiny model is not built yet)" if cfg.model.path == TINY_MODEL
                                            else " (assumed)")


def transformer_params(dims: dict) -> int:
    """Parameters of `FluxTransformer2DModel` with this config (FLUX.1-dev: 11,901,408,320)."""
    d = dims["num_attention_heads"] * dims["attention_head_dim"]
    hd = dims["attention_head_dim"]
    double = 36 * d * d + 30 * d + 4 * hd  # 2 streams x (modulation 6d, q k v out, MLP 4x), q/k norms
    single = 15 * d * d + 11 * d + 2 * hd  # modulation 3d, q k v, MLP in 4x, fused out 5d -> d
    mlp2 = d * d + d  # the second linear of each embedder
    embed = (dims["in_channels"] + 1) * d + (dims["joint_attention_dim"] + 1) * d
    embed += (256 + 1) * d + mlp2  # timestep
    embed += ((256 + 1) * d + mlp2) if dims.get("guidance_embeds", True) else 0
    embed += (dims.get("pooled_projection_dim", 768) + 1) * d + mlp2  # CLIP pooled
    out_channels = dims.get("out_channels") or dims["in_channels"]
    head = 2 * d * d + 2 * d + (d + 1) * dims.get("patch_size", 1) ** 2 * out_channels
    return dims["num_layers"] * double + dims["num_single_layers"] * single + embed + head


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
    checkpointing_reason: str
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
                f"gradient checkpointing {'on' if self.checkpointing else 'off'}: {self.checkpointing_reason})\n"
                f"  previews   {_hms(self.sample_seconds)}\n"
                f"  validation {_hms(self.validation_seconds)}\n"
                f"  model: {self.dims_source}")


def local_gpu() -> str | None:
    """The name of this machine's first GPU, None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def target_gpu(cfg: JobConfig, gpu: str | None = None) -> tuple[str, str]:
    """The GPU an estimate is for, and a note when that is not the one the job will use: `gpu` when
    named, else this machine's GPU, else `REFERENCE_GPU`."""
    if gpu:
        return gpu, ""
    here = local_gpu()
    name = here if here and peak_flops(here) else REFERENCE_GPU
    if cfg.distributed.gpus_per_worker == 0:
        return name, (f"this config trains on CPU (distributed.gpus_per_worker: 0): the figure is for {name} "
                      "GPUs; --gpu names another")
    if name != here:
        missing = "no GPU on this machine" if here is None else f"no peak FLOPs known for {here}"
        return name, f"{missing}: the figure is for {name} GPUs; --gpu names another"
    return name, ""


def estimate(cfg: JobConfig, gpu: str | None = REFERENCE_GPU, mfu: float = 0.4, *, workers: int | None = None,
             sizes: list[tuple[int, int]] | None = None, gpu_memory_gib: float | None = None) -> Estimate:
    """Time of the job on `workers` GPUs named `gpu` (e.g. "H100", "A100 40GB", "L40S") at `mfu`;
    `gpu=None`: this machine's (see `target_gpu`), with a note saying which."""
    gpu, note = target_gpu(cfg, gpu)
    peak = peak_flops(gpu)
    if peak is None:
        known = ", ".join(name for name, _ in PEAK_BF16_TFLOPS)
        raise ConfigError(f"estimate: unknown GPU {gpu!r} (known: {known})")
    if not 0 < mfu <= 1:
        raise ConfigError(f"estimate: mfu must be in (0, 1], got {mfu}")
    world = workers or cfg.distributed.workers
    dims, source = model_dims(cfg)
    memory = gpu_memory_gib or next((gib for name, gib in GPU_MEMORY_GIB if name.lower() in gpu.lower()), 80)
    on, reason = _checkpointing(cfg, dims, sizes, memory)
    budget = flop_budget(cfg, sizes, world, on, dims)
    rate = peak * mfu
    return Estimate(gpu=gpu, workers=world, mfu=mfu, step_tflop=budget.step / 1e12, checkpointing=on,
                    checkpointing_reason=reason, train_seconds=budget.train / rate,
                    validation_seconds=budget.validation / rate, sample_seconds=budget.sampling / rate,
                    dims_source=source, note=note)


def _checkpointing(cfg: JobConfig, dims: dict, sizes, memory_gib: float) -> tuple[bool, str]:
    """The loop's rule: `auto` recomputes activations only when bf16 base + activations overflow."""
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return setting == "on", f"train.gradient_checkpointing={setting}"
    from fluxray.train.engine import activation_estimate

    hidden = dims["num_attention_heads"] * dims["attention_head_dim"]
    layers = dims["num_layers"] + dims["num_single_layers"]
    tokens = max(w * h for w, h in training_sizes(cfg, sizes)) // 256 + cfg.model.max_sequence_length
    need = transformer_params(dims) * 2 + activation_estimate(hidden, layers, tokens, cfg.train.batch_size, 2, False)
    on = need > _FIT_FRACTION * memory_gib * 2**30
    return on, (f"base + activations {need / 2**30:.0f} GiB {'>' if on else '<='} "
                f"{_FIT_FRACTION:.0%} of {memory_gib:.0f} GiB")


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
