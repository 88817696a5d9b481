"""LoRA ids: `<run>` is a run's final LoRA, `<run>@<step>` the LoRA its job saved at that step.

Both resolve to files under the storage root (`fluxray.train.loop.RunPaths`), so the API
and the generation deployment agree on what an id means without sharing memory.
"""

from __future__ import annotations

import re
from pathlib import Path

from fluxray.errors import FluxrayError
from fluxray.model.lora import read_lora_metadata
from fluxray.track.local import RunPaths

# Run names are plain file names (`save.name`); this also keeps ids out of other folders.
_ID = re.compile(r"^(?P<run>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})(?:@(?P<step>\d{1,9}))?$")
_STEP_FILE = re.compile(r"-step(\d{6,})\.safetensors$")


class LoraNotFound(FluxrayError):
    """A LoRA id that is well formed but names no file."""


def lora_path(root: Path, lora_id: str) -> Path:
    """The safetensors file of `lora_id`; raises FluxrayError (bad id) or LoraNotFound."""
    m = _ID.match(lora_id)
    if not m or ".." in lora_id:
        raise FluxrayError(f"lora: {lora_id!r} is not a LoRA id (`<run>` or `<run>@<step>`)")
    paths = RunPaths(Path(root), m["run"])
    path = paths.final_lora if m["step"] is None else paths.step_lora(int(m["step"]))
    if not path.is_file():
        raise LoraNotFound(f"lora: no LoRA {lora_id!r} (looked for {path})")
    return path


def step_lora_ids(root: Path, run: str) -> list[str]:
    """Ids of the LoRAs a run saved during training, by step."""
    folder = RunPaths(Path(root), run).run_dir / "loras"
    steps = sorted(int(m.group(1)) for p in folder.glob("*.safetensors") if (m := _STEP_FILE.search(p.name)))
    return [f"{run}@{s}" for s in steps]


def list_loras(root: Path) -> list[dict]:
    """Every final LoRA under `<root>/loras/` with what its header says (trigger word, steps, ...)."""
    out = []
    for path in sorted((Path(root) / "loras").glob("*.safetensors")):
        name = path.name.removesuffix(".safetensors")
        if name.endswith(".kohya") or not _ID.match(name):  # the kohya copy of the same LoRA
            continue
        try:
            meta = read_lora_metadata(path)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is listed as broken, not a 500
            out.append({"id": name, "error": f"{path.name}: unreadable header: {e}"})
            continue
        job = name if (Path(root) / "jobs" / f"{name}.json").is_file() else None  # trained by this service
        out.append({"id": name, "job_id": job, "trigger_word": meta.get("trigger_word"),
                    "base_model": meta.get("base_model"), "rank": _int(meta.get("rank")),
                    "steps": _int(meta.get("steps")), "created": path.stat().st_mtime})
    return out


def _int(v: str | None) -> int | None:
    try:
        return int(float(v)) if v is not None else None
    except ValueError:
        return None
