"""The demo model's builder: a smoke run of every stage writes what `model.path: tiny` and
`validation.embedding_model: tiny` load (the shipped weights' quality is tests/model/test_demo.py's)."""

import json
import random

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

from fluxray.advise.similarity import ImageEmbedder
from fluxray.data.sample import generic_portraits
from fluxray.model.demo import DEMO_MAX_SEQUENCE_LENGTH, demo_dir_names
from fluxray.train.pretrain_demo import Recipe, build, training_caption


@pytest.mark.slow
def test_a_quick_build_writes_a_flux_pipeline_and_a_likeness_embedder(tmp_path):
    report = build(tmp_path, Recipe(seed=3).quick())
    flux_dir, likeness_dir = (tmp_path / name for name in demo_dir_names())
    pipe = FluxPipeline.from_pretrained(flux_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("pxco, portrait", width=64, height=64, num_inference_steps=2,
                 max_sequence_length=DEMO_MAX_SEQUENCE_LENGTH).images[0]
    assert image.size == (64, 64)
    # The transformer and the VAE are stored in half precision (the megabytes that ship), and the
    # VAE carries the shift and scale measured on its own latents, not FLUX.1's.
    with safe_open(str(flux_dir / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) != (0.1159, 0.3611)
    assert ImageEmbedder(likeness_dir).embed([image]).shape[0] == 1
    assert json.loads((tmp_path / f"{flux_dir.name}-build.json").read_text())["recipe"]["seed"] == 3
    assert set(report) >= {"vae_psnr_held_out", "flux_loss", "likeness_accuracy_held_out", "seconds"}


def test_training_captions_are_written_the_ways_people_write_them():
    portrait = generic_portraits(1, size=16, seed=1)[0]
    rng = random.Random(0)
    captions = [training_caption(portrait, rng, dropout=0.1) for _ in range(400)]
    assert portrait.caption in captions and "" in captions  # the full sentence; none (drawn uncaptioned)
    made_up = 0
    for caption in filter(None, captions):
        head, _, rest = caption.partition(", ")
        if head.isalpha() and head not in portrait.phrases:  # a trigger-like word no caption uses
            made_up, caption = made_up + 1, rest
        assert caption == portrait.caption or set(caption.split(", ")) <= set(portrait.phrases), caption
    assert 120 < made_up < 240
