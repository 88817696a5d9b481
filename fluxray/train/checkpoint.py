"""The training checkpoint: everything a resumed run needs, on any world size and ZeRO stage.

A checkpoint is a folder that rank 0 writes, with two files:
- `fluxray_lora.safetensors`: for each LoRA tensor (by its LoRA-file key) the fp32 value AdamW
  updates (`lora/<key>`), AdamW's moments and update count (`exp_avg/`, `exp_avg_sq/`,
  `adam_step/<key>`) and the EMA (`ema/<key>`, when on). Gathered whole: a LoRA's state is small,
  and whole tensors fit any number of workers and any ZeRO stage.
- `fluxray_state.json`, written last, so that its presence marks a complete checkpoint: the step,
  the LR of the next step, the world size and ZeRO stage that wrote it, the size of the tensor
  file, and the loop's own state (the validation curve).

DeepSpeed's own per-rank checkpoint is not written: it fits only the world size and stage that
wrote it, and everything in it that a LoRA needs is here.
"""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxray.errors import FluxrayError
from fluxray.train.engine import LoraEngine

STATE_FILE = "fluxray_state.json"
LORA_STATE_FILE = "fluxray_lora.safetensors"
_ADAM = ("exp_avg", "exp_avg_sq", "adam_step")


@dataclass
class TrainState:
    """A checkpoint's content, on the CPU, keyed by the LoRA file's tensor keys."""

    step: int
    lora: dict[str, torch.Tensor]
    #: "exp_avg", "exp_avg_sq", "adam_step" -> key -> tensor; None when the checkpoint holds none.
    adam: dict[str, dict[str, torch.Tensor]] | None
    ema: dict[str, torch.Tensor] | None
    #: The LR of the step after `step` (None in checkpoints of older fluxray versions).
    lr: float | None
    world_size: int
    zero_stage: int
    #: The loop's own state (`convergence`: the validation curve).
    loop: dict = field(default_factory=dict)
    path: Path | None = None


