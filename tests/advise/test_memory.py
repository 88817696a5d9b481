"""The memory plan: every part against bytes measured on CPU (a mid-size FLUX transformer, torch's own
dispatch for the activations), the FLUX.1-dev totals against the published figures, and `auto`'s picks."""

import json
import re
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fluxray.advise.memory import (CLIP_L, HEADROOM, T5_XXL, Setting, activation_bytes, base_bytes, candidates,
                                   choose, clip_params, lora_params, lora_state_bytes, plan, t5_bytes, t5_params,
                                   transformer_linears, transformer_params, vae_encode_bytes)
from fluxray.config import DEFAULT_LORA_TARGETS, LoraConfig, load_config
from fluxray.errors import ConfigError
from fluxray.track.flops import FLUX1_DEV, find_gpu

REPO = Path(__file__).resolve().parents[2]
#: A mid-size FLUX transformer: 2 + 4 blocks, hidden 256 (4 heads of 64): big enough that the per-token
#: terms dominate, small enough for a CPU step in seconds.
MID = {"num_layers": 2, "num_single_layers": 4, "num_attention_heads": 4, "attention_head_dim": 64,
       "in_channels": 64, "joint_attention_dim": 64, "pooled_projection_dim": 64, "guidance_embeds": True}


def _model(dims, device="cpu"):
    from diffusers import FluxTransformer2DModel

    hd = dims["attention_head_dim"]
    with torch.device(device):
        return FluxTransformer2DModel(**dims, axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8))


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the block and still alive, and their peak.

    What `torch.cuda.max_memory_allocated` reports on a GPU, counted on CPU: every op's outputs are
    added when created and taken off when the last reference goes; storages that existed before (the
    weights, the inputs) are never counted.
    """

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live = self.peak = 0
        self.sizes = {}

    def _gone(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if id(s) not in self.sizes and s.nbytes() and s.data_ptr() not in self.existing:
                    self.sizes[id(s)] = s.nbytes()
                    self.live += s.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(s, self._gone, id(s))
        return out


# ---------------------------------------------------------------------------------------
# Each part against what torch holds
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [MID, {**FLUX1_DEV, "guidance_embeds": True},
                                  {**MID, "guidance_embeds": False, "num_layers": 1}])
def test_the_layer_inventory_is_diffusers_model(dims):
    model = _model(dims, "meta")
    real = {(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {(li.name, li.fan_in, li.fan_out) for li in transformer_linears(dims)} == real
    assert transformer_params(dims) == sum(p.numel() for p in model.parameters())
    assert base_bytes(dims, "none") == 2 * transformer_params(dims)  # bf16


def test_lora_and_its_optimizer_state_match_a_real_adamw_step():
    """fp32 LoRA weights, gradients, Adam's two moments and the EMA: counted tensor by tensor."""
    from fluxray.model.lora import add_lora

    model = _model(MID).to(torch.bfloat16)
    params = add_lora(model, LoraConfig(rank=8))
    for p in params:
        p.data = p.data.float()
    assert sum(p.numel() for p in params) == lora_params(MID, 8, DEFAULT_LORA_TARGETS)
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    ema = [p.detach().clone() for p in params]
    held = params + [p.grad for p in params] + ema
    held += [v for s in opt.state.values() for k, v in s.items() if k != "step"]  # `step` stays on the CPU
    measured = sum(t.numel() * t.element_size() for t in held)
    assert lora_state_bytes(sum(p.numel() for p in params), ema=True) == measured


