"""The DeepSpeed decisions as pure functions: the ZeRO stage for FLUX.1-dev's size, the engine
config of each stage, the LR schedule, and the per-rank share count under ZeRO-3."""

from types import SimpleNamespace

import pytest
import torch

from fluxray.config import build_config
from fluxray.train.engine import activation_estimate, choose_zero_stage, deepspeed_config, lr_factor, partition_numel

FLUX_DEV_PARAMS = 11_901_408_320
GB = 10**9


def _flux_dev_activations(tokens: int) -> int:
    # hidden 3072, 19 double + 38 single blocks, batch 1, bf16, no gradient checkpointing
    return activation_estimate(3072, 57, tokens, 1, 2, checkpointing=False)


@pytest.mark.parametrize("tokens", [1024 + 512, 4096 + 512])
def test_auto_picks_replicated_stage_0_for_flux_dev_on_an_80_gb_gpu(tokens):
    stage, reason = choose_zero_stage("auto", base_params=FLUX_DEV_PARAMS, bytes_per_param=2, gpu_memory=80 * GB,
                                      activation_bytes=_flux_dev_activations(tokens))
    assert stage == 0
    assert "stage 0" in reason and "22.2 GiB" in reason  # the bf16 base, 23.8 GB


def test_auto_picks_stage_3_for_flux_dev_on_a_24_gb_gpu():
    stage, reason = choose_zero_stage("auto", base_params=FLUX_DEV_PARAMS, bytes_per_param=2, gpu_memory=24 * GB,
                                      activation_bytes=_flux_dev_activations(1024 + 512))
    assert stage == 3
    assert "stage 3 shards the frozen base" in reason and "22 GiB" in reason


def test_auto_without_a_gpu_is_stage_0_and_a_configured_stage_is_kept():
    assert choose_zero_stage("auto", base_params=FLUX_DEV_PARAMS, bytes_per_param=4, gpu_memory=None,
                             activation_bytes=0)[0] == 0
    for stage in (0, 2, 3):
        got, reason = choose_zero_stage(stage, base_params=FLUX_DEV_PARAMS, bytes_per_param=2, gpu_memory=24 * GB,
                                        activation_bytes=0)
        assert got == stage and f"distributed.zero_stage={stage}" in reason


def test_gradient_checkpointing_shrinks_the_activation_estimate_to_one_layer():
    full = activation_estimate(3072, 57, 4608, 1, 2, checkpointing=False)
    assert activation_estimate(3072, 57, 4608, 1, 2, checkpointing=True) * 57 == full


def _cfg(*overrides):
    return build_config({}, list(overrides))


def test_global_batch_is_micro_batch_times_workers_times_accumulation():
    ds = deepspeed_config(_cfg("train.batch_size=2", "train.grad_accum=3"), world_size=4, stage=0)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 4
    # DeepSpeed's bf16 mode is off: the LoRA trains in fp32 under a bf16 autocast (fluxray.train.precision).
    assert ds["bf16"] == {"enabled": False} and ds["zero_optimization"] == {"stage": 0}


def test_stage_3_keeps_lora_sized_tensors_whole_and_shards_the_rest():
    ds = deepspeed_config(_cfg(), world_size=2, stage=3, lora_numel=196_608)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 196_608
    assert deepspeed_config(_cfg(), 2, 2)["zero_optimization"] == {"stage": 2}


def test_gradient_clipping_follows_max_grad_norm():
    assert deepspeed_config(_cfg("train.max_grad_norm=0.5"), 1, 0)["gradient_clipping"] == 0.5
    assert deepspeed_config(_cfg("train.max_grad_norm=null"), 1, 0)["gradient_clipping"] == 0.0


def test_lr_factor_warmup_then_schedule():
    assert [lr_factor(s, 100, "constant", 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(0, 100, "linear", 0) == 1.0 and lr_factor(100, 100, "linear", 0) == 0.0
    assert lr_factor(50, 100, "linear", 0) == pytest.approx(0.5)
    assert lr_factor(60, 110, "cosine", 10) == pytest.approx(0.5)  # half-way after warm-up
    assert lr_factor(110, 110, "cosine", 10) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(s, 100, "constant_with_warmup", 0) == 1.0 for s in (0, 50, 99))
    with pytest.raises(ValueError, match="lr_scheduler"):
        lr_factor(5, 10, "step", 0)


def test_partition_numel_counts_shards_and_whole_persistent_tensors():
    def param(numel, shard, persist):
        return SimpleNamespace(ds_numel=numel, ds_tensor=SimpleNamespace(numel=lambda: shard), ds_persist=persist)

    module = SimpleNamespace(parameters=lambda: [param(1000, 500, False), param(9, 5, True), param(64, 32, True)])
    assert partition_numel(module) == {"partition": 537, "persistent": 73, "total": 1073}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_logged_grad_norm_is_the_gradients_norm_before_clipping(stage, make_lora, lora_cfg, lora_transformer,
                                                                    synthetic_loss):
    """Without ZeRO DeepSpeed clips but keeps no norm (the loop logged NaN); with ZeRO it reduces one over
    the partitions. Either way `grad_norm` is the 2-norm of the LoRA's gradients that plain autograd gives."""
    clipped = lora_cfg.model_copy(update={"train": lora_cfg.train.model_copy(update={"max_grad_norm": 1e-4})})
    lora = make_lora(stage, clipped)
    lora.micro_step(synthetic_loss(lora.engine, 0))
    tr, params = lora_transformer()  # the same seeded LoRA, no DeepSpeed
    synthetic_loss(tr, 0).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
    assert expected > 1e-3  # well above max_grad_norm: the norm is taken before clipping
    assert lora.grad_norm == pytest.approx(expected, rel=1e-4)


def test_train_compile_compiles_through_the_engine(make_lora, lora_cfg, synthetic_loss):
    """`train.compile` is DeepSpeed's `engine.compile()`, after `deepspeed.initialize`, not a torch.compile
    wrapper that DeepSpeed's hooks never see."""
    lora = make_lora(0, lora_cfg.model_copy(update={"train": lora_cfg.train.model_copy(update={"compile": True})}))
    assert lora.engine.is_compiled
    assert not lora.module.__class__.__name__.startswith("Optimized")  # the module itself is not swapped
