"""The generation deployment: the base FLUX pipeline loaded once per replica, LoRAs per request.

A request names its LoRA as Serve's multiplexed model id (LRU-bounded per replica). Each LoRA
is a named peft adapter of the shared pipeline, and one lock keeps a render's adapter state its
own. Images come from `fluxray.model.generate`, as the training previews do.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
from pathlib import Path

from ray import serve

from fluxray.config import JobConfig
from fluxray.model.generate import encode_prompt, generate
from fluxray.model.lora import restore_lora_scale, set_lora_scale
from fluxray.serve.loras import lora_path


def adapter_name(lora_id: str) -> str:
    # peft keeps adapters in ModuleDicts, whose keys may not hold the '.' a run name can.
    return "lora_" + hashlib.sha256(lora_id.encode("utf-8")).hexdigest()[:16]


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

    def render(self, prompt: str, *, lora: tuple[str, Path] | None, lora_scale: float, seed: int,
               width: int, height: int, steps: int, guidance: float):
        """One image; `lora` is (adapter name, file), or None for the base model."""
        transformer = self.pipe.transformer
        with self._lock:
            embeds = encode_prompt(self.pipe, prompt, self.max_sequence_length)
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


class _Adapter:
    """What Serve's multiplexer caches per LoRA id; it calls `__del__` when the LRU evicts it."""

    def __init__(self, pipeline: LoraPipeline, name: str, path: Path):
        self.pipeline, self.name, self.path = pipeline, name, path
        self.evicted = False

    def __del__(self):
        # Serve calls this on eviction and Python again at garbage collection: unload once.
        if not self.evicted:
            self.evicted = True
            self.pipeline.unload(self.name)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=2, max_queued_requests=8)
class Generator:
    """Renders PNGs for the API: `render.remote(params)` with the LoRA as multiplexed model id."""

    def __init__(self, job_config: dict, max_loras: int = 4):
        from fluxray.model.pipeline import load_pipeline, resolve_device, resolve_dtype, resolve_model_path

        cfg = JobConfig.model_validate(job_config)
        device = resolve_device()
        pipe = load_pipeline(resolve_model_path(cfg), resolve_dtype(cfg.model.dtype, device), cfg.model.revision,
                             device)
        self.pipeline = LoraPipeline(pipe, cfg.model.max_sequence_length)
        self.root = cfg.storage_root

        async def open_lora(lora_id: str) -> _Adapter:
            path, name = lora_path(self.root, lora_id), adapter_name(lora_id)
            await asyncio.to_thread(self.pipeline.load, name, path)
            return _Adapter(self.pipeline, name, path)

        # Built here rather than as a decorated method so the LRU bound comes from the config.
        self._get_lora = serve.multiplexed(max_num_models_per_replica=max_loras)(open_lora)

    async def render(self, params: dict) -> bytes:
        """PNG bytes for `params` (prompt, seed, width, height, steps, guidance, lora_scale)."""
        lora_id = serve.get_multiplexed_model_id()
        adapter = await self._get_lora(lora_id) if lora_id else None
        lora = (adapter.name, adapter.path) if adapter else None
        image = await asyncio.to_thread(self.pipeline.render, lora=lora, **params)
        if adapter is not None and adapter.evicted:
            # Re-loaded for this request after the LRU let it go: drop it again to keep the bound.
            await asyncio.to_thread(self.pipeline.unload, adapter.name)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
