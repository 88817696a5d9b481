"""The portable checkpoint in one process: saved at one ZeRO stage and restored at another, the run goes
on exactly as the uninterrupted one; restored tensors land on the parameters' device and dtype; what
cannot be carried over is said, and a LoRA that does not fit is refused."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fluxray.errors import FluxrayError
from fluxray.model.lora import lora_named_params
from fluxray.train.checkpoint import (LORA_STATE_FILE, STATE_FILE, TrainState, capture_state, checkpoint_step,
                                      latest_checkpoint, read_checkpoint, restore_state, write_checkpoint)
from fluxray.train.engine import LoraEngine, gathered, lr_factor
from fluxray.train.flow import ema_update


@pytest.fixture
def step(synthetic_loss):
    """`step(lora, n)`: optimizer step n + 1 on the synthetic batch, then the EMA's update."""
    def run(lora: LoraEngine, n: int) -> None:
        lora.micro_step(synthetic_loss(lora.engine, n))
        ema_update(lora.ema, lora.params, 0.9)

    return run


def _close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float) -> float:
    worst = max((x.float().cpu() - y.float().cpu()).abs().max().item() for x, y in zip(a, b))
    assert worst <= atol, f"differ by up to {worst:.2e}"
    return worst


@pytest.mark.parametrize("saved, resumed", [(0, 2), (2, 3), (3, 0)])
def test_a_run_resumed_at_another_zero_stage_goes_on_as_the_uninterrupted_one(saved, resumed, make_lora, step,
                                                                                tmp_path):
    run = make_lora(saved)
    for n in range(3):
        step(run, n)
    write_checkpoint(tmp_path, capture_state(run, 3, 1, {"convergence": {"points": [[3, 0.5]]}}))

    back = make_lora(resumed)
    state = read_checkpoint(tmp_path)
    notes = restore_state(back, state, 1)
    assert notes == [f"checkpoint from 1 worker(s) at ZeRO-{saved}; now 1 at ZeRO-{resumed}: LoRA, AdamW state, EMA, "
                     "LR schedule, step restored; the images of later steps are dealt to 1 worker(s)"]
    assert state.step == 3 and state.loop == {"convergence": {"points": [[3, 0.5]]}}
    # The weights the next step starts from, in the module and in DeepSpeed's master copy, are the saved ones.
    _close(back.values(), run.values(), 0)
    with gathered(back.params, resumed):
        module = dict(lora_named_params(back.module))
        _close([module[n] for n in back.names], [state.lora[n] for n in back.names], 0)
    a, b = run.adam_state(), back.adam_state()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        _close(b[key], a[key], 0)
    assert float(b["step"][0]) == 3.0
    assert back.lr() == run.lr() == pytest.approx(1e-2 * lr_factor(3, 10, "cosine", 2))
    _close(back.ema, run.ema, 0)

    # One step later both are one and the same optimizer step away from step 3.
    step(run, 3)
    step(back, 3)
    ulp = 1e-5 if 3 in (saved, resumed) else 1e-7  # ZeRO-3's gathered forward is not bit-identical
    _close(back.values(), run.values(), ulp)
    _close(back.ema, run.ema, ulp)
    assert back.lr() == run.lr()


