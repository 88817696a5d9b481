"""Inline kohya / ai-toolkit prompt flags: parsed into SamplePrompt fields, stripped from the text,
accepted wherever sample prompts are resolved, and a clear error that names the prompt."""

from pathlib import Path

import pytest

from fluxray.compat.prompt_flags import parse_prompt_flags
from fluxray.config import load_config
from fluxray.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent.parent


def test_every_flag_in_both_spellings():
    text, f = parse_prompt_flags("pxco, portrait --w 512 --h 768 --seed 42 --steps 20 --m 0.8 --g 4")
    assert text == "pxco, portrait"
    assert f == {"width": 512, "height": 768, "seed": 42, "steps": 20, "lora_scale": 0.8, "guidance": 4.0}
    # kohya's short forms; `--l` (CFG) is FLUX's guidance in ai-toolkit; flags are case-insensitive.
    assert parse_prompt_flags("pxco --D 7 --s 28 --l 3.5 --network_multiplier 1.2") == (
        "pxco", {"seed": 7, "steps": 28, "guidance": 3.5, "lora_scale": 1.2})
    assert parse_prompt_flags("pxco --cfg 4") == ("pxco", {"guidance": 4.0})
    assert parse_prompt_flags("a well--known pxco,  smiling ") == ("a well--known pxco,  smiling", {})
    assert parse_prompt_flags("pxco --n") == ("pxco", {})  # an empty negative prompt is harmless


def test_kohya_cfg_next_to_guidance():
    # kohya writes `--g` for FLUX's guidance and `--l 1` (true CFG off) beside it.
    assert parse_prompt_flags("pxco --g 3.5 --l 1")[1] == {"guidance": 3.5}
    with pytest.raises(ConfigError, match="true-CFG"):
        parse_prompt_flags("pxco --l 7 --g 3.5")


@pytest.mark.parametrize("text, words", [
    ("pxco --x 3", ["unknown prompt flag", "--x", "'pxco --x 3'"]),
    ("pxco --w 500", ["multiple of 16", "500"]),
    ("pxco --s twenty", ["--s needs an integer", "'twenty'"]),
    ("pxco --g", ["--g needs a number"]),
    ("pxco --steps 0", [">= 1"]),
    ("pxco --m -1", [">= 0"]),
    ("pxco --n ugly hands", ["negative prompts", "'ugly hands'"]),
    ("pxco --d 1 --seed 2", ["seed is given twice"]),
    ("--w 512", ["needs text before its flags"]),
])
def test_bad_flags_are_one_clear_error_naming_the_prompt(text, words):
    with pytest.raises(ConfigError) as e:
        parse_prompt_flags(text, "sample.prompts.3")
    msg = str(e.value)
    assert msg.startswith("sample.prompts.3: ")
    for w in words:
        assert w in msg


def test_config_resolves_flags_and_they_win_over_the_prompt_fields():
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "sample.prompts=['[trigger], portrait --w 128 --h 192 --d 7 --m 0.8 --g 4', "
        "{prompt: '[trigger], smiling --seed 9', seed: 1, lora_scale: 0.5}, '[trigger], plain']"])
    a, b, c = cfg.sample_prompts("pxco")
    assert (a.prompt, a.width, a.height, a.seed, a.lora_scale, a.guidance) == ("pxco, portrait", 128, 192, 7, 0.8, 4.0)
    assert (b.prompt, b.seed, b.lora_scale) == ("pxco, smiling", 9, 0.5)
    assert (c.prompt, c.width, c.seed, c.lora_scale) == ("pxco, plain", 64, 44, 1.0)  # walk_seed: 42 + 2


def test_a_bad_flag_fails_when_the_config_loads():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "tiny.yaml", ["sample.prompts=['[trigger], ok', '[trigger] --zz 1']"])
    assert "sample.prompts: prompt 1: unknown prompt flag" in str(e.value) and "--zz" in str(e.value)
