"""ai-toolkit import: the example FLUX config becomes a valid fluxray config, every key is
accounted for, what did not map is reported, and the CLI writes a runnable YAML."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fluxray.compat.aitoolkit import convert_aitoolkit, import_aitoolkit
from fluxray.config import load_config
from fluxray.errors import ConfigError

EXAMPLE = Path(__file__).parent / "fixtures" / "train_lora_flux_24gb.yaml"
REPO = Path(__file__).resolve().parent.parent.parent


def _leaves(node, prefix=""):
    """Every leaf key path of the ai-toolkit YAML, `[i]` for list items of mappings."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix


def test_example_imports_to_the_values_it_names():
    r = import_aitoolkit(EXAMPLE)
    c = r.config
    assert (c.save.name, c.dataset.trigger_word, c.dataset.path) == ("pxco_flux_lora_v1", "pxco", "/data/pxco")
    assert (c.lora.rank, c.lora.alpha) == (16, 16.0)
    assert (c.save.dtype, c.save.every, c.save.keep_last) == ("fp16", 250, 4)
    assert (c.dataset.caption_dropout, c.dataset.resolutions, c.dataset.cache_latents) == (0.05, [512, 768, 1024], True)
    t = c.train
    assert (t.batch_size, t.steps, t.grad_accum, t.lr) == (1, 2000, 1, 1e-4)  # `lr: 1e-4` is a string in YAML 1.1
    assert (t.gradient_checkpointing, t.timestep_sampling, t.optimizer, t.mixed_precision) == ("on", "sigmoid", "adamw", "bf16")
    assert (t.ema, t.ema_decay) == (True, 0.99)
    assert c.model.path == "black-forest-labs/FLUX.1-dev"
    s = c.sample
    assert (s.every, s.width, s.height, s.seed, s.walk_seed, s.guidance, s.steps) == (250, 1024, 1024, 42, True, 4.0, 20)
    third = c.sample_prompts("pxco")[2]  # inline flags survive the import and resolve
    assert (third.prompt, third.width, third.height, third.seed) == ("pxco, close-up, warm smile, studio lighting", 768, 1024, 7)
    assert dict((s, n) for s, _, n in r.mapped)["config.process[0].train.optimizer"] == "adamw8bit -> torch AdamW (32-bit state)"


def test_every_key_is_mapped_kept_or_reported():
    r = import_aitoolkit(EXAMPLE)
    doc = yaml.safe_load(EXAMPLE.read_text())
    seen = {s for s, _, _ in r.mapped} | {s for s, _ in r.same} | {s for s, _ in r.unmapped}
    for leaf in _leaves(doc):
        assert leaf == "job" or any(leaf == s or leaf.startswith(s + ".") for s in seen), leaf
    assert {s for s, _ in r.unmapped} == {
        "meta", "config.process[0].training_folder", "config.process[0].performance_log_every",
        "config.process[0].device", "config.process[0].train.skip_first_sample",
        "config.process[0].train.linear_timesteps", "config.process[0].model.quantize"}
    text = r.format()
    assert "not mapped:" in text and "config.process[0].model.quantize: fluxray keeps the base in bf16" in text
    assert "config.process[0].network.linear -> lora.rank" in text


def test_written_yaml_loads_back_to_the_same_config(tmp_path):
    r = import_aitoolkit(EXAMPLE)
    out = tmp_path / "pxco.yaml"
    out.write_text(r.to_yaml("pxco.yaml"))
    assert out.read_text().startswith("# Imported from the ai-toolkit config")
    assert "#   fluxray train --config pxco.yaml --local" in out.read_text()
    assert load_config(out) == r.config


def test_sample_objects_and_other_shapes():
    doc = {"job": "extension", "config": {"name": "x", "process": [
        {"type": "sd_trainer", "model": {"name_or_path": "/m", "is_flux": True},
         "datasets": [{"folder_path": "/a", "resolution": 512}, {"folder_path": "/b"}],
         "train": {"optimizer": "prodigy", "lr": 1, "timestep_type": "flux_shift", "disable_sampling": True},
         "sample": {"samples": [{"prompt": "[trigger] --w 512", "seed": 3, "guidance_scale": 3.5,
                                 "network_multiplier": 0.7, "neg": "blurry", "ctrl_img": "/c.png"}]}},
        {"type": "sd_trainer"}]}}
    r = convert_aitoolkit(doc)
    assert r.config.dataset.resolutions == [512] and r.config.train.lr == 1.0 and r.config.sample.every == 0
    p = r.config.sample_prompts("pxco")[0]
    assert (p.prompt, p.width, p.seed, p.guidance, p.lora_scale) == ("pxco", 512, 3, 3.5, 0.7)
    why = dict(r.unmapped)
    assert set(why) == {"config.process[0].datasets[1]", "config.process[0].train.optimizer",
                        "config.process[0].train.timestep_type", "config.process[0].sample.samples[0].neg",
                        "config.process[0].sample.samples[0].ctrl_img", "config.process[1]"}
    assert "prodigy" in why["config.process[0].train.optimizer"]


def test_fp16_training_is_reported_not_mapped_with_the_reason():
    """fluxray trains no fp16 (FLUX overflows it): ai-toolkit's `train.dtype: fp16` is listed with the
    reason and the default (bf16 autocast on a GPU) applies; an fp16 LoRA file is fine."""
    r = convert_aitoolkit({"config": {"process": [{"train": {"dtype": "fp16"}, "save": {"dtype": "float16"}}]}})
    why = dict(r.unmapped)["config.process[0].train.dtype"]
    assert "overflow fp16" in why and "train.mixed_precision: auto" in why
    assert r.config.train.mixed_precision == "auto" and r.config.save.dtype == "fp16"
    assert convert_aitoolkit({"config": {"process": [{"train": {"dtype": "bfloat16"}}]}}).config.train.mixed_precision == "bf16"


@pytest.mark.parametrize("doc, words", [
    ({"job": "extension"}, ["config.process[0]"]),
    ({"config": {"process": [{"model": {"is_flux": False, "name_or_path": "sdxl"}}]}}, ["FLUX.1", "is_flux=False"]),
    ({"config": {"process": [{"type": "extract"}]}}, ["config.process[0].type", "'extract'"]),
    ({"config": {"process": [{"train": {"lr": "fast"}}]}}, ["config.process[0].train.lr", "'fast'"]),
    ({"config": {"process": [{"train": {"steps": 1.5}}]}}, ["config.process[0].train.steps", "integer"]),
    # A value ai-toolkit accepts but fluxray does not: both keys are named.
    ({"config": {"process": [{"datasets": [{"folder_path": "/a", "resolution": [500]}]}]}},
     ["dataset.resolutions", "config.process[0].datasets[0].resolution -> dataset.resolutions"]),
])
def test_bad_input_is_one_clear_error(doc, words):
    with pytest.raises(ConfigError) as e:
        convert_aitoolkit(doc, "my.yaml")
    for w in words:
        assert w in str(e.value)


def test_cli_writes_the_config_and_prints_the_report(tmp_path):
    fluxray = str(Path(sys.executable).parent / "fluxray")
    out = tmp_path / "pxco.yaml"
    r = subprocess.run([fluxray, "import-config", "ai-toolkit", str(EXAMPLE), "-o", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "not mapped:" in r.stdout and "config.process[0].device" in r.stdout
    assert load_config(out).train.steps == 2000
    bad = subprocess.run([fluxray, "import-config", "ai-toolkit", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr
