"""One FLUX LoRA step and the fixed-noise validation loss, from cached latents and embeddings.

The same functions run in a bare process, a Ray worker or a GPU box: they take the
transformer (plain or DeepSpeed-wrapped) and tensors, and return a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fluxray.data.buckets import Item
from fluxray.train.flow import (flow_loss, flow_target, latent_image_ids, latents_from_dist, noisy_latents,
                                pack_latents, sample_sigmas)


@dataclass
class StepSpec:
    """What the step needs to know about the model and the recipe."""

    shift_factor: float
    scaling_factor: float
    guidance: float | None          # None for a model without a guidance embedding (schnell)
    timestep_sampling: str = "sigmoid"
    timestep_shift: float = 1.0
    caption_dropout: float = 0.0
    device: torch.device = torch.device("cpu")
    #: The inputs' dtype: the base weights'.
    dtype: torch.dtype = torch.float32
    #: The forward's autocast dtype (bf16), None for none (`fluxray.train.precision`).
    autocast: torch.dtype | None = None

    def forward_context(self):
        return torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)


def flux_forward(transformer, packed: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                 pooled: torch.Tensor, img_ids: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """Velocity prediction; the diffusers transformer takes σ in [0, 1] as its timestep."""
    b = packed.shape[0]
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=packed.device, dtype=packed.dtype)
    g = None if guidance is None else torch.full((b,), guidance, device=packed.device, dtype=packed.dtype)
    return transformer(hidden_states=packed, timestep=sigmas.to(packed.dtype), guidance=g,
                       pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


def _text_batch(texts: list[str], embeds: dict, spec: StepSpec):
    pe = torch.cat([embeds[t].prompt_embeds for t in texts]).to(spec.device, spec.dtype)
    po = torch.cat([embeds[t].pooled for t in texts]).to(spec.device, spec.dtype)
    return pe, po


def training_loss(transformer, batch: list[Item], captions: list[str], latents: dict, embeds: dict,
                  spec: StepSpec, generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss of one micro-batch; all randomness comes from `generator`."""
    x0 = torch.stack([latents_from_dist(*latents[it], spec.shift_factor, spec.scaling_factor, generator)
                      for it in batch]).to(spec.device, spec.dtype)
    drop = torch.rand(len(batch), generator=generator) < spec.caption_dropout
    texts = ["" if d else c for d, c in zip(drop.tolist(), captions)]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(spec.device, spec.dtype)
    sigmas = sample_sigmas(len(batch), spec.timestep_sampling, spec.timestep_shift, generator).to(spec.device)
    packed = pack_latents(noisy_latents(x0, noise, sigmas))
    img_ids = latent_image_ids(x0.shape[2], x0.shape[3], spec.device, spec.dtype)
    pe, po = _text_batch(texts, embeds, spec)
    with spec.forward_context():
        pred = flux_forward(transformer, packed, sigmas, pe, po, img_ids, spec.guidance)
    return flow_loss(pred, pack_latents(flow_target(x0, noise)))


@dataclass
class ValCase:
    """One fixed validation point: an image's latent mean, its caption, a σ and a noise seed."""

    item: Item
    caption: str
    sigma: float
    noise_seed: int


def validation_cases(items: list[Item], captions: list[str], n_images: int, sigmas: list[float],
                     seed: int) -> list[ValCase]:
    """The fixed validation set: the first n images at their smallest bucket, at every σ."""
    firsts: dict[int, Item] = {}
    for it in items:
        if it.index not in firsts or it.size[0] * it.size[1] < firsts[it.index].size[0] * firsts[it.index].size[1]:
            firsts[it.index] = it
    chosen = [firsts[i] for i in sorted(firsts)[:n_images]]
    return [ValCase(it, captions[it.index], s, seed * 7919 + k * 31 + j)
            for k, it in enumerate(chosen) for j, s in enumerate(sigmas)]


@torch.no_grad()
def validation_loss_sum(transformer, cases: list[ValCase], latents: dict, embeds: dict,
                        spec: StepSpec) -> float:
    """Sum of the loss over fixed cases: posterior mean (no sampling), fixed σ, fixed noise."""
    total = 0.0
    for c in cases:
        mean, _ = latents[c.item]
        x0 = ((mean - spec.shift_factor) * spec.scaling_factor)[None].to(spec.device, spec.dtype)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(c.noise_seed)).to(spec.device, spec.dtype)
        sig = torch.tensor([c.sigma], device=spec.device)
        pe, po = _text_batch([c.caption], embeds, spec)
        with spec.forward_context():
            pred = flux_forward(transformer, pack_latents(noisy_latents(x0, noise, sig)), sig, pe, po,
                                latent_image_ids(x0.shape[2], x0.shape[3], spec.device, spec.dtype), spec.guidance)
        total += flow_loss(pred, pack_latents(flow_target(x0, noise))).item()
    return total
