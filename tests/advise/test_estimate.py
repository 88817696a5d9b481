"""Time estimates: the FLOP arithmetic against FLUX.1-dev's 44.6 / 163.6 TFLOP, the parameter
count against diffusers' own model, the time and GPU-hours arithmetic, and the running ETA."""

import math
from pathlib import Path

import pytest
import torch

from fluxray.advise.estimate import eta, estimate, flop_budget, forward_flops, model_dims, sample_events
from fluxray.advise.memory import transformer_params
from fluxray.config import load_config
from fluxray.errors import ConfigError
from fluxray.track.flops import FLUX1_DEV

REPO = Path(__file__).resolve().parent.parent.parent
H100 = 989e12


def dev(*overrides):
    """The guide's FLUX.1-dev config, previews and validation off unless asked for."""
    return load_config(REPO / "configs" / "flux-dev.yaml",
                       ["dataset.path=null", "sample.every=0", "validation.every=1000000", *overrides])


@pytest.mark.parametrize("res, step, forward", [(512, 44.6, 21.5), (1024, 163.6, 74.4)])
def test_step_flops_match_flux_dev_at_batch_1(res, step, forward):
    e = estimate(dev(f"dataset.resolutions=[{res}]", "train.gradient_checkpointing=off"))
    assert e.dims_source.startswith("FLUX.1-dev")
    assert round(e.step_tflop, 1) == step
    assert round(forward_flops(FLUX1_DEV, res, res, 512) / 1e12, 1) == forward
    # Gradient checkpointing recomputes one forward: the time grows by exactly that.
    on = estimate(dev(f"dataset.resolutions=[{res}]", "train.gradient_checkpointing=on"))
    assert on.train_seconds / e.train_seconds == pytest.approx((step + forward) / step, rel=2e-3)


def test_parameter_count_is_diffusers_own():
    from diffusers import FluxTransformer2DModel

    assert transformer_params(FLUX1_DEV) == 11_901_408_320  # the notes' count for FLUX.1-dev
    with torch.device("meta"):
        m = FluxTransformer2DModel(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=3,
                                   in_channels=32, joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=False)
    assert transformer_params(dict(m.config)) == sum(p.numel() for p in m.parameters())


def test_time_and_gpu_hours_follow_from_flops_mfu_and_workers():
    cfg = dev("dataset.resolutions=[1024]", "train.gradient_checkpointing=off", "train.steps=1000")
    e = estimate(cfg, gpu="H100", mfu=0.4)
    assert e.train_seconds == pytest.approx(1000 * 163.6e12 / (H100 * 0.4), rel=1e-3)
    assert e.gpu_hours == pytest.approx(e.total_seconds / 3600)
    # Two workers: the same steps in the same time (data parallel; validation is split), on two GPUs.
    two = estimate(cfg, gpu="H100", mfu=0.4, workers=2)
    assert two.train_seconds == pytest.approx(e.train_seconds) and two.validation_seconds < e.validation_seconds
    assert two.gpu_hours == pytest.approx(2 * two.total_seconds / 3600)
    assert estimate(cfg, gpu="NVIDIA H200", mfu=0.2).train_seconds == pytest.approx(2 * e.train_seconds)
    assert "GPU-hours" in e.format() and "163.6 TFLOP" in e.format()
    with pytest.raises(ConfigError, match="unknown GPU 'Z80'"):
        estimate(cfg, gpu="Z80")
    with pytest.raises(ConfigError, match="mfu"):
        estimate(cfg, mfu=1.5)


def test_auto_checkpointing_follows_gpu_memory():
    cfg = dev("dataset.resolutions=[1024]")
    assert not estimate(cfg, gpu="H100").checkpointing  # 23.8 GB base + activations fit in 80 GB
    assert estimate(cfg, gpu="L40S").checkpointing  # not in 48 GB
    assert estimate(cfg, gpu="A100", gpu_memory_gib=40).checkpointing


