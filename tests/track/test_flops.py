"""The LoRA-step FLOP count against the FLUX.1-dev numbers in flux-lora-notes.md, and the GPU peaks."""

import pytest
from diffusers import FluxTransformer2DModel

from fluxray.track.flops import FLUX1_DEV, lora_step_flops, peak_flops


@pytest.mark.parametrize("side, step_tflop, recompute_tflop", [(512, 44.6, 21.5), (1024, 163.6, 74.4)])
def test_flux_dev_lora_step_matches_the_published_counts(side, step_tflop, recompute_tflop):
    step = lora_step_flops(FLUX1_DEV, side, side, text_tokens=512)
    assert step / 1e12 == pytest.approx(step_tflop, rel=0.01)
    # Full gradient checkpointing recomputes one forward pass.
    with_ckpt = lora_step_flops(FLUX1_DEV, side, side, text_tokens=512, gradient_checkpointing=True)
    assert (with_ckpt - step) / 1e12 == pytest.approx(recompute_tflop, rel=0.01)


def test_flux_dev_weights_per_token_are_6_46_billion():
    # At one token attention vanishes: the step is 2 matmul passes of 2 FLOPs per weight per token.
    one_token = lora_step_flops(FLUX1_DEV, 0, 0, text_tokens=1) - 2 * 2 * FLUX1_DEV["joint_attention_dim"] * 3072
    assert one_token / 4 / 1e9 == pytest.approx(6.46, rel=0.01)


def test_counts_the_tiny_model_from_its_own_config(random_flux):
    config = FluxTransformer2DModel.load_config(random_flux / "transformer")
    one = lora_step_flops(config, 64, 64, text_tokens=32)
    assert 0 < one < lora_step_flops(FLUX1_DEV, 64, 64, text_tokens=32) / 1e4
    assert lora_step_flops(config, 64, 64, text_tokens=32, batch_size=3) == pytest.approx(3 * one)
    assert lora_step_flops(config, 128, 64, text_tokens=32) > one


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A10G", 70), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
])
def test_peak_by_gpu_name(name, tflops):
    assert peak_flops(name) == tflops * 1e12


@pytest.mark.parametrize("name", [None, "", "cpu", "Tesla V100-SXM2-16GB"])
def test_no_peak_for_cpu_or_unknown_gpus(name):
    assert peak_flops(name) is None
