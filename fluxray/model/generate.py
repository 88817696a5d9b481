"""The one image-generation function: training previews and the HTTP generate endpoint both call it.

Same embeddings, same seed (a CPU generator, so a seed means the same noise on any
device), same flow-match Euler scheduler: a preview at step N is the image that
`POST /v1/generate` gives for the step-N LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    """T5 sequence embeddings and the CLIP pooled vector of one prompt."""

    prompt_embeds: torch.Tensor   # (1, L, joint_attention_dim)
    pooled: torch.Tensor          # (1, pooled_projection_dim)


@torch.no_grad()
def encode_prompt(pipe, prompt: str, max_sequence_length: int) -> PromptEmbeds:
    """CLIP pooled + T5 embeddings of one prompt through the pipeline's own encoder code."""
    device = pipe.text_encoder_2.device
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)
    return PromptEmbeds(embeds, pooled)


@torch.no_grad()
def generate(pipe, embeds: PromptEmbeds, *, seed: int, width: int, height: int, steps: int,
             guidance: float):
    """One PIL image from prompt embeddings; the pipeline's active LoRA (if any) applies."""
    device = pipe.transformer.device if hasattr(pipe.transformer, "device") else torch.device("cpu")
    dtype = next(p.dtype for p in pipe.transformer.parameters() if p.is_floating_point())
    out = pipe(prompt_embeds=embeds.prompt_embeds.to(device, dtype),
               pooled_prompt_embeds=embeds.pooled.to(device, dtype),
               width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed))
    return out.images[0]


def image_grid(images: list, cols: int | None = None):
    """Tile images left to right, top to bottom (one grid per preview step)."""
    from PIL import Image

    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, img in enumerate(images):
        grid.paste(img, ((k % cols) * w, (k // cols) * h))
    return grid
