"""Loading the base FLUX pipeline: the tiny embedded model, a local folder or a hub id.

One loading path for all three, `FluxPipeline.from_pretrained`, so the tiny model
exercises exactly the code that loads real FLUX.1-dev.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxray.config import TINY_MODEL, JobConfig
from fluxray.errors import FluxrayError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device() -> torch.device:
    """The accelerator this process should use (Ray sets CUDA_VISIBLE_DEVICES per worker)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU, where bf16 matmuls are slow and imprecise."""
    if name in ("auto", "no"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_model_path(cfg: JobConfig) -> str:
    """The `from_pretrained` argument for `model.path`; `tiny` is built under the storage root once."""
    if cfg.model.path == TINY_MODEL:
        from fluxray.model.tiny import ensure_tiny_model

        return str(ensure_tiny_model(cfg.storage_root / "models" / "tiny-flux"))
    local = Path(cfg.model.path).expanduser()
    if local.exists():
        if not (local / "model_index.json").exists():
            raise FluxrayError(f"model.path: {local} is a folder but not a diffusers FLUX pipeline (no model_index.json)")
        return str(local)
    return cfg.model.path  # a hub id


def load_pipeline(path: str, dtype: torch.dtype = torch.float32, revision: str | None = None,
                  device: torch.device | str = "cpu", text_encoders: bool = True):
    """`FluxPipeline.from_pretrained` with a clear error when the weights are not there.

    `text_encoders=False` skips CLIP and T5 (T5-XXL alone is 9.5 GB) for a job whose
    caption embeddings are cached; `attach_text_encoders` loads them if needed after all.
    """
    from diffusers import FluxPipeline

    skip = {"text_encoder": None, "text_encoder_2": None} if not text_encoders else {}
    try:
        pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype, revision=revision, **skip)
    except (OSError, ValueError, EnvironmentError) as e:
        raise FluxrayError(
            f"model.path: cannot load a FLUX pipeline from {path!r}: {e}. "
            "Use a local diffusers folder, a reachable hub id, or `tiny`.") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def is_guidance_distilled(transformer) -> bool:
    """FLUX.1-dev takes a guidance embedding; schnell does not."""
    return bool(getattr(transformer.config, "guidance_embeds", False))


def attach_text_encoders(pipe, path: str, dtype: torch.dtype, revision: str | None = None,
                         device: torch.device | str = "cpu") -> None:
    """Load CLIP and T5 into a pipeline that was loaded without them."""
    from transformers import CLIPTextModel, T5EncoderModel

    if pipe.text_encoder is None:
        pipe.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype,
                                                          revision=revision).to(device)
    if pipe.text_encoder_2 is None:
        pipe.text_encoder_2 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype,
                                                             revision=revision).to(device)
