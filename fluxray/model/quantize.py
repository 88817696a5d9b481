"""A quantized frozen base: the FLUX transformer's block linears stored in int8, fp8 or NF4 as it loads.

int8 and fp8 go through diffusers' `TorchAoConfig` (torchao weight-only: one byte a weight plus a
scale per row); NF4 through bitsandbytes' `Linear4bit` by hand, because diffusers' bitsandbytes path
refuses to run without CUDA and this one is the same on CPU and GPU. Either way no bf16 copy of the
whole transformer is ever on the GPU: each weight is quantized on the device as it arrives. Only the
linears inside the 19 + 38 blocks (attention, MLP, AdaLN modulation: 99.4 % of FLUX.1-dev's
weights) are quantized; the embedders, the final norm and output projection, the norm scales and
the LoRA stay in full precision, so the LoRA file is the same as on a bf16 base.
"""

from __future__ import annotations

import re

import torch

from fluxray.config import QUANTIZED
from fluxray.errors import FluxrayError

#: torchao's float8 kernels need Ada or Hopper (sm_89+); older GPUs should use int8 (same size).
FP8_MIN_CAPABILITY = (8, 9)
#: The modules that are quantized: everything inside the double- and single-stream blocks.
BLOCK_LINEARS = r"(transformer_blocks|single_transformer_blocks)\..*"
#: Weights per NF4 block (one absmax each); bitsandbytes' default, which its kernels are tuned for.
NF4_BLOCKSIZE = 64


def check_device(kind: str, capability: tuple[int, int] | None, device: str = "this GPU") -> None:
    """Refuse a format the device cannot run; `capability` is None on CPU (everything runs there)."""
    if kind == "fp8" and capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        raise FluxrayError(f"model.quantize: fp8 needs a GPU of compute capability {need} or newer (Ada, Hopper); "
                           f"{device} has {capability[0]}.{capability[1]}: use int8 (the same size) or nf4, "
                           f"got model.quantize=fp8")


def load_transformer(path: str, kind: str, dtype: torch.dtype, revision: str | None = None,
                     device: torch.device | str = "cpu"):
    """`FluxTransformer2DModel` of the pipeline at `path`, its block linears quantized to `kind`, on `device`."""
    from diffusers import FluxTransformer2DModel

    if kind not in QUANTIZED:
        raise ValueError(f"unknown quantization {kind!r} (one of {', '.join(QUANTIZED)})")
    device = torch.device(device)
    if device.type == "cuda":
        check_device(kind, torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    if kind == "nf4":
        # bf16 on the host, then each Linear4bit quantizes its weight as `.to(device)` moves it.
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype,
                                                             revision=revision)
        _swap_nf4(transformer, dtype)
        transformer.to(device)
    else:
        from diffusers import TorchAoConfig
        from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
        quantization = TorchAoConfig(FqnToConfig({f"re:{BLOCK_LINEARS}": config}))
        # On a GPU each weight is read straight to it and quantized there; diffusers does not
        # quantize weights it places on the CPU through a device map, so the CPU takes no map.
        device_map = {"": str(device)} if device.type == "cuda" else None
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype,
                                                             revision=revision, quantization_config=quantization,
                                                             device_map=device_map)
    transformer.requires_grad_(False)
    _weights_as_buffers(transformer)
    return transformer


def _swap_nf4(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Each block `nn.Linear` becomes a `Linear4bit` holding the same (not yet quantized) weight."""
    import bitsandbytes as bnb

    pattern = re.compile(BLOCK_LINEARS)
    for name, parent in list(transformer.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or not pattern.fullmatch(full):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         blocksize=NF4_BLOCKSIZE, module=q)
            q.bias = child.bias
            # bitsandbytes repacks a CPU weight in place the first time an eval-mode forward reads it
            # (for its AVX-512 kernel), and the repacked weight no longer fits the training forward
            # or the byte count: a base that trains keeps one format.
            q.support_avx512bf16_for_cpu = False
            setattr(parent, child_name, q)


def _weights_as_buffers(transformer: torch.nn.Module) -> None:
    """Quantized weights become non-persistent buffers.

    DeepSpeed keeps weak references to every parameter and then moves the module with `.to()`,
    which must swap a tensor-subclass parameter (torchao) in place and cannot while those exist;
    a buffer is simply reassigned. Non-persistent, they also stay out of every checkpoint: the
    base is read again from the model, never saved.
    """
    for module in transformer.modules():
        weight = module._parameters.get("weight")
        if weight is not None and is_quantized(weight):
            del module._parameters["weight"]
            module.register_buffer("weight", weight, persistent=False)


def is_quantized(tensor: torch.Tensor) -> bool:
    return quantized_kind(tensor) is not None


def quantized_kind(tensor: torch.Tensor) -> str | None:
    """`int8`, `fp8` or `nf4` for a quantized weight, None for a plain tensor."""
    data_names = getattr(tensor, "tensor_data_names", None)
    if data_names:  # a torchao tensor subclass: its storage dtype says which
        qdata = getattr(tensor, data_names[0])
        return {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}.get(qdata.dtype)
    if getattr(tensor, "quant_type", None) == "nf4" and getattr(tensor, "bnb_quantized", False):
        return "nf4"
    return None


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight really occupies: a quantized one's codes, scales and lookup tables."""
    data_names = getattr(tensor, "tensor_data_names", None)
    if data_names:
        names = list(data_names) + list(getattr(tensor, "optional_tensor_data_names", None) or [])
        return sum(tensor_bytes(t) for t in (getattr(tensor, n, None) for n in names) if t is not None)
    state = getattr(tensor, "quant_state", None)
    own = tensor.numel() * tensor.element_size()
    return own + (_quant_state_bytes(state) if state is not None else 0)


def _quant_state_bytes(state) -> int:
    parts = [state.absmax, state.code, state.offset]
    total = sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    return total + (_quant_state_bytes(state.state2) if getattr(state, "state2", None) is not None else 0)


def module_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of the module's parameters and buffers, by storage kind (`int8`, `fp8`, `nf4`, `plain`)."""
    out: dict[str, int] = {}
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    for t in tensors.values():
        kind = quantized_kind(t) or "plain"
        out[kind] = out.get(kind, 0) + tensor_bytes(t)
    return out


def quantize_text_encoder(encoder: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """T5's linears in int8 (torchao weight-only), each quantized on `device` as it moves there."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(encoder, Int8WeightOnlyConfig(), device=device)
    return encoder.to(device)
