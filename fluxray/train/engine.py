"""DeepSpeed set-up for a LoRA: the ZeRO stage choice, the engine config, the LR schedule, and the
LoRA's training state read from and written into the engine on any ZeRO stage.

Pure functions decide (`choose_zero_stage`, `deepspeed_config`, `lr_factor`); `init_engine`
is the thin layer that hands the transformer and a torch AdamW to `deepspeed.initialize`, and
`LoraEngine` reads and writes the LoRA's values and AdamW state wherever the ZeRO stage keeps them.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

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


def deepspeed_config(cfg: JobConfig, world_size: int, stage: int, lora_numel: int = 0) -> dict:
    """The DeepSpeed JSON config for this job; `lora_numel` is the largest LoRA tensor's size.

    DeepSpeed's bf16 mode stays off: the LoRA trains in fp32 under a bf16 autocast forward
    (`fluxray.train.precision`), so the module's LoRA parameter is the value AdamW updates.
    """
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
        "bf16": {"enabled": False},
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


def init_engine(transformer: torch.nn.Module, lora_params: list[torch.nn.Parameter], names: list[str],
                cfg: JobConfig, world_size: int, stage: int) -> "LoraEngine":
    """Wrap the transformer in a DeepSpeed engine with a torch AdamW on the (fp32) LoRA parameters,
    compiled through the engine when `train.compile` is on."""
    if not torch.cuda.is_available():
        _skip_shm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    optimizer = torch.optim.AdamW(lora_params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train.steps, cfg.train.lr_scheduler, cfg.train.warmup_steps))
    engine, _, _, schedule = deepspeed.initialize(
        model=transformer, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(cfg, world_size, stage, max(p.numel() for p in lora_params)))
    if world_size == 1 and stage == 0:
        # Nothing to average in a world of one; DeepSpeed would still flatten every gradient
        # through a gloo all-reduce each step.
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        engine.compile()  # after initialize, so DeepSpeed's hooks (ZeRO-3 gathers) are compiled with the module
    return LoraEngine(engine, lora_params, names, stage, schedule, optimizer)


@dataclass
class LoraEngine:
    """The trainable side of a job: the DeepSpeed engine around the transformer, its LoRA parameters
    (fp32, in the order of `names`, the LoRA file's keys), the LR schedule, the torch AdamW that
    DeepSpeed steps, and the EMA of the LoRA (fp32, on the parameters' device) when `train.ema` is on.

    Reads and writes of the LoRA's state go through here, whatever the ZeRO stage: stage 0 keeps
    the values and AdamW's state on the parameters themselves; ZeRO-2 and 3 keep an fp32 master
    copy and the moments in flat partitions across the ranks. Every method that says "all ranks"
    is a collective under ZeRO: every rank calls it, in the same order.
    """

    engine: Any
    params: list[torch.nn.Parameter]
    names: list[str]
    stage: int
    schedule: torch.optim.lr_scheduler.LambdaLR
    adamw: torch.optim.AdamW
    ema: list[torch.Tensor] | None = None
    #: The gradients' 2-norm (before clipping) of the last optimizer step.
    grad_norm: float = float("nan")

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def micro_step(self, loss: torch.Tensor) -> None:
        """Backward, then DeepSpeed's step: an optimizer step (and the LR schedule's) at the end of
        each gradient-accumulation cycle. Records that step's gradient norm."""
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.stage == 0:
            # Without ZeRO DeepSpeed clips without keeping the norm; the (averaged) gradients are
            # on the parameters until the step.
            grads = [p.grad.detach().float() for p in self.params if p.grad is not None]
            self.grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.engine.step()
        if boundary and self.stage != 0:
            norm = self.engine.get_global_grad_norm()  # ZeRO computes it over the partitions, before clipping
            self.grad_norm = float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.schedule.get_last_lr()[0]

    def values(self) -> list[torch.Tensor]:
        """The fp32 LoRA values AdamW updates (under ZeRO its master copy), whole, on every rank. All ranks."""
        if self.stage == 0:
            return [p.detach() for p in self.params]
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p) for p in self.params]

    def load_values(self, values: list[torch.Tensor]) -> None:
        """The LoRA holds `values` from now on: in the module's parameters and in DeepSpeed's fp32
        master copy, which would otherwise overwrite the module at the next step. All ranks."""
        with gathered(self.params, self.stage, modifier_rank=0):
            for p, v in zip(self.params, values):
                p.data.copy_(v.to(p.device, p.dtype))
        if self.stage != 0:
            for p, v in zip(self.params, values):
                _set_master(p, v.to(p.device, torch.float32))

    def adam_state(self) -> dict[str, list[torch.Tensor]] | None:
        """AdamW's state of each LoRA tensor, whole: `exp_avg`, `exp_avg_sq` (fp32) and `step` (its
        count of updates, 0-d); None before the first step. All ranks."""
        if not any(self.adamw.state.values()):
            return None
        if self.stage == 0:
            state = [self.adamw.state[p] for p in self.params]
            return {k: [s[k].detach().float() for s in state] for k in ("exp_avg", "exp_avg_sq", "step")}
        from deepspeed.utils import safe_get_full_optimizer_state

        # Under ZeRO AdamW steps flat partitions: one count for all of them, kept by each rank.
        step = next(s["step"] for s in self.adamw.state.values() if s).detach().float()
        return {"exp_avg": [safe_get_full_optimizer_state(p, "exp_avg") for p in self.params],
                "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in self.params],
                "step": [step.clone() for _ in self.params]}

    def load_adam_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        """AdamW goes on from `state` (as `adam_state` returns it). All ranks."""
        # What AdamW steps: the parameters (stage 0), ZeRO-2's flat fp32 partitions (in its param
        # groups), ZeRO-3's (put into its groups only for the step).
        stepped = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None) or [
            t for group in self.adamw.param_groups for t in group["params"]]
        for t in stepped:
            if not self.adamw.state[t]:  # torch's AdamW makes its state at the first step
                self.adamw.state[t] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(t),
                                       "exp_avg_sq": torch.zeros_like(t)}
        if self.stage == 0:
            for p, m, v, t in zip(self.params, state["exp_avg"], state["exp_avg_sq"], state["step"]):
                s = self.adamw.state[p]
                s["exp_avg"].copy_(m.to(p.device).view_as(p))
                s["exp_avg_sq"].copy_(v.to(p.device).view_as(p))
                s["step"].fill_(float(t))
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        # ZeRO-2 links each parameter to its fragment of the flat state lazily, at its first step.
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()
        for p, m, v in zip(self.params, state["exp_avg"], state["exp_avg_sq"]):
            safe_set_full_optimizer_state(p, m.to(p.device, torch.float32), "exp_avg")
            safe_set_full_optimizer_state(p, v.to(p.device, torch.float32), "exp_avg_sq")
        step = max(float(t) for t in state["step"])
        for s in self.adamw.state.values():
            s["step"].fill_(step)

    def set_schedule_step(self, step: int) -> None:
        """Put the LR schedule at optimizer step `step`: the next step runs at the LR an uninterrupted run had."""
        lrs = [base * fn(step) for base, fn in zip(self.schedule.base_lrs, self.schedule.lr_lambdas)]
        self.schedule.load_state_dict({**self.schedule.state_dict(), "last_epoch": step, "_last_lr": lrs})
        for group, lr in zip(self.adamw.param_groups, lrs):
            group["lr"] = lr


def _set_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write a LoRA value into DeepSpeed's fp32 master copy (this rank's part of it)."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)


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
