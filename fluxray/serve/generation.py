"""The generation deployment: the base FLUX pipeline loaded once per replica, LoRAs per request.

A request names its LoRA as Serve's multiplexed model id (LRU-bounded per replica). Each LoRA
is a named peft adapter of the shared pipeline (`LoraPipeline`), and one lock keeps a render's
adapter state its own. Images come from `fluxray.model.generate`, as the training previews do.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

from ray import serve

from fluxray.config import JobConfig
from fluxray.model.generate import LoraPipeline
from fluxray.serve.loras import lora_path


def adapter_name(lora_id: str) -> str:
    # peft keeps adapters in ModuleDicts, whose keys may not hold the '.' a run name can.
    return "lora_" + hashlib.sha256(lora_id.encode("utf-8")).hexdigest()[:16]


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
