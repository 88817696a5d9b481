"""The LoRA: injected with peft, exported in the diffusers/PEFT key format, saved with metadata.

The file on disk is what every FLUX tool reads: `transformer.<module>.lora_A.weight` /
`lora_B.weight`, alpha baked into B (ComfyUI applies scale 1 when no `.alpha` is present),
no `base_model.model.` prefix, and the trigger word and training facts in the header.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxray.config import LoraConfig as LoraSection

ADAPTER = "default"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def target_regex(targets: list[str]) -> str:
    """peft full-match regex for module-name suffixes, inside the blocks only.

    Requiring a `.` before the suffix keeps top-level layers (the output `proj_out`,
    `x_embedder`) out, as ai-toolkit and diffusers' FLUX trainer do.
    """
    return r".*\.(?:" + "|".join(re.escape(t) for t in targets) + r")$"


def add_lora(transformer: torch.nn.Module, lora: LoraSection, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze the base and inject a trainable LoRA; returns the LoRA parameters in a fixed order."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    # Seed the init so every rank (and a resumed run) starts from the same A matrices.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
            lora_dropout=lora.dropout, init_lora_weights="gaussian",
            target_modules=target_regex(lora.targets)), adapter_name=ADAPTER)
    params = [p for _, p in lora_named_params(transformer).items()]
    if not params:
        raise ValueError(f"lora.targets {lora.targets} matched no module of the transformer")
    for p in params:
        p.requires_grad_(True)
    return params


def lora_named_params(transformer: torch.nn.Module, adapter: str = ADAPTER) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters keyed by their file key: `transformer.<module>.lora_A.weight`."""
    out = {}
    tag = f".{adapter}."
    for name, p in transformer.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and tag in name:
            out["transformer." + name.replace(tag, ".")] = p
    return out


def export_state_dict(values: dict[str, torch.Tensor], scale: float, dtype: str = "bf16") -> dict[str, torch.Tensor]:
    """File tensors from LoRA values: alpha/rank baked into B, cast, contiguous, on CPU."""
    out = {}
    for k, v in values.items():
        t = v.detach().float().cpu()
        if ".lora_B." in k and scale != 1.0:
            t = t * scale
        out[k] = t.to(_DTYPES[dtype]).contiguous()
    return out


def save_lora(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write the safetensors file atomically; metadata values become strings in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if v is not None}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def lora_metadata(*, trigger_word: str, base_model: str, rank: int, alpha: float, steps: int,
                  resolution: list[int], name: str, extra: dict | None = None) -> dict[str, object]:
    """Header fields other tools show: trigger word, base model, rank, alpha, steps, resolution.

    `alpha` is recorded as trained, but the weights are baked, so loaders use scale 1.
    """
    from fluxray import __version__

    meta = {
        "format": "pt", "fluxray.version": __version__, "ss_network_module": "networks.lora",
        "name": name, "trigger_word": trigger_word, "ss_tag_frequency": None,
        "base_model": base_model, "ss_base_model_version": "flux1",
        "rank": rank, "alpha": alpha, "alpha_baked": True, "steps": steps,
        "resolution": resolution,
    }
    meta.update(extra or {})
    return meta


def set_lora_scale(transformer: torch.nn.Module, scale: float, adapter: str = ADAPTER) -> dict:
    """Set the multiplier of `adapter` on every LoRA layer; returns the old values to restore."""
    from peft.tuners.lora import LoraLayer

    old = {}
    for name, m in transformer.named_modules():
        if isinstance(m, LoraLayer) and adapter in m.scaling:
            old[name] = m.scaling[adapter]
            m.scaling[adapter] = scale
    return old


def restore_lora_scale(transformer: torch.nn.Module, old: dict, adapter: str = ADAPTER) -> None:
    mods = dict(transformer.named_modules())
    for name, s in old.items():
        mods[name].scaling[adapter] = s