def capture_state(lora: LoraEngine, step: int, world_size: int, loop: dict) -> TrainState:
    """The LoRA's whole training state after `step`, on every rank. All ranks call it (ZeRO gathers)."""
    def copies(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # Copies, never views of the live tensors that the next step changes.
        return {n: t.detach().to("cpu", torch.float32, copy=True).contiguous() for n, t in zip(lora.names, tensors)}

    adam = lora.adam_state()
    return TrainState(
        step=step, lora=copies(lora.values()),
        adam=None if adam is None else {key: copies(adam[src])
                                        for key, src in zip(_ADAM, ("exp_avg", "exp_avg_sq", "step"))},
        ema=None if lora.ema is None else copies(lora.ema),
        lr=lora.lr(), world_size=world_size, zero_stage=lora.stage, loop=loop)


def write_checkpoint(path: Path, state: TrainState) -> None:
    """Write `state` as the checkpoint folder `path` (rank 0)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora/{n}": t for n, t in state.lora.items()}
    for key, by_name in (state.adam or {}).items():
        tensors.update({f"{key}/{n}": t for n, t in by_name.items()})
    tensors.update({f"ema/{n}": t for n, t in (state.ema or {}).items()})
    save_file(tensors, str(path / LORA_STATE_FILE))
    # Written last: its presence marks a complete checkpoint.
    size = (path / LORA_STATE_FILE).stat().st_size
    (path / STATE_FILE).write_text(json.dumps({
        "step": state.step, "lr": state.lr, "world_size": state.world_size, "zero_stage": state.zero_stage,
        "rng": "derived from (train.seed, rank, step)", "files": {LORA_STATE_FILE: size}, **state.loop}))


def read_checkpoint(path: Path) -> TrainState:
    """A checkpoint folder as written by `write_checkpoint` (or by an older fluxray: LoRA and EMA only)."""
    from safetensors.torch import load_file

    meta = json.loads((path / STATE_FILE).read_text())
    tensors = load_file(str(path / LORA_STATE_FILE))
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        prefix, _, name = key.partition("/")
        by_prefix.setdefault(prefix, {})[name] = t
    adam = {k: by_prefix[k] for k in _ADAM} if all(k in by_prefix for k in _ADAM) else None
    loop = {k: v for k, v in meta.items() if k not in ("step", "lr", "world_size", "zero_stage", "rng", "files")}
    return TrainState(step=int(meta["step"]), lora=by_prefix.get("lora", {}), adam=adam, ema=by_prefix.get("ema"),
                      lr=meta.get("lr"), world_size=int(meta["world_size"]), zero_stage=int(meta["zero_stage"]),
                      loop=loop, path=path)


def restore_state(lora: LoraEngine, state: TrainState, world_size: int) -> list[str]:
    """Put `state` into this run: the LoRA (module and master copy), AdamW's state, the LR schedule's
    position and the EMA, each on the parameters' device. All ranks call it. Returns what to log:
    the topology change, and anything that could not be carried over (never the LoRA itself)."""
    _check_fits(lora, state)
    lora.load_values([state.lora[n] for n in lora.names])
    notes = []
    if state.adam is not None:
        lora.load_adam_state({"exp_avg": [state.adam["exp_avg"][n] for n in lora.names],
                              "exp_avg_sq": [state.adam["exp_avg_sq"][n] for n in lora.names],
                              "step": [state.adam["adam_step"][n] for n in lora.names]})
    else:
        notes.append("AdamW's moments restart from zero: the checkpoint holds none (written by an older fluxray)")
    lora.set_schedule_step(state.step)
    if state.lr is not None and not torch.isclose(torch.tensor(lora.lr()), torch.tensor(state.lr), rtol=1e-6):
        notes.append(f"the LR of step {state.step + 1} is {lora.lr():.6g}, not the checkpoint's {state.lr:.6g}: "
                     "train.lr or its schedule changed")
    if lora.ema is not None:
        if state.ema is not None:
            lora.ema = [state.ema[n].to(p.device, torch.float32, copy=True) for n, p in zip(lora.names, lora.params)]
        else:
            lora.ema = [v.detach().float().clone() for v in lora.values()]
            notes.append("the EMA restarts from the restored LoRA: the checkpoint holds none (train.ema was off)")
    elif state.ema is not None:
        notes.append("the checkpoint's EMA is dropped: train.ema is off")
    carried = ["LoRA", *(["AdamW state"] if state.adam is not None else []),
               *(["EMA"] if lora.ema is not None and state.ema is not None else []), "LR schedule", "step"]
    if (state.world_size, state.zero_stage) != (world_size, lora.stage):
        notes.insert(0, f"checkpoint from {state.world_size} worker(s) at ZeRO-{state.zero_stage}; now {world_size} "
                        f"at ZeRO-{lora.stage}: {', '.join(carried)} restored; the images of later steps are "
                        f"dealt to {world_size} worker(s)")
    return notes


def _check_fits(lora: LoraEngine, state: TrainState) -> None:
    """The checkpoint's LoRA has this run's tensors: else lora.rank, lora.targets or the model changed."""
    missing = [n for n in lora.names if n not in state.lora]
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in lora.params]  # ZeRO-3: the whole tensor's
    wrong = [f"{n} {tuple(state.lora[n].shape)} vs {shape}" for n, shape in zip(lora.names, shapes)
             if n in state.lora and tuple(state.lora[n].shape) != shape]
    if missing or wrong or len(state.lora) != len(lora.names):
        what = (f"{len(missing)} of this run's LoRA tensors are not in it (e.g. {missing[0]})" if missing
                else f"shapes differ ({wrong[0]})" if wrong
                else f"it holds {len(state.lora)} tensors, this run {len(lora.names)}")
        raise FluxrayError(f"{state.path}: this checkpoint's LoRA does not fit the run: {what}; lora.rank, "
                           "lora.targets or model.path changed since it was saved: resume with the settings it was "
                           "saved with, or start a new run (another save.name)")


def checkpoint_step(path: Path) -> int | None:
    """The step of a complete checkpoint folder, else None (being written, or cut short while copied)."""
    try:
        meta = json.loads((path / STATE_FILE).read_text())
        sizes = meta.get("files", {LORA_STATE_FILE: None})
        for name, size in sizes.items():
            if not (path / name).is_file() or (size is not None and (path / name).stat().st_size != size):
                return None
        return int(meta["step"])
    except (OSError, ValueError, KeyError):
        return None


def latest_checkpoint(folders: list[Path]) -> Path | None:
    """The complete checkpoint of the highest step among the subfolders of `folders`."""
    found = [(step, p) for folder in folders if folder.is_dir() for p in folder.iterdir()
             if (step := checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


@contextmanager
def saving(path: Path, root: Path, step: int):
    """A failed save leaves no half-written checkpoint, and a full disk fails the job with one clear
    error; the previous checkpoint is untouched, so the job resumes from it once there is space."""
    try:
        yield
    except Exception as e:
        full = _no_space_left(e, path)  # before the cleanup frees space
        if path.is_dir() and not (path / STATE_FILE).exists():
            shutil.rmtree(path, ignore_errors=True)  # never resumed from (no state file), but holds space
        if full:
            raise FluxrayError(f"{path}: No space left on device (ENOSPC) while saving step {step} under "
                               f"storage.root {root}; the previous checkpoint is intact: free space and run "
                               "the job again to resume from it") from e
        raise


def _no_space_left(e: BaseException, path: Path) -> bool:
    # torch.save reports a full disk as "unexpected pos N vs M", safetensors as "os error 28":
    # trust errno or the words where there are any, else ask the disk.
    for err in (e, e.__cause__, e.__context__):
        if err is not None and (getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                                or "No space left" in str(err) or "os error 28" in str(err)):
            return True
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < 1 << 20
