"""A quantized base: the block linears hold int8 / fp8 / NF4 at the planned byte count, a LoRA trains on
it with the real step functions, and its file works on the unquantized model."""

import json

import numpy as np
import pytest
import torch

from fluxray.advise.memory import base_bytes
from fluxray.config import LoraConfig
from fluxray.errors import FluxrayError
from fluxray.model.quantize import check_device, load_transformer, module_bytes, quantized_kind

KINDS = ["int8", "fp8", "nf4"]


def test_fp8_needs_compute_capability_8_9():
    for capability in [(8, 6), (8, 0), (7, 5)]:
        with pytest.raises(FluxrayError, match=r"fp8 needs .* 8\.9 or newer.*use int8"):
            check_device("fp8", capability, "NVIDIA A100-SXM4-40GB")
    for capability in [(8, 9), (9, 0), (10, 0), None]:  # Ada, Hopper, Blackwell; None: CPU
        check_device("fp8", capability)
    check_device("int8", (7, 5))
    check_device("nf4", (7, 5))


@pytest.mark.parametrize("kind", KINDS)
def test_block_linears_hold_the_quantized_type_at_the_planned_bytes(random_flux, kind):
    tr = load_transformer(str(random_flux), kind, torch.bfloat16)
    dims = json.loads((random_flux / "transformer" / "config.json").read_text())
    for name, m in tr.named_modules():
        if isinstance(m, torch.nn.Linear):
            in_block = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            assert quantized_kind(m.weight) == (kind if in_block else None), name
            if in_block:  # a buffer, so DeepSpeed's `.to()` never has to swap it, and no checkpoint copies it
                assert "weight" in m._buffers and f"{name}.weight" not in tr.state_dict()
    norms = [p for n, p in tr.named_parameters() if ".norm_q." in n or ".norm_k." in n]
    assert norms and all(p.dtype == torch.bfloat16 for p in norms)
    assert sum(module_bytes(tr).values()) == base_bytes(dims, kind)  # the memory plan's count, exactly
    assert base_bytes(dims, kind) < base_bytes(dims, "none")


@pytest.fixture(scope="module")
def val_set(random_flux, prepared_sample, tmp_path_factory):
    """Cached latents and embeddings of two sample images at 64 px (the loop's own cache code)."""
    from PIL import Image

    from fluxray.data.buckets import make_items
    from fluxray.data.cache import CacheStore, build_caches
    from fluxray.data.prepare import read_prepared
    from fluxray.model.pipeline import load_pipeline
    from fluxray.train.step import validation_cases

    data = read_prepared(prepared_sample)
    images = [p for p, _ in data.items][:2]
    captions = [t for _, t in data.items][:2]
    sizes = []
    for p in images:
        with Image.open(p) as im:
            sizes.append(im.size)
    items = make_items(sizes, [64])
    pipe = load_pipeline(str(random_flux), torch.float32)
    store = CacheStore(tmp_path_factory.mktemp("cache"), "tiny", 32)
    caches = build_caches(pipe, store=store, images=images, items=items, texts=captions + [""],
                          load_text_encoders=lambda: None)
    cases = validation_cases(items, captions, 2, [0.3, 0.5, 0.7], seed=0)
    return items, captions, caches, cases


def _spec(pipe):
    from fluxray.train.step import StepSpec

    return StepSpec(shift_factor=pipe.vae.config.shift_factor, scaling_factor=pipe.vae.config.scaling_factor,
                    guidance=1.0, dtype=torch.bfloat16)


def _val(tr, val_set, spec) -> float:
    from fluxray.train.step import validation_loss_sum

    _, _, caches, cases = val_set
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return validation_loss_sum(tr, cases, caches.latents, caches.texts, spec) / len(cases)


@pytest.mark.parametrize("kind", KINDS)
def test_a_lora_trained_on_a_quantized_base_works_on_the_unquantized_model(random_flux, val_set, tmp_path, kind):
    """30 steps of the real step function (fp32 LoRA, bf16 autocast) on the quantized base; the file
    then loads into a plain FluxPipeline with `load_lora_weights` and helps it too."""
    from fluxray.model.generate import generate
    from fluxray.model.lora import add_lora, export_state_dict, lora_metadata, lora_named_params, save_lora
    from fluxray.model.pipeline import load_pipeline
    from fluxray.train.step import training_loss

    items, captions, caches, _ = val_set
    pipe = load_pipeline(str(random_flux), torch.bfloat16, quantize=kind)
    tr = pipe.transformer
    quantized = {n: m.weight for n, m in tr.named_modules() if quantized_kind(getattr(m, "weight", torch.empty(0)))}
    qbytes = module_bytes(tr)[kind]
    spec = _spec(pipe)
    params = add_lora(tr, LoraConfig(rank=8), seed=0)
    for p in params:
        p.data = p.data.float()
    before = _val(tr, val_set, spec)
    opt = torch.optim.AdamW(params, lr=3e-2)
    for step in range(30):
        it = items[step % len(items)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training_loss(tr, [it], [captions[it.index]], caches.latents, caches.texts, spec,
                                 torch.Generator().manual_seed(step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = _val(tr, val_set, spec)
    assert after < 0.9 * before, (before, after)  # fixed cases and noise: every bit of the drop is real
    # The base is what it was: the same quantized tensors, the same bytes.
    for n, w in quantized.items():
        layer = tr.get_submodule(n)
        assert getattr(layer, "base_layer", layer).weight is w and quantized_kind(w) == kind
    assert module_bytes(tr)[kind] == qbytes

    tensors = export_state_dict(dict(lora_named_params(tr)), 1.0, "fp32")
    path = save_lora(tmp_path / f"{kind}.safetensors", tensors, lora_metadata(
        trigger_word="pxco", base_model="tiny", rank=8, alpha=8, steps=30, resolution=[64], name=kind))
    plain = load_pipeline(str(random_flux), torch.bfloat16)
    plain_spec = _spec(plain)
    embeds = caches.texts[captions[0]]
    kw = dict(seed=3, width=64, height=64, steps=2, guidance=3.5)
    base_image, base_loss = np.asarray(generate(plain, embeds, **kw)), _val(plain.transformer, val_set, plain_spec)
    plain.load_lora_weights(str(path), adapter_name="q")
    assert not np.array_equal(np.asarray(generate(plain, embeds, **kw)), base_image)
    assert _val(plain.transformer, val_set, plain_spec) < 0.9 * base_loss


def test_quantization_with_zero3_fails_at_load_saying_what_to_use():
    from fluxray.config import load_config
    from fluxray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.quantize=nf4 with distributed.zero_stage=3.*use zero_stage 0 or 2"):
        load_config(None, ["model.quantize=nf4", "distributed.zero_stage=3"])
    assert load_config(None, ["model.quantize=none", "distributed.zero_stage=3"]).distributed.zero_stage == 3
    assert load_config(None, ["model.quantize=int8", "distributed.zero_stage=2"]).model.quantize == "int8"
