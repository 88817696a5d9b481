"""Rectified-flow math against its definitions and against diffusers' own FLUX helpers."""

import torch
from diffusers import FluxPipeline

from fluxray.train.flow import (ema_decay_at, ema_update, flow_loss, flow_target, latent_image_ids,
                                latents_from_dist, noisy_latents, pack_latents, sample_sigmas, shift_sigmas,
                                unpack_latents)


def test_pack_matches_diffusers_and_round_trips():
    x = torch.randn(2, 16, 8, 12)
    packed = pack_latents(x)
    assert packed.shape == (2, 4 * 6, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(unpack_latents(packed, 8, 12), x)


def test_image_ids_match_diffusers():
    ours = latent_image_ids(8, 12)
    theirs = FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
    assert torch.equal(ours, theirs)


def test_interpolant_endpoints_and_velocity():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.allclose(noisy_latents(x0, eps, torch.zeros(3)), x0)
    assert torch.allclose(noisy_latents(x0, eps, torch.ones(3)), eps)
    s = torch.tensor([0.25, 0.5, 0.75])
    xs = noisy_latents(x0, eps, s)
    # Moving along the velocity from x_σ by (1-σ) lands on ε.
    assert torch.allclose(xs + (1 - s).view(-1, 1, 1, 1) * flow_target(x0, eps), eps, atol=1e-6)
    assert flow_loss(flow_target(x0, eps), eps - x0).item() == 0.0


def test_sigma_sampling_ranges_and_shift():
    g = torch.Generator().manual_seed(0)
    for method in ("sigmoid", "uniform"):
        s = sample_sigmas(10_000, method, 1.0, g)
        assert s.min() > 0 and s.max() < 1
        assert abs(s.mean().item() - 0.5) < 0.02
    shifted = sample_sigmas(10_000, "sigmoid", 3.1582, torch.Generator().manual_seed(0))
    assert shifted.mean() > 0.6  # shift moves mass to high noise
    assert torch.allclose(shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))


def test_sampling_is_reproducible_from_a_generator():
    a = sample_sigmas(5, "sigmoid", 1.0, torch.Generator().manual_seed(3))
    b = sample_sigmas(5, "sigmoid", 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_latents_from_cached_posterior_are_normalised():
    mean, logvar = torch.full((16, 4, 4), 1.0), torch.full((16, 4, 4), -60.0)
    z = latents_from_dist(mean, logvar, 0.1159, 0.3611, torch.Generator().manual_seed(0))
    assert torch.allclose(z, torch.full_like(z, (1.0 - 0.1159) * 0.3611), atol=1e-5)


def test_ema_update_and_warmup():
    ema, p = [torch.zeros(3)], [torch.ones(3)]
    ema_update(ema, p, 0.9)
    assert torch.allclose(ema[0], torch.full((3,), 0.1))
    assert ema_decay_at(0, 0.99) == 0.1 and ema_decay_at(10_000, 0.99) == 0.99
