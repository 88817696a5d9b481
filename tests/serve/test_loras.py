"""LoRA ids resolve to files under the storage root and nowhere else; the listing reads headers."""

from __future__ import annotations

import pytest
import torch

from fluxray.errors import FluxrayError
from fluxray.model.lora import lora_metadata, save_lora
from fluxray.serve.loras import LoraNotFound, list_loras, lora_path, step_lora_ids
from fluxray.track.local import RunPaths


def write_lora(path, name="pxco-1", steps=20):
    meta = lora_metadata(trigger_word="pxco", base_model="tiny", rank=4, alpha=4, steps=steps, resolution=[64],
                         name=name)
    return save_lora(path, {"transformer.x.lora_A.weight": torch.zeros(4, 8)}, meta)


@pytest.fixture
def root(tmp_path):
    paths = RunPaths(tmp_path, "pxco-1")
    write_lora(paths.final_lora)
    write_lora(paths.final_lora.with_name("pxco-1.kohya.safetensors"))
    for step in (10, 20):
        write_lora(paths.step_lora(step), steps=step)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "pxco-1.json").write_text("{}")
    write_lora(RunPaths(tmp_path, "cli-run").final_lora, name="cli-run")  # trained with `fluxray train`
    return tmp_path


def test_ids_name_the_final_and_the_step_files(root):
    assert lora_path(root, "pxco-1") == RunPaths(root, "pxco-1").final_lora
    assert lora_path(root, "pxco-1@10") == RunPaths(root, "pxco-1").step_lora(10)
    assert step_lora_ids(root, "pxco-1") == ["pxco-1@10", "pxco-1@20"]
    with pytest.raises(LoraNotFound, match="pxco-1@30"):
        lora_path(root, "pxco-1@30")


@pytest.mark.parametrize("bad", ["../loras/pxco-1", "pxco-1/../x", "/etc/passwd", "..", "pxco-1@x", "a@1@2", ""])
def test_ids_cannot_point_elsewhere(root, bad):
    with pytest.raises(FluxrayError, match="not a LoRA id"):
        lora_path(root, bad)


def test_listing_reads_trigger_steps_and_job_and_skips_the_kohya_copy(root):
    loras = {l["id"]: l for l in list_loras(root)}
    assert set(loras) == {"pxco-1", "cli-run"}
    assert loras["pxco-1"]["trigger_word"] == "pxco" and loras["pxco-1"]["steps"] == 20
    assert loras["pxco-1"]["job_id"] == "pxco-1" and loras["cli-run"]["job_id"] is None
    (root / "loras" / "torn.safetensors").write_bytes(b"\x00")
    assert "unreadable" in {l["id"]: l for l in list_loras(root)}["torn"]["error"]
