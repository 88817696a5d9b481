"""The random-weight 1+1-block FLUX pipeline loads and runs through diffusers exactly as FLUX.1-dev does."""

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer, T5Tokenizer

from fluxray.model.tiny import ensure_random_flux, make_random_flux

TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_flux(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="module")
def pipe(model_dir):
    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generates_image_of_requested_size(pipe):
    image = pipe(
        "pxco, portrait",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("max_sequence_length", [32, 512])
def test_encode_prompt(pipe, max_sequence_length):
    # Unknown words and non-ASCII text must encode, not raise.
    prompt = "pxco, zyxwvq portrait 日本 " * 40
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=max_sequence_length)
    assert embeds.shape == (1, max_sequence_length, 32)
    assert pooled.shape == (1, 32)
    assert text_ids.shape == (max_sequence_length, 3)


def test_tokenizers_load_as_flux_dev_classes(pipe):
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.model_max_length == 77
    assert isinstance(pipe.tokenizer_2, T5Tokenizer) and pipe.tokenizer_2.model_max_length == 512
    assert pipe.tokenizer_2.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    # Caption words are one token each; the trigger is spelled out, as FLUX.1-dev's T5 spells it.
    assert pipe.tokenizer_2.tokenize("gray hair portrait") == ["▁gray", "▁hair", "▁portrait"]
    assert pipe.tokenizer_2.tokenize("pxco") == ["▁", "p", "x", "c", "o"]


def test_transformer_is_one_double_one_single_block(pipe):
    transformer = pipe.transformer
    assert len(transformer.transformer_blocks) == 1
    assert len(transformer.single_transformer_blocks) == 1
    assert transformer.config.in_channels == 64
    assert transformer.config.guidance_embeds


def test_training_forward_backward(pipe):
    transformer, seq_len = pipe.transformer, 32
    hidden_states = torch.randn(1, 16, 64, requires_grad=True)
    out = transformer(
        hidden_states=hidden_states,
        encoder_hidden_states=torch.randn(1, seq_len, 32),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([1.0]),
        txt_ids=torch.zeros(seq_len, 3),
        img_ids=torch.zeros(16, 3),
        return_dict=False,
    )[0]
    out.pow(2).mean().backward()
    assert out.shape == (1, 16, 64)
    assert hidden_states.grad is not None


def test_vae_matches_flux_latent_space(pipe):
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)


def test_same_seed_same_weights(model_dir, tmp_path):
    reference = load_file(model_dir / TRANSFORMER_WEIGHTS)
    same = load_file(make_random_flux(tmp_path / "same", seed=0) / TRANSFORMER_WEIGHTS)
    other = load_file(make_random_flux(tmp_path / "other", seed=1) / TRANSFORMER_WEIGHTS)
    assert all(torch.equal(reference[key], same[key]) for key in reference)
    assert not all(torch.equal(reference[key], other[key]) for key in reference)


def test_folder_is_small(model_dir):
    size = sum(path.stat().st_size for path in model_dir.rglob("*") if path.is_file())
    assert size < 5 * 2**20


def test_ensure_builds_once_then_reuses(tmp_path):
    out_dir = tmp_path / "model"
    assert ensure_random_flux(out_dir) == out_dir
    mtime = (out_dir / "model_index.json").stat().st_mtime_ns
    assert ensure_random_flux(out_dir) == out_dir
    assert (out_dir / "model_index.json").stat().st_mtime_ns == mtime
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no tmp build left behind