def _measure_step(dims, image_side: int, text: int, checkpointing: bool) -> tuple[int, int]:
    """Peak bytes of one bf16-autocast LoRA step (forward and backward), less the LoRA's gradients."""
    from fluxray.model.lora import add_lora
    from fluxray.train.step import flux_forward

    torch.manual_seed(0)
    model = _model(dims).to(torch.bfloat16)
    params = add_lora(model, LoraConfig(rank=8))
    for p in params:
        p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    n = (image_side // 16) ** 2
    inputs = (torch.randn(1, n, 64, dtype=torch.bfloat16), torch.tensor([0.5]),
              torch.randn(1, text, 64, dtype=torch.bfloat16), torch.randn(1, 64, dtype=torch.bfloat16),
              torch.zeros(n, 3, dtype=torch.bfloat16), 1.0)
    meter = LiveBytes(list(model.parameters()) + [t for t in inputs if isinstance(t, torch.Tensor)])
    with meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = flux_forward(model, *inputs)
        pred.float().pow(2).mean().backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    return meter.peak - grads, grads


@pytest.mark.slow
@pytest.mark.parametrize("side, checkpointing", [(256, False), (384, False), (256, True), (384, True)])
def test_activation_bytes_match_the_measured_peak_of_a_step(side, checkpointing):
    """The formula's every term against the peak of a real step (LoRA rank 8, 64 text tokens)."""
    measured, _ = _measure_step(MID, side, 64, checkpointing)
    planned = activation_bytes(MID, side, side, 64, rank=8, checkpointing=checkpointing)
    # Within 6 %: CPU attention's backward holds a little more than a GPU kernel at the longer sequence.
    assert planned == pytest.approx(measured, rel=0.06), (planned, measured)


@pytest.mark.slow
def test_activations_scale_with_the_hidden_size_as_planned():
    wide = {**MID, "num_attention_heads": 8}
    measured, _ = _measure_step(wide, 256, 64, False)
    assert activation_bytes(wide, 256, 256, 64, rank=8) == pytest.approx(measured, rel=0.03)


def test_text_encoders_and_vae_count_like_the_models(random_flux):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    from fluxray.model.quantize import module_bytes, quantize_text_encoder

    t5_cfg = json.loads((random_flux / "text_encoder_2" / "config.json").read_text())
    clip_cfg = json.loads((random_flux / "text_encoder" / "config.json").read_text())
    t5 = T5EncoderModel.from_pretrained(random_flux, subfolder="text_encoder_2", torch_dtype=torch.bfloat16)
    clip = CLIPTextModel.from_pretrained(random_flux, subfolder="text_encoder")
    assert t5_params(t5_cfg) == sum(p.numel() for p in t5.parameters())
    assert clip_params(clip_cfg) == sum(p.numel() for p in clip.parameters())
    assert t5_bytes(t5_cfg) == sum(module_bytes(t5).values())
    assert t5_bytes(t5_cfg, quantize=True) == sum(module_bytes(quantize_text_encoder(t5, "cpu")).values())
    # FLUX.1-dev's: T5-XXL's 4.76 B and CLIP-L's 123 M parameters.
    assert t5_params(T5_XXL) == 4_762_310_656 and clip_params(CLIP_L) == 123_060_480
    vae = AutoencoderKL.from_pretrained(random_flux, subfolder="vae", torch_dtype=torch.bfloat16)
    x = torch.randn(1, 3, 128, 128, dtype=torch.bfloat16)
    meter = LiveBytes(list(vae.parameters()) + [x])
    with torch.no_grad(), meter:
        vae.encode(x).latent_dist.mean
    weights = sum(p.numel() for p in vae.parameters())
    assert vae_encode_bytes({"params": weights, "block_out_channels": vae.config.block_out_channels}, 128, 128) == (
        2 * weights + meter.peak)


# ---------------------------------------------------------------------------------------
# FLUX.1-dev against the published figures
# ---------------------------------------------------------------------------------------

SIMPLETUNER = "SimpleTuner documentation/quickstart/FLUX.md (rank-16 LoRA, all attention and MLP layers)"
DIFFUSERS = "diffusers examples/dreambooth/README_flux.md (rank-16 LoRA)"


@pytest.mark.parametrize("quantize, side, checkpointing, published_gb, source", [
    # "a bit more than 30G VRAM when not quantising the base model"; its example trains 512 and 1024 px buckets
    ("none", 1024, True, 30, SIMPLETUNER),
    # "a bit more than 18G VRAM when quantising to int8"
    ("int8", 1024, True, 18, SIMPLETUNER),
    # "the lowest VRAM utilisation (9090M)": nf4-bnb, 512 px, gradient checkpointing on
    ("nf4", 512, True, 9090 * 2**20 / 1e9, SIMPLETUNER),
    # "1024px requires >= 12G VRAM"
    ("nf4", 1024, True, 12, SIMPLETUNER),
    # "can exceed 40GB of VRAM": the script's defaults are 512 px and no gradient checkpointing
    ("none", 512, False, 40, DIFFUSERS),
])
def test_flux_dev_totals_are_within_25_percent_of_the_published_figures(quantize, side, checkpointing, published_gb,
                                                                         source):
    """Pinned settings: batch 1, text embeddings cached and the encoders unloaded (the steps' peak)."""
    cfg = load_config(REPO / "configs" / "flux-dev.yaml", [f"dataset.resolutions=[{side}]"])
    p = plan(cfg, Setting(quantize, 0, checkpointing))
    assert p.steps / 1e9 == pytest.approx(published_gb, rel=0.25), (source, p.breakdown())


# ---------------------------------------------------------------------------------------
# auto
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu, quantize, checkpointing", [
    ("RTX 4090", "int8", True),  # 24 GB: the bf16 base (22.2 GiB) leaves no room; int8 with recomputation fits
    ("A100 40GB", "none", True),  # 40 GB: bf16 base, but activations at 1024 px must be recomputed
    ("H100", "none", False),  # 80 GB: everything fits, nothing recomputed
])
def test_auto_takes_the_fastest_setting_that_fits(gpu, quantize, checkpointing):
    cfg = load_config(REPO / "configs" / "flux-dev.yaml", [])  # 512-1024 px buckets, rank 16, batch 1
    chosen, why = choose(cfg, find_gpu(gpu))
    assert (chosen.setting.quantize, chosen.setting.zero_stage, chosen.setting.checkpointing) == (
        quantize, 0, checkpointing), why
    card = find_gpu(gpu).memory_gib * 2**30
    assert chosen.peak <= (1 - HEADROOM) * card and f"{chosen.peak / 2**30:.1f} GiB" in why
    # Every faster setting it passed over would not have fitted.
    for s in candidates(cfg)[:candidates(cfg).index(chosen.setting)]:
        assert not plan(cfg, s).fits(card), s


