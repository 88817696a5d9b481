"""The precision design: `model.dtype` and `train.mixed_precision` resolve to what they say, the LoRA
is always fp32, and fp16 (which FLUX overflows) is refused with the reason."""

import pytest
import torch

from fluxray.config import build_config
from fluxray.errors import ConfigError
from fluxray.train.precision import resolve_precision

CPU = torch.device("cpu")


def _resolve(*overrides):
    return resolve_precision(build_config({}, list(overrides)), CPU)


def test_cpu_defaults_to_fp32_and_bf16_means_a_bf16_base_under_bf16_autocast():
    p = _resolve()
    assert (p.base, p.compute, p.trainable) == (torch.float32, None, torch.float32)
    assert "forward in fp32" in p.describe()
    # `model.dtype: bf16` alone: the base in bf16, computed in bf16; the LoRA stays fp32.
    p = _resolve("model.dtype=bf16")
    assert (p.base, p.compute, p.trainable) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert p.describe() == "base weights bf16, LoRA + AdamW state + EMA fp32, forward in bf16 autocast"
    # bf16 compute over an fp32 base (more memory, same math as the GPU default).
    p = _resolve("train.mixed_precision=bf16")
    assert (p.base, p.compute) == (torch.float32, torch.bfloat16)
    assert _resolve("model.dtype=fp32", "train.mixed_precision=no").compute is None


def test_gpu_auto_is_a_bf16_base_under_bf16_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = resolve_precision(build_config({}, []), torch.device("cuda", 0))
    assert (p.base, p.compute, p.trainable) == (torch.bfloat16, torch.bfloat16, torch.float32)
    # `mixed_precision: no` on a GPU is fp32 throughout, the base included.
    p = resolve_precision(build_config({}, ["train.mixed_precision=no"]), torch.device("cuda", 0))
    assert (p.base, p.compute) == (torch.float32, None)
    # A GPU without bf16 (V100, T4) trains in fp32 rather than in an emulated bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    p = resolve_precision(build_config({}, []), torch.device("cuda", 0))
    assert (p.base, p.compute) == (torch.float32, None)


@pytest.mark.parametrize("key", ["model.dtype", "train.mixed_precision"])
def test_fp16_is_refused_with_the_reason(key):
    with pytest.raises(ConfigError, match=rf"{key}: fp16 is not offered: FLUX's activations overflow it.*got 'fp16'"):
        build_config({}, [f"{key}=fp16"])


def test_a_bf16_base_without_mixed_precision_is_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"model.dtype=bf16 .* train.mixed_precision=no"):
        build_config({}, ["model.dtype=bf16", "train.mixed_precision=no"])