def test_restored_tensors_land_on_the_parameters_device_and_dtype():
    """The EMA and AdamW's state follow the LoRA parameters (a GPU there, `meta` here: a tensor left on
    the CPU would fail the next EMA update); values are cast to the parameters' dtype (bf16 here)."""
    names = ["transformer.a.lora_A.weight", "transformer.a.lora_B.weight"]
    saved = {"a": torch.randn(4, 8), "b": torch.randn(8, 4)}
    state = TrainState(step=5, lora=dict(zip(names, saved.values())),
                       adam={"exp_avg": dict(zip(names, (torch.ones(4, 8), torch.ones(8, 4)))),
                             "exp_avg_sq": dict(zip(names, (torch.ones(4, 8), torch.ones(8, 4)))),
                             "adam_step": dict(zip(names, (torch.tensor(5.0), torch.tensor(5.0))))},
                       ema=dict(zip(names, (torch.zeros(4, 8), torch.zeros(8, 4)))), lr=1e-3, world_size=1,
                       zero_stage=0)
    for device, dtype in ((torch.device("meta"), torch.float32), (torch.device("cpu"), torch.bfloat16)):
        params = [torch.nn.Parameter(torch.empty(4, 8, device=device, dtype=dtype)),
                  torch.nn.Parameter(torch.empty(8, 4, device=device, dtype=dtype))]
        adamw = torch.optim.AdamW(params, lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(adamw, lambda s: 1.0)
        # Stage 0: DeepSpeed's optimizer is the torch AdamW itself.
        lora = LoraEngine(SimpleNamespace(optimizer=adamw), params, names, 0, schedule, adamw,
                          ema=[torch.zeros(4, 8, device=device), torch.zeros(8, 4, device=device)])
        assert restore_state(lora, state, 1) == []
        assert all(e.device == device and e.dtype == torch.float32 for e in lora.ema)
        for p in params:
            s = adamw.state[p]
            assert s["exp_avg"].device == s["exp_avg_sq"].device == device and s["exp_avg"].dtype == dtype
            assert float(s["step"]) == 5.0
        if device.type == "cpu":
            assert torch.equal(params[0], saved["a"].to(dtype)) and torch.equal(params[1], saved["b"].to(dtype))
            assert torch.equal(adamw.state[params[0]]["exp_avg"], torch.ones(4, 8, dtype=dtype))


def test_an_older_checkpoint_resumes_and_says_what_restarts(make_lora, step, tmp_path):
    """A checkpoint of fluxray before the portable state (LoRA and EMA only, DeepSpeed's own files
    beside them): the LoRA and EMA are restored, the log says AdamW's moments restart."""
    run = make_lora(0)
    step(run, 0)
    tensors = {f"lora/{n}": v.detach().clone() for n, v in zip(run.names, run.values())}
    tensors.update({f"ema/{n}": e.clone() for n, e in zip(run.names, run.ema)})
    save_file(tensors, str(tmp_path / LORA_STATE_FILE))
    (tmp_path / "ds").mkdir()
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 1, "world_size": 2, "zero_stage": 2, "rng": "derived"}))
    assert checkpoint_step(tmp_path) == 1

    back = make_lora(0)
    notes = restore_state(back, read_checkpoint(tmp_path), 1)
    assert notes[0].startswith("checkpoint from 2 worker(s) at ZeRO-2; now 1 at ZeRO-0: LoRA, EMA, LR schedule, step")
    assert notes[1] == "AdamW's moments restart from zero: the checkpoint holds none (written by an older fluxray)"
    _close(back.values(), run.values(), 0)
    _close(back.ema, run.ema, 0)
    assert back.adam_state() is None and back.lr() == pytest.approx(1e-2 * lr_factor(1, 10, "cosine", 2))

    # EMA switched off since the save: said, not silently dropped.
    back.ema = None
    assert "the checkpoint's EMA is dropped: train.ema is off" in restore_state(back, read_checkpoint(tmp_path), 1)


def test_a_lora_that_does_not_fit_the_run_is_refused_naming_the_settings(make_lora, lora_cfg, step, tmp_path):
    run = make_lora(0)
    step(run, 0)
    write_checkpoint(tmp_path, capture_state(run, 1, 1, {}))
    other = make_lora(0, lora_cfg.model_copy(update={"lora": lora_cfg.lora.model_copy(update={"rank": 8})}))
    with pytest.raises(FluxrayError, match=rf"{tmp_path}: this checkpoint's LoRA does not fit the run: shapes differ "
                                           r"\(.* \(4, .*\) vs \(8, .*\)\); lora.rank, lora.targets or model.path"):
        restore_state(other, read_checkpoint(tmp_path), 1)


def test_the_latest_checkpoint_is_the_highest_complete_one(tmp_path):
    def write(folder, step, truncate=False):
        state = TrainState(step=step, lora={"k": torch.ones(3)}, adam=None, ema=None, lr=None, world_size=1,
                           zero_stage=0)
        write_checkpoint(folder, state)
        if truncate:  # a copy cut short: the state file came through, the tensors did not all
            data = (folder / LORA_STATE_FILE).read_bytes()
            (folder / LORA_STATE_FILE).write_bytes(data[:-4])

    local, ray = tmp_path / "runs" / "checkpoints", tmp_path / "ray" / "run"
    write(local / "step000004", 4)
    write(ray / "checkpoint-step000006", 6)
    write(ray / "checkpoint-step000008", 8, truncate=True)
    (ray / "checkpoint-step000010").mkdir()  # being written: no state file yet
    (ray / "checkpoint_manager_snapshot.json").write_text("{}")
    assert checkpoint_step(ray / "checkpoint-step000008") is None
    assert latest_checkpoint([local, ray, tmp_path / "missing"]) == ray / "checkpoint-step000006"
    assert latest_checkpoint([local]) == local / "step000004"
    assert latest_checkpoint([tmp_path / "missing"]) is None