def test_auto_prefers_a_sharded_bf16_base_to_a_quantized_one_with_several_workers():
    cfg = load_config(REPO / "configs" / "flux-dev.yaml", ["distributed.workers=4"])
    chosen, _ = choose(cfg, find_gpu("RTX 4090"))
    assert (chosen.setting.quantize, chosen.setting.zero_stage) == ("none", 3)
    assert chosen.base < base_bytes(FLUX1_DEV, "none") / 3  # a quarter of the base, plus one block gathered


def test_what_the_config_fixes_auto_keeps():
    cfg = load_config(REPO / "configs" / "flux-dev.yaml", ["model.quantize=nf4"])
    chosen, _ = choose(cfg, find_gpu("H100"))
    assert chosen.setting.quantize == "nf4"
    with pytest.raises(ConfigError, match="fp8 needs .* 8.9"):
        choose(load_config(REPO / "configs" / "flux-dev.yaml", ["model.quantize=fp8"]), find_gpu("A100 40GB"))
    assert choose(load_config(REPO / "configs" / "flux-dev.yaml", ["model.quantize=fp8"]), find_gpu("L40S"))
    # No GPU: nothing to fit, the fastest setting.
    assert choose(load_config(REPO / "configs" / "tiny.yaml", []), None)[0].setting == Setting("none", 0, False)


def test_the_advise_line_has_its_exact_form():
    cfg = load_config(REPO / "configs" / "flux-dev.yaml", ["model.quantize=nf4"])
    line = plan(cfg, Setting("nf4", 0, True)).line(find_gpu("RTX 4090"))
    assert re.fullmatch(r"peak GPU memory per worker: \d+\.\d GiB \(fits RTX 4090 24 GB\)", line), line
    big = plan(cfg, Setting("none", 0, False)).line(find_gpu("RTX 4090"))
    assert big.endswith("(does not fit RTX 4090 24 GB)")
