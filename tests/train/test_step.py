"""What the training loss teaches is what generation draws.

`training_loss` trains a LoRA on one image the base model never saw (a pxco picture), from the VAE
posterior the latent cache would hold; an unmodified diffusers `FluxPipeline`, the LoRA file loaded
with `load_lora_weights`, regenerates it from its caption: the final latent lands near the image's,
far nearer than the base model's does. Every convention the loss shares with the sampler is on that
path: the direction of σ (x_σ = (1-σ)·x₀ + σ·ε, target ε - x₀, sampled from σ = 1 down to 0), the
timestep scale (σ in [0, 1]; the pipeline divides its 0..1000 timesteps by 1000 and the transformer
multiplies by 1000), the 2x2 latent packing, the image position ids and the VAE's shift and scaling (the guidance value
is 1 on both sides; the demo model was pretrained to ignore it). The negative controls break one of
them in the loss and train again: the LoRA learns a mapping the sampler never asks for, and the same
check fails. Not the timestep's scale, nor the σ label alone: a LoRA that memorises one picture reads
the noise level off the noisy latent itself, so it needs no timestep (measured: cosine 0.96 trained
with σ·1000, or with 1 - σ, as the transformer's timestep).

The base is the demo model: it draws generic people, so the LoRA only has to learn one of them (a
random-weight base needs thousands of LoRA steps for one image). The caption is the bare trigger,
which tells the base model nothing: its picture is a stranger's (a portrait too, so its latent's
cosine to the image is about 0.6, not 0).
"""

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import fluxray.train.step as step_mod
from fluxray.config import LoraConfig
from fluxray.data.buckets import Item
from fluxray.data.cache import pixels_for_bucket
from fluxray.model.demo import demo_model_dir
from fluxray.model.generate import encode_prompt
from fluxray.model.lora import add_lora, export_state_dict, lora_named_params, save_lora
from fluxray.train.flow import unpack_latents
from fluxray.train.step import StepSpec, training_loss

pytestmark = pytest.mark.slow
SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "pxco"

SIZE, CAPTION, TOKENS = 64, "pxco", 32
STEPS, LR, RANK, BATCH = 50, 1e-2, 16, 4  # cosine 0.99 here; the base model's 0.59
GUIDANCE = 1.0  # train.guidance, and here also the sampler's guidance_scale: one value on both sides


def _pipe() -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(demo_model_dir(), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def target():
    """The image's VAE posterior (mean, logvar), as the latent cache holds it, and its normalised latent."""
    vae = _pipe().vae
    with Image.open(SAMPLES / "0001.png") as im:
        px = pixels_for_bucket(im.convert("RGB"), (SIZE, SIZE))
    with torch.no_grad():
        dist = vae.encode(px[None]).latent_dist
    return dist.mean[0], dist.logvar[0], (dist.mean[0] - vae.config.shift_factor) * vae.config.scaling_factor


def _train(target, path: Path) -> Path:
    """The LoRA file that `training_loss` makes of the one image in STEPS steps."""
    pipe = _pipe()
    with torch.no_grad():  # as the text cache holds them: constants of the step
        text = encode_prompt(pipe, CAPTION, TOKENS)
    item = Item(0, (SIZE, SIZE))
    spec = StepSpec(shift_factor=pipe.vae.config.shift_factor, scaling_factor=pipe.vae.config.scaling_factor,
                    guidance=GUIDANCE)
    transformer = pipe.transformer
    params = add_lora(transformer, LoraConfig(rank=RANK), seed=0)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    for s in range(STEPS):
        loss = training_loss(transformer, [item] * BATCH, [CAPTION] * BATCH, {item: target[:2]}, {CAPTION: text},
                             spec, torch.Generator().manual_seed(s))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return save_lora(path, export_state_dict(dict(lora_named_params(transformer)), 1.0, "fp32"), {})


def _regenerated_cosine(target, lora: Path | None = None) -> float:
    """Cosine of the pipeline's final latent (before the VAE decodes it) with the image's."""
    pipe = _pipe()
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    packed = pipe(CAPTION, width=SIZE, height=SIZE, num_inference_steps=20, guidance_scale=GUIDANCE,
                  max_sequence_length=TOKENS, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    latent = unpack_latents(packed, SIZE // 8, SIZE // 8)[0]
    return torch.nn.functional.cosine_similarity(latent.flatten(), target[2].flatten(), dim=0).item()


@pytest.fixture(scope="module")
def base_cosine(target):
    return _regenerated_cosine(target)


def _agrees(trained: float, base: float) -> bool:
    return trained >= 0.8 and trained - base >= 0.4


def test_a_lora_trained_on_one_image_regenerates_it_through_an_unmodified_pipeline(target, base_cosine, tmp_path):
    trained = _regenerated_cosine(target, _train(target, tmp_path / "one.safetensors"))
    assert _agrees(trained, base_cosine), (trained, base_cosine)


NOISY, TARGET, PACK, IDS = step_mod.noisy_latents, step_mod.flow_target, step_mod.pack_latents, step_mod.latent_image_ids


def _noise_at_sigma_0(x0, noise, sigmas):
    return NOISY(noise, x0, sigmas)  # x_σ = (1-σ)·ε + σ·x₀: σ = 0 is the noise, where the sampler starts at 1


def _target_towards_noise_at_0(x0, noise):
    return TARGET(noise, x0)  # x₀ - ε, the velocity of that direction


def _packed_transposed(latents):
    return PACK(latents.transpose(2, 3))  # 2x2 patches read column by column


def _rows_and_cols_swapped(height, width, *args, **kwargs):
    return IDS(height, width, *args, **kwargs)[:, [0, 2, 1]]


@pytest.mark.parametrize("broken", [
    {"noisy_latents": _noise_at_sigma_0, "flow_target": _target_towards_noise_at_0},
    {"pack_latents": _packed_transposed},
    {"latent_image_ids": _rows_and_cols_swapped},
], ids=["sigma-direction", "packing", "position-ids"])
def test_a_convention_the_sampler_does_not_share_fails_the_same_check(target, base_cosine, tmp_path, monkeypatch,
                                                                      broken):
    for name, fn in broken.items():
        monkeypatch.setattr(step_mod, name, fn)
    trained = _regenerated_cosine(target, _train(target, tmp_path / "off.safetensors"))
    assert not _agrees(trained, base_cosine), (list(broken), trained, base_cosine)
