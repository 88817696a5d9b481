"""The LoRA: only LoRA weights train, the file has diffusers keys with alpha baked, and diffusers loads it."""

import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from fluxray.config import LoraConfig
from fluxray.model.lora import (add_lora, export_state_dict, lora_metadata, lora_named_params, read_lora_metadata,
                                save_lora, target_regex)


def _transformer(random_flux):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(random_flux, subfolder="transformer")


def test_only_lora_parameters_train_and_top_level_layers_are_left_alone(random_flux):
    tr = _transformer(random_flux)
    params = add_lora(tr, LoraConfig(rank=4))
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == len(params)
    names = list(lora_named_params(tr))
    assert any(".single_transformer_blocks.0.proj_out." in n for n in names)
    assert not any(n.startswith("transformer.proj_out.") for n in names)  # the output layer stays frozen
    assert any(".ff_context.net.2." in n for n in names) and any(".attn.add_q_proj." in n for n in names)


def test_target_regex_needs_a_block_prefix():
    import re

    rx = re.compile(target_regex(["proj_out", "attn.to_q"]))
    assert rx.fullmatch("single_transformer_blocks.0.proj_out")
    assert rx.fullmatch("transformer_blocks.0.attn.to_q")
    assert not rx.fullmatch("proj_out")


def test_export_bakes_alpha_into_b():
    values = {"transformer.a.lora_A.weight": torch.ones(2, 3), "transformer.a.lora_B.weight": torch.ones(3, 2)}
    out = export_state_dict(values, scale=0.5, dtype="fp32")
    assert torch.equal(out["transformer.a.lora_A.weight"], torch.ones(2, 3))
    assert torch.equal(out["transformer.a.lora_B.weight"], torch.full((3, 2), 0.5))
    assert export_state_dict(values, 1.0, "bf16")["transformer.a.lora_A.weight"].dtype == torch.bfloat16


def test_saved_file_loads_in_diffusers_and_changes_the_image(random_flux, tmp_path):
    pipe = FluxPipeline.from_pretrained(random_flux)
    pipe.set_progress_bar_config(disable=True)
    add_lora(pipe.transformer, LoraConfig(rank=4, alpha=8))
    named = lora_named_params(pipe.transformer)
    with torch.no_grad():  # a LoRA that does something: B starts at zero
        for k, p in named.items():
            if ".lora_B." in k:
                p.normal_(0, 0.5)
    tensors = export_state_dict({k: p for k, p in named.items()}, scale=2.0, dtype="fp32")
    path = save_lora(tmp_path / "x.safetensors", tensors, lora_metadata(
        trigger_word="pxco", base_model="tiny", rank=4, alpha=8, steps=10, resolution=[64], name="x"))
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)
    assert not any("base_model" in k for k in keys)
    meta = read_lora_metadata(path)
    assert meta["trigger_word"] == "pxco" and meta["rank"] == "4" and meta["steps"] == "10"

    base = FluxPipeline.from_pretrained(random_flux)
    base.set_progress_bar_config(disable=True)
    kw = dict(prompt="pxco, portrait", height=64, width=64, num_inference_steps=2, max_sequence_length=32)
    before = base(**kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    base.load_lora_weights(str(path))
    after = base(**kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (after - before).abs().max() > 1e-3
