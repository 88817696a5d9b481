"""Loading the base FLUX pipeline: the shipped demo model (`tiny`), a local folder or a hub id.

One loading path for all three, `FluxPipeline.from_pretrained`, so the demo model
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
    """The `from_pretrained` argument for `model.path`; `tiny` is the demo model shipped with fluxray."""
    if cfg.model.path == TINY_MODEL:
        from fluxray.model.demo import demo_model_dir

        path = demo_model_dir()
        if not (path / "model_index.json").exists():
            raise FluxrayError(f"model.path: tiny: the demo model is missing from {path}; reinstall fluxray, or "
                               "rebuild it with `fluxray make-demo-model`")
        return str(path)
    local = Path(cfg.model.path).expanduser()
    if local.exists():
        if not (local / "model_index.json").exists():
            raise FluxrayError(f"model.path: {local} is a folder but not a diffusers FLUX pipeline (no model_index.json)")
        return str(local)
    return cfg.model.path  # a hub id


def load_pipeline(path: str, dtype: torch.dtype = torch.float32, revision: str | None = None,
                  device: torch.device | str = "cpu", text_encoders: bool = True, quantize: str = "none",
                  transformer=None):
    """`FluxPipeline.from_pretrained` with a clear error when the weights are not there.

    `text_encoders=False` skips CLIP and T5 (T5-XXL alone is 9.5 GB) for a job whose
    caption embeddings are cached; `attach_text_encoders` loads them if needed after all.
    `quantize` (`int8`, `fp8`, `nf4`) loads the transformer through `fluxray.model.quantize`,
    quantized weight by weight on `device`, never whole in bf16 there. A `transformer` given (one
    built partitioned for ZeRO-3) is used as it is.
    """
    from diffusers import FluxPipeline

    parts = {"text_encoder": None, "text_encoder_2": None} if not text_encoders else {}
    try:
        if transformer is not None:
            parts["transformer"] = transformer
        elif quantize != "none":
            from fluxray.model.quantize import load_transformer

            parts["transformer"] = load_transformer(path, quantize, dtype, revision, device)
        pipe = FluxPipeline.from_pretrained(path, torch_dtype=dtype, revision=revision, **parts)
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
                         device: torch.device | str = "cpu", quantize_t5: bool = False) -> None:
    """Load CLIP and T5 into a pipeline that was loaded without them; `quantize_t5` stores T5 in int8."""
    from transformers import CLIPTextModel, T5EncoderModel

    if pipe.text_encoder is None:
        pipe.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype,
                                                          revision=revision).to(device)
    if pipe.text_encoder_2 is None:
        t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype, revision=revision)
        if quantize_t5:
            from fluxray.model.quantize import quantize_text_encoder

            t5 = quantize_text_encoder(t5, device)
        pipe.text_encoder_2 = t5.to(device)
