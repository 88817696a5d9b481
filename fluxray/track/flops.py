"""Model FLOPs of a FLUX LoRA step, and the GPUs they are measured against (MFU) and planned for.

Pure functions of the transformer config, so the loop, the benchmarks and the time
estimator count the same way for FLUX.1-dev and for the tiny test model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: The fields of FLUX.1-dev's `transformer/config.json` that the count uses.
FLUX1_DEV = {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "attention_head_dim": 128,
             "in_channels": 64, "joint_attention_dim": 4096}

@dataclass(frozen=True)
class Gpu:
    """A CUDA device model: what MFU divides by, what the memory plan fits into, what fp8 needs."""

    name: str  # matched against a device name: every word of it must be there ("A100 40GB" ~ "NVIDIA A100-SXM4-40GB")
    label: str  # how fluxray names it to a user
    bf16_tflops: float  # dense tensor-core peak, no sparsity
    memory_gib: float  # total memory as the card reports it (nvidia-smi MiB / 1024)
    capability: tuple[int, int]  # CUDA compute capability


#: The GPUs fluxray knows, the most specific name first ("H100 PCIe" before "H100").
GPUS = (
    Gpu("H200", "H200 141 GB", 989.0, 140.4, (9, 0)),
    Gpu("GH200", "GH200 96 GB", 989.0, 95.6, (9, 0)),
    Gpu("H100 PCIe", "H100 PCIe 80 GB", 756.0, 79.6, (9, 0)),
    Gpu("H100", "H100 80 GB", 989.0, 79.6, (9, 0)),
    Gpu("B200", "B200 180 GB", 2250.0, 179.1, (10, 0)),
    Gpu("A100 40GB", "A100 40 GB", 312.0, 40.0, (8, 0)),
    Gpu("A100", "A100 80 GB", 312.0, 80.0, (8, 0)),
    Gpu("A800", "A800 80 GB", 312.0, 80.0, (8, 0)),
    Gpu("L40S", "L40S 48 GB", 362.0, 45.0, (8, 9)),
    Gpu("L40", "L40 48 GB", 181.0, 45.0, (8, 9)),
    Gpu("A6000", "RTX A6000 48 GB", 155.0, 48.0, (8, 6)),
    Gpu("A10G", "A10G 24 GB", 70.0, 22.5, (8, 6)),
    Gpu("A10", "A10 24 GB", 125.0, 22.5, (8, 6)),
    Gpu("L4", "L4 24 GB", 121.0, 22.5, (8, 9)),
    Gpu("RTX 4090", "RTX 4090 24 GB", 165.0, 24.0, (8, 9)),
    Gpu("RTX 3090", "RTX 3090 24 GB", 71.0, 24.0, (8, 6)),
)


def _words(name: str) -> set[str]:
    return set(name.lower().replace("-", " ").replace("_", " ").split())


def find_gpu(device_name: str | None) -> Gpu | None:
    """The known GPU a CUDA device name (or a user's `--gpu`) means; None for a CPU or an unknown GPU."""
    if not device_name:
        return None
    words = _words(device_name)
    return next((g for g in GPUS if _words(g.name) <= words), None)


def lora_step_flops(config: Mapping[str, Any], width: int, height: int, text_tokens: int, batch_size: int = 1,
                    mlp_ratio: float = 4.0, gradient_checkpointing: bool = False) -> float:
    """Model FLOPs of one LoRA training step on a batch of `width`x`height` images.

    Tokens: `T = (width/16)·(height/16)` image tokens (VAE /8, then 2x2 packing) plus
    `text_tokens` T5 tokens. Every token passes through `(4 + 2·mlp_ratio)·d²` weights in
    each of the double and single blocks (double blocks: q,k,v,out + MLP on the token's own
    stream; single blocks: q,k,v + MLP-in, and the fused out of width `(1 + mlp_ratio)·d`),
    plus the patch embedder and output projection (image tokens) or the T5 context embedder
    (text tokens). For FLUX.1-dev that is 57·12·3072² ≈ 6.46 B weights per token. The
    modulation and the timestep/guidance/CLIP embedders run once per sample (< 0.01 %).

    forward  = 2·N_token·T  (matmuls)  +  blocks · 4·T²·d  (QKᵀ and attention·V, joint attention)
    LoRA step = forward + backward w.r.t. activations only: the frozen base gets no weight
    gradients, so each matmul costs one more 2·N·T (the input gradient), while attention
    needs the gradients of Q, K, V and the scores: 2x its forward. LoRA's own matmuls
    (rank ≪ d) are left out. So step = 2·matmuls + 3·attention:

        FLUX.1-dev, batch 1: 512²  -> forward 21.5, step 44.6 TFLOP
                             1024² -> forward 74.4, step 163.6 TFLOP

    Full gradient checkpointing recomputes one forward: that is hardware work, not model
    FLOPs, so MFU leaves it out (`gradient_checkpointing=False`); time estimates add it.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    image_tokens = (width // 16) * (height // 16)
    tokens = image_tokens + text_tokens
    per_token = blocks * (4 + 2 * mlp_ratio) * d * d
    embed = image_tokens * 2 * config["in_channels"] * d + text_tokens * config["joint_attention_dim"] * d
    matmuls = 2 * (per_token * tokens + embed)
    attention = blocks * 4 * tokens * tokens * d
    forward = matmuls + attention
    step = 2 * matmuls + 3 * attention
    return batch_size * (step + (forward if gradient_checkpointing else 0))


def peak_flops(device_name: str | None) -> float | None:
    """bf16 dense peak FLOP/s of a CUDA device by its name; None for a CPU or an unknown GPU."""
    gpu = find_gpu(device_name)
    return gpu.bf16_tflops * 1e12 if gpu else None
