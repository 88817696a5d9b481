"""The DeepSpeed decisions as pure functions: the engine config of each stage, the LR schedule, and
the per-rank share count under ZeRO-3 (the stage `auto` picks: tests/advise/test_memory.py)."""

from types import SimpleNamespace

import pytest
import torch

from fluxray.config import build_config
from fluxray.train.engine import deepspeed_config, lr_factor, partition_numel

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


def test_stage_3_keeps_about_one_block_gathered():
    """DeepSpeed's own limits (50 M elements prefetched, 1 G live) are for FLUX.1-dev's 340 M-element blocks;
    a smaller model's are set by its block, or every rank would keep it whole."""
    zero = deepspeed_config(_cfg(), 2, 3, block_numel=340_000_000)["zero_optimization"]
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"],
            zero["stage3_max_reuse_distance"]) == (50_000_000, 340_000_000, 340_000_000)
    zero = deepspeed_config(_cfg(), 2, 3, block_numel=150_000)["zero_optimization"]
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_max_live_parameters"]) == (75_000, 150_000)


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
