"""The typed job config: shipped YAMLs load, defaults are the guide's, and bad configs name the key."""

from pathlib import Path

import pytest

from fluxray.config import DEFAULT_SAMPLE_PROMPTS, JobConfig, apply_override, load_config, parse_yaml_text
from fluxray.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
JOB_CONFIGS = [p for p in CONFIGS if p.name != "serve.yaml"]


def test_configs_folder_ships_a_tiny_and_a_dev_config():
    names = [p.name for p in JOB_CONFIGS]
    assert any("tiny" in n for n in names) and "flux-dev.yaml" in names


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_opens_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    assert "python jobs/train.py --config configs/" in path.read_text() or "fluxray train --config" in path.read_text()


def test_defaults_are_the_guides():
    cfg = JobConfig()
    assert cfg.train.steps == 1000 and cfg.train.lr == 5e-4 and cfg.lora.rank == 16
    assert cfg.train.batch_size == 1 and cfg.train.ema is True and cfg.sample.every == 50
    assert cfg.train.guidance == 1.0
    prompts = [p.prompt for p in cfg.sample_prompts("pxco")]
    assert prompts == [
        "pxco, professional portrait photo, high quality, detailed",
        "pxco, wearing formal attire, natural lighting, photorealistic",
        "pxco, close-up shot, sharp focus, studio lighting",
    ]
    assert all(p.startswith("[trigger], ") for p in DEFAULT_SAMPLE_PROMPTS)


def test_sample_prompts_get_walked_seeds_and_defaults():
    cfg = load_config(None, ["sample.seed=7", 'sample.prompts=["[trigger] a", {prompt: "[trigger] b", seed: 99, width: 512}]'])
    a, b = cfg.sample_prompts("pxco")
    assert (a.prompt, a.seed, a.width) == ("pxco a", 7, 1024)
    assert (b.prompt, b.seed, b.width, b.height) == ("pxco b", 99, 512, 1024)


def test_set_values_are_parsed_as_yaml():
    cfg = load_config(None, ['sample.prompts=["[trigger], portrait"]', "train.lr=1e-4", "train.ema=false",
                             "dataset.resolutions=[512, 1024]"])
    assert cfg.sample.prompts == ["[trigger], portrait"]
    assert cfg.train.lr == 1e-4 and cfg.train.ema is False and cfg.dataset.resolutions == [512, 1024]


def test_flat_view_has_dotted_keys():
    flat = JobConfig().flat()
    assert flat["train.steps"] == 1000 and flat["lora.rank"] == 16 and "storage.root" in flat


# Malformed configs: each fails with a message that names the key (and the value where there is one).
MALFORMED = [
    ("train:\n  steps: 0\n", "train.steps", "got 0"),
    ("train:\n  stpes: 100\n", "train.stpes", "did you mean `train.steps`"),
    ("lr: 0.001\n", "lr", "did you mean `train.lr`"),
    ("lora:\n  rank: 0\n", "lora.rank", "got 0"),
    ("train:\n  lr: 0\n", "train.lr", "got 0"),
    ("train:\n  steps: many\n", "train.steps", "'many'"),
    ("distributed:\n  zero_stage: 1\n", "distributed.zero_stage", "got 1"),
    ("dataset:\n  resolutions: [500]\n", "dataset.resolutions", "got 500"),
    ("train:\n  ema_decay: 1.5\n", "train.ema_decay", "got 1.5"),
    ("sample:\n  prompts:\n    - {prompt: hi, seedd: 3}\n", "sample.prompts.0.seedd", "did you mean `sample.prompts.0.seed`"),
    ("train:\n  warmup_steps: 50\n  steps: 10\n", "train.warmup_steps", "train.steps"),
    ("sample:\n  every: 0\nvalidation:\n  embedding_model: openai/clip-vit-large-patch14\n",
     "validation.embedding_model", "sample.every=0"),
    ("save:\n  name: ../escape\n", "save.name", "'../escape'"),
]


@pytest.mark.parametrize("text,key,detail", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_config_names_the_key(tmp_path, text, key, detail):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert key in msg and detail in msg and str(path) in msg


def test_tabs_and_non_mapping_yaml_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="line 2.*tabs"):
        parse_yaml_text("train:\n\tsteps: 3\n", "x.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_yaml_text("- a\n- b\n", "x.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_bad_set_override_names_the_key():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_override({}, "train.steps")
    with pytest.raises(ConfigError, match="`train.steps` is a value"):
        apply_override({"train": {"steps": 3}}, "train.steps.x=1")


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_docs_config_reference_is_in_sync():
    from fluxray.config import reference_markdown

    doc = (Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert doc == reference_markdown(), "regenerate: fluxray config --reference > docs/config.md"
