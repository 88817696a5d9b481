"""Rectified-flow math of a FLUX LoRA step, as pure functions on tensors.

Latent packing, σ sampling, the noisy interpolant, the velocity target, the loss and
EMA. Nothing here knows about Ray, DeepSpeed or MLflow, so each piece is unit-tested.
"""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens, 2x2 patches as FLUX packs them."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents` for a (height, width) latent grid."""
    b, n, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (row, col) of each packed token for FLUX's rotary embedding: (H/2*W/2, 3)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s-1)σ): s > 1 moves training towards high noise (kohya: 3.1582)."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(n: int, method: str = "sigmoid", shift: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw n noise levels σ in (0, 1): logit-normal (`sigmoid`) or `uniform`, then shifted."""
    if method == "sigmoid":
        sigmas = torch.sigmoid(torch.randn(n, generator=generator))
    elif method == "uniform":
        sigmas = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"unknown timestep_sampling {method!r}; use 'sigmoid' or 'uniform'")
    # Keep away from exact 0/1 where the target is degenerate.
    return shift_sigmas(sigmas, shift).clamp(1e-4, 1 - 1e-4)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1-σ)·x₀ + σ·ε, σ broadcast over all but the batch dimension."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity FLUX predicts: ε - x₀."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE in fp32, averaged over every element (bf16 sums lose the small LoRA signal)."""
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def latents_from_dist(mean: torch.Tensor, logvar: torch.Tensor, shift_factor: float,
                      scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample the VAE posterior from cached (mean, logvar) and normalise as FLUX does."""
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return (mean + std * eps - shift_factor) * scaling_factor


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema ← decay·ema + (1-decay)·param, in place."""
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach().to(e.dtype), alpha=1 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the EMA up: min(decay, (1+step)/(10+step)), so early steps are not frozen at init."""
    return min(decay, (1 + step) / (10 + step))
