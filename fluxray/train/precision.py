"""The one precision design of a training job: what is held and computed in which dtype.

- The frozen base transformer is held in `model.dtype` (bf16 on a GPU: half the memory), its block
  linears in int8, fp8 or NF4 with `model.quantize` (dequantized to `model.dtype` in each matmul).
- The LoRA weights, their gradients, the AdamW moments and the EMA are fp32, always: the module's
  LoRA parameter is the very value AdamW updates, and the EMA, the checkpoint and the exported
  file read it, so an update of 1e-5 is never rounded away (bf16 keeps ~3 significant digits).
- The forward runs under `torch.autocast` in `train.mixed_precision` (bf16), so the matmuls of the
  base and the LoRA run in bf16 while the loss is taken in fp32.

This is how kohya's sd-scripts (fp32 network, `--mixed_precision bf16`) and diffusers' trainers
(`cast_training_params` to fp32, autocast through accelerate) train LoRAs. DeepSpeed's own bf16
mode stays off: it would cast the LoRA to bf16 and keep a separate fp32 master that the module,
the EMA and the export never see. fp16 is not offered: FLUX's activations overflow it (the
reason FLUX.1 ships in bf16), and bf16 autocast needs no loss scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fluxray.config import JobConfig

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """The dtypes of one job on one device."""

    #: The frozen base weights (`model.dtype`).
    base: torch.dtype
    #: The forward's autocast dtype (`train.mixed_precision`); None: no autocast, fp32 compute.
    compute: torch.dtype | None
    device: torch.device

    #: The LoRA weights, gradients, AdamW moments and EMA.
    trainable = torch.float32

    def describe(self, quantize: str = "none") -> str:
        compute = "fp32" if self.compute is None else f"{_name(self.compute)} autocast"
        blocks = f" (block linears {quantize})" if quantize != "none" else ""
        return f"base weights {_name(self.base)}{blocks}, LoRA + AdamW state + EMA fp32, forward in {compute}"


def resolve_precision(cfg: JobConfig, device: torch.device) -> Precision:
    """`model.dtype` and `train.mixed_precision` for `device`; `auto` is bf16 on a GPU that has it.

    The config refuses a bf16 base with `mixed_precision: no` (a bf16 matmul is not fp32
    compute); an `auto` follows the other setting, so `model.dtype: bf16` alone trains in bf16.
    """
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    mp, dtype = cfg.train.mixed_precision, cfg.model.dtype
    if mp == "auto":
        mp = "bf16" if gpu_bf16 or dtype == "bf16" else "no"
    if dtype == "auto":
        dtype = "bf16" if mp == "bf16" and device.type == "cuda" else "fp32"
    return Precision(base=_DTYPES[dtype], compute=torch.bfloat16 if mp == "bf16" else None, device=device)


def _name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
