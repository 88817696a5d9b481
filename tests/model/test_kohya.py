"""The kohya export: BFL names, fused q/k/v exact, and diffusers' own kohya converter loads it
to the same weights as the diffusers-format file."""

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from fluxray.config import DEFAULT_LORA_TARGETS, LoraConfig
from fluxray.errors import ConfigError
from fluxray.model.kohya import kohya_path, save_kohya, to_kohya, unmapped_targets
from fluxray.model.lora import add_lora, export_state_dict, lora_metadata, lora_named_params, save_lora


def _without_linear1(tensors):
    """diffusers' kohya converter hard-codes FLUX.1-dev's single-block widths (3072 x3 + 12288), so
    on the tiny model the single blocks' fused `linear1` cannot go through it; it is round-tripped
    below at FLUX.1-dev's real widths instead."""
    return {k: v for k, v in tensors.items()
            if not (k.startswith("transformer.single_transformer_blocks.") and (".attn." in k or ".proj_mlp." in k))}


def _random_lora(pipe, targets, rank=4, alpha=8.0, seed=0):
    add_lora(pipe.transformer, LoraConfig(rank=rank, alpha=alpha, targets=targets), seed=seed)
    named = lora_named_params(pipe.transformer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero; give the LoRA something to carry
        for k, p in named.items():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return export_state_dict(dict(named), scale=alpha / rank, dtype="fp32")


def _deltas(transformer) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B @ A of every LoRA layer, as peft applies it."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in transformer.named_modules():
        if isinstance(m, LoraLayer):
            for adapter in m.lora_A:
                out[name] = m.scaling[adapter] * m.lora_B[adapter].weight @ m.lora_A[adapter].weight
    return out


def test_names_follow_bfl_and_fused_up_is_block_diagonal():
    r, d = 2, 8
    A = {p: torch.randn(r, d) for p in ("to_q", "to_k", "to_v")}
    B = {p: torch.randn(d, r) for p in ("to_q", "to_k", "to_v")}
    sd = {}
    for p in A:
        sd[f"transformer.transformer_blocks.3.attn.{p}.lora_A.weight"] = A[p]
        sd[f"transformer.transformer_blocks.3.attn.{p}.lora_B.weight"] = B[p]
    sd["transformer.transformer_blocks.3.ff_context.net.2.lora_A.weight"] = torch.randn(r, 4 * d)
    sd["transformer.transformer_blocks.3.ff_context.net.2.lora_B.weight"] = torch.randn(d, r)
    k = to_kohya(sd)
    qkv = "lora_unet_double_blocks_3_img_attn_qkv"
    assert set(k) == {f"{qkv}.lora_down.weight", f"{qkv}.lora_up.weight", f"{qkv}.alpha",
                      "lora_unet_double_blocks_3_txt_mlp_2.lora_down.weight",
                      "lora_unet_double_blocks_3_txt_mlp_2.lora_up.weight", "lora_unet_double_blocks_3_txt_mlp_2.alpha"}
    assert k[f"{qkv}.lora_down.weight"].shape == (3 * r, d) and k[f"{qkv}.lora_up.weight"].shape == (3 * d, 3 * r)
    assert k[f"{qkv}.alpha"].item() == 3 * r  # scale 1: alpha/rank is already baked into B
    # What ComfyUI computes, up @ down · alpha/rank, is each part's B @ A in its own rows.
    fused = k[f"{qkv}.lora_up.weight"] @ k[f"{qkv}.lora_down.weight"]
    expect = torch.cat([B[p] @ A[p] for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(fused, expect)


def test_untrained_fused_part_is_zero():
    r, d = 2, 8
    sd = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(r, d),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(d, r)}
    k = to_kohya(sd)
    up, down = k["lora_unet_single_blocks_0_linear1.lora_up.weight"], k["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    assert up.shape == (3 * d + 4 * d, 4 * r)  # q, k, v, then the 4x MLP input
    full = up @ down
    torch.testing.assert_close(full[:d], sd["transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight"]
                               @ sd["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert not full[d:].any()


def test_unmapped_module_is_a_clear_error_and_targets_are_checked():
    with pytest.raises(ConfigError, match="no kohya name"):
        to_kohya({"transformer.x_embedder.lora_A.weight": torch.zeros(1, 2)})
    assert unmapped_targets(DEFAULT_LORA_TARGETS) == []
    assert unmapped_targets(["attn.to_q", "x_embedder", "norm_out.linear"]) == ["x_embedder", "norm_out.linear"]


def test_diffusers_loads_the_kohya_file_to_the_same_weights(random_flux, tmp_path):
    pipe = FluxPipeline.from_pretrained(random_flux)
    pipe.set_progress_bar_config(disable=True)
    tensors = _without_linear1(_random_lora(pipe, DEFAULT_LORA_TARGETS))
    assert any(".single_transformer_blocks.0.proj_out." in k for k in tensors)
    meta = lora_metadata(trigger_word="pxco", base_model="tiny", rank=4, alpha=8, steps=1, resolution=[64], name="x")
    path = save_lora(tmp_path / "x.safetensors", tensors, meta)
    kpath = save_kohya(path, tensors, meta)
    assert kpath == kohya_path(path) == tmp_path / "x.kohya.safetensors"
    assert all(k.startswith("lora_unet_") for k in load_file(str(kpath)))

    results = {}
    for label, file in (("diffusers", path), ("kohya", kpath)):
        p = FluxPipeline.from_pretrained(random_flux)
        p.set_progress_bar_config(disable=True)
        p.load_lora_weights(str(file), adapter_name="x")
        img = p(prompt="pxco, portrait", width=64, height=64, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="pt").images
        results[label] = (_deltas(p.transformer), img)
    d_diff, d_kohya = results["diffusers"][0], results["kohya"][0]
    assert set(d_diff) == set(d_kohya) and len(d_diff) == len(tensors) // 2
    for name in d_diff:
        torch.testing.assert_close(d_kohya[name], d_diff[name], rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(results["kohya"][1], results["diffusers"][1])


def test_fused_single_block_round_trips_at_flux_dev_widths(tmp_path):
    """`linear1` (q, k, v, MLP in) and `linear2` at 3072/12288 through FluxPipeline.lora_state_dict."""
    r, d = 4, 3072
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for module, out in (("attn.to_q", d), ("attn.to_k", d), ("attn.to_v", d), ("proj_mlp", 4 * d), ("proj_out", d)):
        width = 5 * d if module == "proj_out" else d
        sd[f"transformer.single_transformer_blocks.7.{module}.lora_A.weight"] = torch.randn(r, width, generator=gen)
        sd[f"transformer.single_transformer_blocks.7.{module}.lora_B.weight"] = torch.randn(out, r, generator=gen)
    path = save_lora(tmp_path / "s.safetensors", sd, {"format": "pt"})
    kpath = save_kohya(path, sd, {"rank": r})
    back = FluxPipeline.lora_state_dict(str(kpath))
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key], sd[key]), key
