"""The LoRA in kohya's format: `lora_unet_<BFL module>.lora_down/lora_up/alpha`, for ComfyUI and friends.

kohya names the original Black Forest Labs modules, whose q, k and v (and, in the single
blocks, the MLP input) are one fused linear. A fused LoRA is exact: its down is the parts'
A matrices stacked, its up the parts' B matrices block-diagonal, so up @ down gives each
part's B @ A in its own rows. The diffusers file already has alpha/rank baked into B, so
every `.alpha` here equals its module's rank (scale 1).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fluxray.errors import ConfigError

log = logging.getLogger(__name__)

#: diffusers module inside `transformer_blocks.N` -> (kohya module, part of the fused linear).
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None), "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None), "norm1_context.linear": ("txt_mod_lin", None),
}
#: diffusers module inside `single_transformer_blocks.N` -> (kohya module, part).
SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None),
}
#: The diffusers modules of each fused kohya module, in the order of its output rows.
FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
# FLUX's MLP is 4x the hidden size: the out width of an untrained `proj_mlp` part.
_MLP_RATIO = 4

_KEY = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.lora_([AB])\.weight$")
_BLOCK = {"transformer_blocks": ("double_blocks", DOUBLE_BLOCK), "single_transformer_blocks": ("single_blocks", SINGLE_BLOCK)}


def kohya_path(path: str | Path) -> Path:
    """`<name>.safetensors` -> `<name>.kohya.safetensors`, beside it."""
    path = Path(path)
    return path.with_name(f"{path.name.removesuffix('.safetensors')}.kohya.safetensors")


def unmapped_targets(targets: list[str]) -> list[str]:
    """The `lora.targets` suffixes that name no module kohya's format has a name for."""
    known = list(DOUBLE_BLOCK) + list(SINGLE_BLOCK)
    return [t for t in targets if not any(k == t or k.endswith("." + t) for k in known)]


def to_kohya(tensors: dict) -> dict:
    """kohya tensors (fused, with `.alpha`) from diffusers-format LoRA tensors (alpha baked in B)."""
    import torch

    groups: dict[tuple[str, str], dict[int | None, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        kind, table = _BLOCK[m.group(1)] if m else ("", {})
        if not m or m.group(3) not in table:
            raise ConfigError(f"lora.targets: {key} has no kohya name (kohya covers the attention, MLP and "
                              "modulation linears of the double and single blocks); drop that target or set save.kohya: false")
        module, part = table[m.group(3)]
        prefix = f"lora_unet_{kind}_{m.group(2)}_{module}"
        groups.setdefault((prefix, module), {}).setdefault(part, {})[m.group(4)] = value

    out = {}
    for (kname, module), parts in groups.items():
        if None in parts:
            down, up = parts[None]["A"], parts[None]["B"]
        else:
            down, up = _fuse(FUSED[module], parts, torch)
        out[f"{kname}.lora_down.weight"] = down.contiguous()
        out[f"{kname}.lora_up.weight"] = up.contiguous()
        out[f"{kname}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    return out


def _fuse(names: tuple[str, ...], parts: dict, torch):
    """Stacked A's and block-diagonal B's; an untrained part gets zeros of the same rank."""
    some = next(iter(parts.values()))
    rank, width = some["A"].shape
    dtype = some["A"].dtype
    downs, ups = [], []
    for i, module in enumerate(names):
        if i in parts:
            downs.append(parts[i]["A"])
            ups.append(parts[i]["B"])
        else:  # q, k, v are `width` wide; the single blocks' MLP part is 4x that
            out = width * (_MLP_RATIO if module == "proj_mlp" else 1)
            downs.append(torch.zeros(rank, width, dtype=dtype))
            ups.append(torch.zeros(out, rank, dtype=dtype))
    return torch.cat(downs, 0), torch.block_diag(*ups)


def save_kohya(diffusers_file: str | Path, tensors: dict, metadata: dict[str, object]) -> Path | None:
    """Write the kohya copy of a just-saved diffusers LoRA file beside it.

    A LoRA on a module kohya has no name for cannot be written faithfully: that is logged and
    skipped, so a training job never fails over this second format.
    """
    from fluxray.model.lora import save_lora

    try:
        kohya = to_kohya(tensors)
    except ConfigError as e:
        log.warning("no kohya file for %s: %s", diffusers_file, e)
        print(f"warning: no kohya file written: {e}", flush=True)
        return None
    meta = {**metadata, "ss_network_module": "networks.lora_flux", "ss_network_dim": metadata.get("rank"),
            "ss_network_alpha": metadata.get("rank"), "alpha_baked": True}
    return save_lora(kohya_path(diffusers_file), kohya, meta)
