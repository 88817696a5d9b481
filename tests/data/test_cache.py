"""Latent and text caches: keyed by content, filled once, reused by the next job on the same data."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from fluxray.data.cache import pixels_for_bucket
from fluxray.train.job import run_job

REPO = Path(__file__).resolve().parents[2]


def test_pixels_cover_the_bucket_and_centre_crop():
    img = Image.new("RGB", (300, 200), "white")
    px = pixels_for_bucket(img, (128, 64))
    assert px.shape == (3, 64, 128)
    assert px.min() >= -1 and px.max() <= 1


def _cfg(random_flux, prepared_sample, root, name):
    from fluxray.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.path={random_flux}", f"dataset.path={prepared_sample}", f"storage.root={root}",
        f"save.name={name}", "train.steps=3", "sample.every=0", "validation.embedding_model=null", "save.every=3",
        "distributed.workers=1",
        "dataset.resolutions=[64, 128]"])


def test_second_job_on_the_same_data_computes_no_latents_and_no_embeddings(random_flux, prepared_sample, tmp_path,
                                                                        monkeypatch):
    first = run_job(_cfg(random_flux, prepared_sample, tmp_path, "first"), local=True)
    # 18 images x 2 buckets, 18 captions + the empty caption + 3 preview prompts.
    assert first["cache"]["latents_computed"] == 36 and first["cache"]["latents_reused"] == 0
    assert first["cache"]["texts_computed"] >= 19

    # The second job must not even load the text encoders: make loading them fail.
    import fluxray.model.pipeline as pipeline

    def refuse(*a, **k):
        raise AssertionError("text encoders loaded although every embedding was cached")

    monkeypatch.setattr(pipeline, "attach_text_encoders", refuse)
    second = run_job(_cfg(random_flux, prepared_sample, tmp_path, "second"), local=True)
    assert second["cache"]["latents_computed"] == 0 and second["cache"]["texts_computed"] == 0
    assert second["cache"]["latents_reused"] == 36
    assert second["encoders_loaded"] is False


def test_without_caches_the_job_encodes_on_the_fly(random_flux, prepared_sample, tmp_path):
    cfg = _cfg(random_flux, prepared_sample, tmp_path, "nocache").model_copy(deep=True)
    cfg.dataset.cache_latents = False
    cfg.dataset.cache_text_embeddings = False
    summary = run_job(cfg, local=True)
    assert summary["steps"] == 3 and summary["encoders_loaded"] is True
    assert summary["cache"]["latents_computed"] == 0 and summary["cache"]["texts_computed"] == 0
    assert not (tmp_path / "cache").exists()


def test_training_step_needs_neither_text_encoders_nor_vae(random_flux):
    """The step takes the transformer and cached tensors only; a pipeline without encoders trains."""
    from diffusers import FluxTransformer2DModel

    from fluxray.config import LoraConfig
    from fluxray.data.buckets import Item
    from fluxray.model.generate import PromptEmbeds
    from fluxray.model.lora import add_lora
    from fluxray.train.step import StepSpec, training_loss

    tr = FluxTransformer2DModel.from_pretrained(random_flux, subfolder="transformer")
    params = add_lora(tr, LoraConfig(rank=4))
    item = Item(0, (64, 64))
    loss = training_loss(tr, [item], ["pxco"], {item: (torch.randn(16, 8, 8), torch.zeros(16, 8, 8))},
                         {"pxco": PromptEmbeds(torch.randn(1, 32, 32), torch.randn(1, 32))},
                         StepSpec(0.1159, 0.3611, 1.0), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in params)