def test_previews_and_validation_are_forward_passes():
    cfg = dev("dataset.resolutions=[512]", "train.steps=1000", "sample.every=250", "sample.width=1024",
              "sample.height=1024", "sample.steps=20", "validation.every=250")
    b = flop_budget(cfg)
    assert sample_events(cfg) == 5  # steps 0, 250, 500, 750, 1000
    assert b.sampling == pytest.approx(5 * 3 * 20 * forward_flops(FLUX1_DEV, 1024, 1024, 512))
    assert b.validation == pytest.approx(5 * 4 * 5 * forward_flops(FLUX1_DEV, 512, 512, 512))
    # Prompts are spread across ranks: three prompts on three workers take one prompt's time.
    assert flop_budget(cfg, workers=3).sampling == pytest.approx(b.sampling / 3)
    assert sample_events(cfg, 1001) == 6  # the last step always previews


def test_dims_come_from_a_local_model(tiny_config):
    cfg = tiny_config()
    dims, source = model_dims(cfg)
    assert source.endswith("transformer/config.json") and dims["num_layers"] == 1
    e = estimate(cfg, workers=1)
    assert e.step_tflop < 1e-3  # a toy: nothing like FLUX.1-dev's 44.6


def _records(step_times, start=0):
    return [{"step": start + i + 1, "time": 100.0 + i, "loss": 0.5, "step_time": t} for i, t in enumerate(step_times)]


def test_eta_uses_the_median_recent_step_time_and_projects_sampling():
    recs = _records([9.0] + [1.0] * 29)  # a slow first (compile) step does not count
    recs.insert(5, {"step": 5, "time": 104.5, "val_loss": 0.3})
    e = eta(recs, 100, status={"step": 30, "sample_seconds": 8.0}, sample_every=10)
    assert e.step == 30 and e.sec_per_step == 1.0
    assert e.train_seconds_left == 70.0
    # 4 preview rounds so far (steps 0, 10, 20, 30) took 8 s; 7 to go (40 ... 100).
    assert e.sample_seconds == 8.0 and e.sample_seconds_left == pytest.approx(14.0)
    assert e.seconds_left == pytest.approx(84.0)


def test_eta_after_resume_counts_this_process_only_and_falls_back_to_a_prior():
    e = eta(_records([2.0] * 10, start=50), 100, status={"sample_seconds": 3.0}, sample_every=20, start_step=50)
    assert e.step == 60 and e.train_seconds_left == 80.0
    assert e.sample_seconds_left == pytest.approx(3.0 * 2)  # 1 round (step 60) took 3 s; 2 to go (80, 100)
    assert eta([], 100, prior_sec_per_step=1.5).seconds_left == 150.0
    assert eta([], 100).seconds_left is None
    done = eta(_records([1.0] * 100), 100, status={"sample_seconds": 5.0}, sample_every=50)
    assert done.seconds_left == 0.0 and done.sample_seconds_left == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, the estimate is for this machine's")
def test_without_a_named_gpu_the_estimate_says_which_gpu_it_is_for(tiny_config):
    e = estimate(dev(), gpu=None)  # no GPU here: the reference GPU, and the estimate says so
    assert e.gpu == "H100" and e.note == "no GPU on this machine: the figure is for H100 GPUs; --gpu names another"
    assert e.format().splitlines()[1] == f"  ({e.note})"
    cpu = estimate(tiny_config(), gpu=None)  # tiny.yaml trains on CPU
    assert cpu.note.startswith("this config trains on CPU (distributed.gpus_per_worker: 0): the figure is for H100")
    assert estimate(tiny_config(), gpu="A100").note == ""  # named: the user knows what it is for


def test_a_bad_model_path_fails_the_estimate_with_the_config_key():
    with pytest.raises(ConfigError, match=r"^model.path: '/data/no-such-model' does not exist"):
        estimate(dev("model.path=/data/no-such-model"))
