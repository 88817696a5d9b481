"""Model FLOPs of a FLUX LoRA step and the GPU peaks they are measured against (MFU).

Pure functions of the transformer config, so the loop, the benchmarks and the time
estimator count the same way for FLUX.1-dev and for the tiny test model.
"""

from __future__ import annotations

from typing import Any, Mapping

#: The fields of FLUX.1-dev's `transformer/config.json` that the count uses.
FLUX1_DEV = {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24, "attention_head_dim": 128,
             "in_channels": 64, "joint_attention_dim": 4096}

#: bf16 dense tensor-core peaks in TFLOP/s (no sparsity), matched against the CUDA device
#: name; the most specific name first ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A6000", 155.0),
    ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)


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
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None
