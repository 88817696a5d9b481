"""DeepSpeed set-up for a LoRA: the ZeRO stage choice, the engine config and the LR schedule.

Pure functions decide (`choose_zero_stage`, `deepspeed_config`, `lr_factor`); `init_engine`
is the thin layer that hands the transformer and a torch AdamW to `deepspeed.initialize`.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from fluxray.config import JobConfig

#: Fraction of a GPU's memory that the frozen base plus activations may fill under stage 0.
_FIT_FRACTION = 0.85


def choose_zero_stage(setting, *, base_params: int, bytes_per_param: int, gpu_memory: int | None,
                      activation_bytes: int) -> tuple[int, str]:
    """Stage and the reason: 0 (replicated, fastest) when the base fits each GPU, else 3."""
    if setting != "auto":
        return int(setting), f"distributed.zero_stage={setting} in the config"
    if gpu_memory is None:
        return 0, "no GPU: the base is replicated on each CPU worker (stage 0)"
    need = base_params * bytes_per_param + activation_bytes
    if need <= _FIT_FRACTION * gpu_memory:
        return 0, (f"base {base_params * bytes_per_param / 2**30:.1f} GiB + activations "
                   f"{activation_bytes / 2**30:.1f} GiB fit in {gpu_memory / 2**30:.0f} GiB: stage 0 (replicated, fastest)")
    return 3, (f"base {base_params * bytes_per_param / 2**30:.1f} GiB + activations "
               f"{activation_bytes / 2**30:.1f} GiB exceed {_FIT_FRACTION:.0%} of {gpu_memory / 2**30:.0f} GiB: "
               "stage 3 shards the frozen base across workers")


def activation_estimate(hidden: int, layers: int, tokens: int, batch: int, bytes_per: int,
                        checkpointing: bool) -> int:
    """Rough activation bytes of a transformer step: ~34·h per token per layer (Korthikanti et al.)."""
    per_layer = 34 * hidden * tokens * batch * bytes_per // 2
    return per_layer * (1 if checkpointing else layers)


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_scheduler {schedule!r}")


def deepspeed_config(cfg: JobConfig, world_size: int, stage: int, bf16: bool, lora_numel: int = 0) -> dict:
    """The DeepSpeed JSON config for this job; `lora_numel` is the largest LoRA tensor's size."""
    zero: dict = {"stage": stage}
    if stage == 3:
        # Keep LoRA-sized tensors (and the base's biases and norms) whole on every rank, so
        # the step never gathers them; every larger frozen base weight is sharded.
        zero.update({"stage3_param_persistence_threshold": lora_numel, "contiguous_gradients": True,
                     "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def init_single_process_group() -> None:
    """A world of one (gloo), so the same DeepSpeed loop runs without Ray."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # An in-memory store: a world of one needs no TCP rendezvous, and a port picked
    # "free" can be taken by another process before it is bound (EADDRINUSE in CI).
    torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)


def _skip_shm_build() -> None:
    # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (~50 s on a fresh
    # machine, racing across workers). gloo does the same job for LoRA-sized tensors.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_engine(transformer: torch.nn.Module, lora_params: list[torch.nn.Parameter], cfg: JobConfig,
                world_size: int, stage: int, bf16: bool):
    """Wrap the transformer in a DeepSpeed engine with a torch AdamW on the LoRA parameters."""
    if not torch.cuda.is_available():
        _skip_shm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train.steps, cfg.train.lr_scheduler, cfg.train.warmup_steps))
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=transformer, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(cfg, world_size, stage, bf16, max(p.numel() for p in lora_params)))
    if world_size == 1 and stage == 0:
        # Nothing to average in a world of one; DeepSpeed would still flatten every gradient
        # through a gloo all-reduce each step.
        engine.enable_backward_allreduce = False
    return engine, optimizer, schedule


def partition_numel(module: torch.nn.Module) -> dict[str, int]:
    """This rank's share of the module's parameters under ZeRO-3, counted from DeepSpeed's state.

    `partition`: elements in this rank's shards (`ds_tensor`); `persistent`: elements of the small
    tensors that every rank also keeps whole between steps; `total`: the model's elements.
    """
    partition = persistent = total = 0
    for p in module.parameters():
        total += p.ds_numel
        partition += p.ds_tensor.numel()
        persistent += p.ds_numel if p.ds_persist else 0
    return {"partition": partition, "persistent": persistent, "total": total}


def gathered(params: list[torch.nn.Parameter], stage: int, modifier_rank: int | None = None):
    """Whole parameters on every rank for the block (ZeRO-3), or nothing to do (stages 0 and 2)."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
