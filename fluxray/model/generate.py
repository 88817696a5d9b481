"""The one image-generation function: training previews and the HTTP generate endpoint both call it.

Same embeddings, same seed (a CPU generator, so a seed means the same noise on any
device), same flow-match Euler scheduler: a preview at step N is the image that
`POST /v1/generate` gives for the step-N LoRA. `LoraPipeline` (LoRA files as named adapters
of one pipeline) is shared by the Serve deployment and the preview actor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxray.model.lora import restore_lora_scale, set_lora_scale


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


class LoraPipeline:
    """One pipeline whose LoRA adapters are loaded, chosen and dropped under one lock."""

    def __init__(self, pipe, max_sequence_length: int):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self._lock = threading.Lock()
        self._loaded: set[str] = set()

    @property
    def loaded(self) -> set[str]:
        return set(self._loaded)

    def load(self, name: str, path: Path) -> None:
        with self._lock:
            self._load(name, path)

    def _load(self, name: str, path: Path) -> None:
        if name not in self._loaded:
            # The file has alpha baked in and no `.alpha` tensors, so diffusers sets alpha = rank
            # (scale 1), as the training previews do; `render` then sets the LoRA strength.
            self.pipe.load_lora_weights(str(path), adapter_name=name)
            self._loaded.add(name)

    def unload(self, name: str) -> None:
        with self._lock:
            if name in self._loaded:
                self.pipe.delete_adapters(name)
                self._loaded.discard(name)

    def render(self, prompt: str | PromptEmbeds, *, lora: tuple[str, Path] | None, lora_scale: float, seed: int,
               width: int, height: int, steps: int, guidance: float):
        """One image; `lora` is (adapter name, file), or None for the base model. `prompt` may come
        as its embeddings (the training previews pass their cached ones: no text encoders)."""
        transformer = self.pipe.transformer
        with self._lock:
            embeds = prompt if isinstance(prompt, PromptEmbeds) else encode_prompt(self.pipe, prompt,
                                                                                   self.max_sequence_length)
            if lora is None:
                if self._loaded:
                    transformer.disable_adapters()
                try:
                    return generate(self.pipe, embeds, seed=seed, width=width, height=height, steps=steps,
                                    guidance=guidance)
                finally:
                    if self._loaded:
                        transformer.enable_adapters()
            name, path = lora
            self._load(name, path)  # evicted while this request waited for the lock: load it again
            transformer.set_adapter(name)
            old = set_lora_scale(transformer, lora_scale, adapter=name)
            try:
                return generate(self.pipe, embeds, seed=seed, width=width, height=height, steps=steps,
                                guidance=guidance)
            finally:
                restore_lora_scale(transformer, old, adapter=name)


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
