"""Latent and text-embedding caches under the storage root, keyed by content, model and size.

Each image is VAE-encoded once per bucket and each caption (and preview prompt) once
through CLIP and T5. Workers split the missing entries between them, and later jobs on
the same data reuse every file, so the training step never needs the encoders.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fluxray.data.buckets import Item
from fluxray.model.generate import PromptEmbeds, encode_prompt

log = logging.getLogger(__name__)


def sha(data: bytes | str, n: int = 20) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:n]


#: The parts of a pipeline the caches are made with: the VAE (latents), the text encoders and tokenizers.
CACHE_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
#: Files up to this size are hashed whole; larger ones (T5-XXL is 9.5 GB) by size and their first and last MiB.
_WHOLE_FILE_BYTES = 64 << 20


def model_key(model_path: str, revision: str | None) -> str:
    """Caches depend on the VAE, the text encoders and their tokenizers: a local model is keyed by the
    content of those files, so a model rebuilt or replaced in the same folder never reuses an older
    model's cache; a hub id by the id and revision."""
    p = Path(model_path)
    if not p.is_dir():
        return sha(f"{model_path}@{revision or 'main'}", 12)
    h = hashlib.sha256()
    for part in CACHE_PARTS:
        for f in sorted((p / part).rglob("*")) if (p / part).is_dir() else []:
            if f.is_file():
                h.update(f"{f.relative_to(p).as_posix()}\0{f.stat().st_size}\0".encode())
                h.update(_content_digest(f))
    return h.hexdigest()[:12]


def _content_digest(path: Path) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            return hashlib.sha256(f.read()).digest()
        head = f.read(1 << 20)
        f.seek(size - (1 << 20))
        return hashlib.sha256(head + f.read()).digest()


@dataclass
class CacheStats:
    latents_computed: int = 0
    latents_reused: int = 0
    texts_computed: int = 0
    texts_reused: int = 0


@dataclass
class Caches:
    """What the training loop reads instead of images and captions."""

    latents: Mapping[Item, tuple[torch.Tensor, torch.Tensor]]   # (mean, logvar), (C, h, w)
    texts: Mapping[str, PromptEmbeds]
    stats: CacheStats = field(default_factory=CacheStats)


def pixels_for_bucket(image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover the bucket, centre-crop, scale to [-1, 1]: (3, h, w)."""
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    img = image.resize((rw, rh), Image.Resampling.LANCZOS)
    left, top = (rw - w) // 2, (rh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class CacheStore:
    """File layout: `<root>/cache/<model_key>/latents/<image sha>-<w>x<h>.safetensors` and
    `<root>/cache/<model_key>/text-<max_len>/<text sha>.safetensors`."""

    def __init__(self, root: Path, mkey: str, max_sequence_length: int):
        self.dir = Path(root) / "cache" / mkey
        self.max_len = max_sequence_length

    def latent_path(self, image_sha: str, size: tuple[int, int]) -> Path:
        return self.dir / "latents" / f"{image_sha}-{size[0]}x{size[1]}.safetensors"

    def text_path(self, text: str) -> Path:
        return self.dir / f"text-{self.max_len}" / f"{sha(text)}.safetensors"


class OnTheFlyLatents(Mapping):
    """`dataset.cache_latents: false`: VAE-encode the image every time a step asks (the slow path)."""

    def __init__(self, pipe, images: list[Path], items: list[Item]):
        self.pipe, self.images, self.items = pipe, images, items

    def __getitem__(self, item: Item):
        from fluxray.data.images import load_image

        vae = self.pipe.vae
        px = pixels_for_bucket(load_image(self.images[item.index]), item.size)
        with torch.no_grad():
            dist = vae.encode(px[None].to(vae.device, vae.dtype)).latent_dist
        return dist.mean[0].float().cpu(), dist.logvar[0].float().cpu()

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class OnTheFlyTexts(Mapping):
    """`dataset.cache_text_embeddings: false`: run CLIP and T5 every time a step asks."""

    def __init__(self, pipe, texts: list[str], max_len: int):
        self.pipe, self.texts, self.max_len = pipe, list(dict.fromkeys(texts)), max_len

    def __getitem__(self, text: str) -> PromptEmbeds:
        e = encode_prompt(self.pipe, text, self.max_len)
        return PromptEmbeds(e.prompt_embeds.float().cpu(), e.pooled.float().cpu())

    def __iter__(self):
        return iter(self.texts)

    def __len__(self):
        return len(self.texts)


def build_caches(pipe, *, store: CacheStore, images: list[Path], items: list[Item], texts: list[str],
                 load_text_encoders, rank: int = 0, world_size: int = 1, barrier=lambda: None,
                 cache_latents: bool = True, cache_texts: bool = True) -> Caches:
    """Fill the missing cache entries (each rank its share), then load all of them.

    `load_text_encoders()` attaches CLIP and T5 to `pipe`; it is called only when some text
    is missing, so a fully cached dataset never loads T5 at all.
    """
    from fluxray.data.images import load_image

    image_shas = [sha(p.read_bytes()) for p in images]
    stats = CacheStats()
    uniq_texts = list(dict.fromkeys(texts))
    if not cache_texts:
        load_text_encoders()
    missing_lat = [it for it in items if not store.latent_path(image_shas[it.index], it.size).exists()] \
        if cache_latents else []
    missing_txt = [t for t in uniq_texts if not store.text_path(t).exists()] if cache_texts else []
    mine_lat = missing_lat[rank::world_size]
    mine_txt = missing_txt[rank::world_size]
    barrier()  # every rank lists what is missing before any rank writes, so the shares line up

    if mine_lat:
        vae = pipe.vae
        dev, dt = vae.device, vae.dtype
        for it in mine_lat:
            px = pixels_for_bucket(load_image(images[it.index]), it.size)
            with torch.no_grad():
                dist = vae.encode(px[None].to(dev, dt)).latent_dist
            _atomic_save({"mean": dist.mean[0].float(), "logvar": dist.logvar[0].float()},
                         store.latent_path(image_shas[it.index], it.size))
    if mine_txt:
        load_text_encoders()
        for t in mine_txt:
            e = encode_prompt(pipe, t, store.max_len)
            _atomic_save({"prompt_embeds": e.prompt_embeds[0].float(), "pooled": e.pooled[0].float()},
                         store.text_path(t))
    barrier()  # every rank's share is on disk before anyone reads

    stats.latents_computed, stats.latents_reused = len(missing_lat), len(items) - len(missing_lat)
    stats.texts_computed, stats.texts_reused = len(missing_txt), len(uniq_texts) - len(missing_txt)
    latents: Mapping = OnTheFlyLatents(pipe, images, items) if not cache_latents else {}
    for it in items if cache_latents else []:
        d = load_file(str(store.latent_path(image_shas[it.index], it.size)))
        latents[it] = (d["mean"], d["logvar"])
    text: Mapping = OnTheFlyTexts(pipe, uniq_texts, store.max_len) if not cache_texts else {}
    for t in uniq_texts if cache_texts else []:
        d = load_file(str(store.text_path(t)))
        text[t] = PromptEmbeds(d["prompt_embeds"][None], d["pooled"][None])
    return Caches(latents, text, stats)
