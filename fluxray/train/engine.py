"""DeepSpeed set-up for a LoRA: the ZeRO stage choice, the engine config, the LR schedule, and the
LoRA's training state read from and written into the engine on any ZeRO stage.

Pure functions decide (`deepspeed_config`, `lr_factor`; the ZeRO stage `auto` takes is the memory
plan's, `fluxray.advise.memory`); `init_engine`
is the thin layer that hands the transformer and a torch AdamW to `deepspeed.initialize`, and
`LoraEngine` reads and writes the LoRA's values and AdamW state wherever the ZeRO stage keeps them.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxray.config import JobConfig

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


def deepspeed_config(cfg: JobConfig, world_size: int, stage: int, lora_numel: int = 0, block_numel: int = 0) -> dict:
    """The DeepSpeed JSON config for this job; `lora_numel` is the largest LoRA tensor's size,
    `block_numel` the largest transformer block's.

    DeepSpeed's bf16 mode stays off: the LoRA trains in fp32 under a bf16 autocast forward
    (`fluxray.train.precision`), so the module's LoRA parameter is the value AdamW updates.
    """
    zero: dict = {"stage": stage}
    if stage == 3:
        # Keep LoRA-sized tensors (and the base's biases and norms) whole on every rank, so
        # the step never gathers them; every larger frozen base weight is sharded.
        zero.update({"stage3_param_persistence_threshold": lora_numel, "contiguous_gradients": True,
                     "stage3_gather_16bit_weights_on_model_save": False})
        if block_numel:
            # Gathered weights live for about one block: DeepSpeed's defaults (50 M elements prefetched,
            # 1 G kept live and for reuse) would keep a smaller model whole on every rank.
            zero.update({"stage3_prefetch_bucket_size": min(50_000_000, block_numel // 2),
                         "stage3_max_live_parameters": min(1_000_000_000, block_numel),
                         "stage3_max_reuse_distance": min(1_000_000_000, block_numel)})
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


def load_partitioned_transformer(path: str, dtype: torch.dtype, revision: str | None = None,
                                 meter: "ParamMeter | None" = None) -> torch.nn.Module:
    """The pipeline's `FluxTransformer2DModel`, never whole on any rank (ZeRO-3): built under
    `deepspeed.zero.Init`, each parameter partitioned as its module is made, then filled tensor by
    tensor from the safetensors files (rank 0 reads each, DeepSpeed scatters it); `meter` watches
    it from then on and samples while each tensor is gathered. All ranks."""
    if not torch.cuda.is_available():
        _skip_shm_build()
    import deepspeed
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    folder = _transformer_folder(path, revision)
    config = FluxTransformer2DModel.load_config(str(folder))
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}, dtype=dtype):
        transformer = FluxTransformer2DModel.from_config(config)
    meter = meter or ParamMeter()
    meter.attach(transformer)
    params = dict(transformer.named_parameters())
    filled = set()
    first = torch.distributed.get_rank() == 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                param = params[name]
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if first:
                        param.data.copy_(f.get_tensor(name))
                    meter.sample()
                filled.add(name)
    if filled != set(params):
        raise FileNotFoundError(f"{folder}: no weights for {sorted(set(params) - filled)[:3]}")
    transformer.requires_grad_(False)
    return transformer


def _transformer_folder(path: str, revision: str | None) -> Path:
    local = Path(path) / "transformer"
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=revision, allow_patterns=["transformer/*"])) / "transformer"


def block_numel(transformer: torch.nn.Module) -> int:
    """Elements of the transformer's largest block (whole, also when partitioned)."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    return max(sum(getattr(p, "ds_numel", p.numel()) for p in b.parameters()) for b in blocks)


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
        config=deepspeed_config(cfg, world_size, stage, max(p.numel() for p in lora_params), block_numel(transformer)))
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


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of these tensors this rank holds now: whole ones, and of a ZeRO-3 parameter its shard
    plus its whole value while gathered (a quantized weight counts its codes and scales)."""
    from fluxray.model.quantize import tensor_bytes

    total = 0
    for t in tensors:
        total += tensor_bytes(t)
        shard = getattr(t, "ds_tensor", None)
        if shard is not None:
            total += shard.numel() * shard.element_size()
    return total


@dataclass
class ParamMeter:
    """This rank's bytes of the base transformer's parameters, the peak of each phase of the job.

    Sampled at each phase's start and end, while each tensor of a partitioned load is gathered, and
    inside every module's forward while a phase is watched (its first step, validation, previews:
    the later ones gather the same weights), after ZeRO-3 gathered that module's weights.
    """

    peaks: dict[str, int] = field(default_factory=dict)
    #: The bytes of the whole model (every parameter and buffer at full size).
    whole: int = 0
    phase: str = "load"
    watching: bool = False
    _tensors: list[torch.Tensor] = field(default_factory=list)

    def attach(self, module: torch.nn.Module) -> None:
        """Meter `module`'s parameters and buffers as they are now (the base: a LoRA added later is not
        counted) and watch its forwards (before DeepSpeed's hooks, which release the gathered weights)."""
        for m in module.modules():
            m.register_forward_hook(lambda *_: self.sample() if self.watching else None)
        self._tensors = list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())
        self.whole = sum(getattr(t, "ds_numel", t.numel()) * t.element_size() for t in self._tensors
                         if getattr(t, "ds_tensor", None) is not None) + sum(
            held_bytes([t]) for t in self._tensors if getattr(t, "ds_tensor", None) is None)

    def sample(self) -> None:
        held = held_bytes(self._tensors)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), held)

    @contextlib.contextmanager
    def during(self, phase: str, watch: bool | None = None):
        """The block is `phase`: its peak is recorded, inside forwards too when `watch` (by default
        the phase's first block only)."""
        before = self.phase, self.watching
        self.phase, self.watching = phase, phase not in self.peaks if watch is None else watch
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self.phase, self.watching = before


def gathered(params: list[torch.nn.Parameter], stage: int, modifier_rank: int | None = None):
    """Whole parameters on every rank for the block (ZeRO-3), or nothing to do (stages 0 and 2)."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
