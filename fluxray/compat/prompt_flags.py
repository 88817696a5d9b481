"""Inline prompt flags of kohya sd-scripts and ai-toolkit: `"pxco, portrait --w 512 --h 768 --d 42"`.

`parse_prompt_flags` strips the flags off a sample prompt and returns them as `SamplePrompt`
fields; an unknown flag or a bad value is a `ConfigError` that names the prompt.
"""

from __future__ import annotations

import re

from fluxray.errors import ConfigError

#: Flag -> SamplePrompt field, in both tools' spellings: kohya `--d --s --g --l`, ai-toolkit
#: `--seed --steps --cfg --m`. `--l`/`--cfg` is the CFG scale, which ai-toolkit hands to FLUX
#: as its guidance scale; so does fluxray, unless kohya's `--g` (FLUX guidance) is also given.
FLAGS = {
    "w": "width", "h": "height", "d": "seed", "seed": "seed", "s": "steps", "steps": "steps",
    "g": "guidance", "l": "guidance", "cfg": "guidance", "m": "lora_scale", "network_multiplier": "lora_scale",
}
_INT_FIELDS = ("width", "height", "seed", "steps")

# A flag starts after whitespace; `well--known` inside a word stays prompt text.
_SPLIT = re.compile(r"\s--(?=[A-Za-z])")


def parse_prompt_flags(text: str, where: str = "prompt") -> tuple[str, dict[str, int | float]]:
    """(prompt without its flags, {SamplePrompt field: value}) of one prompt line."""
    head, *parts = _SPLIT.split(" " + text)
    raw: dict[str, int | float] = {}
    for part in parts:
        name, _, value = part.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name == "n":
            if value:  # guidance-distilled FLUX.1-dev runs no unconditional pass to steer
                raise ConfigError(f"{where}: negative prompts do nothing for FLUX (remove --n), "
                                  f"got --n {value!r} in {text!r}")
            continue
        if name not in FLAGS:
            known = " ".join(f"--{f}" for f in FLAGS)
            raise ConfigError(f"{where}: unknown prompt flag (known: {known} --n), got --{name} in {text!r}")
        raw[name] = _number(name, value, where, text)

    fields: dict[str, int | float] = {}
    for name, number in raw.items():
        field = FLAGS[name]
        if field == "guidance" and name != "g" and "g" in raw:
            # kohya: `--g` is FLUX's guidance and `--l` a true-CFG scale; 1 means off.
            if number != 1:
                raise ConfigError(f"{where}: --{name} next to --g is a true-CFG scale, which fluxray does not run "
                                  f"(drop --{name}, keep --g), got --{name} {number} in {text!r}")
            continue
        if field in fields and fields[field] != number:
            raise ConfigError(f"{where}: {field} is given twice with different values, got {text!r}")
        fields[field] = number
    prompt = head.strip()
    if not prompt:
        raise ConfigError(f"{where}: a prompt needs text before its flags, got {text!r}")
    return prompt, fields


def _number(name: str, value: str, where: str, text: str) -> int | float:
    field = FLAGS[name]
    try:
        number = int(value) if field in _INT_FIELDS else float(value)
    except ValueError:
        kind = "an integer" if field in _INT_FIELDS else "a number"
        raise ConfigError(f"{where}: --{name} needs {kind}, got {value!r} in {text!r}") from None
    if field in ("width", "height") and (number < 64 or number % 16):
        raise ConfigError(f"{where}: --{name} must be a multiple of 16 and >= 64, got {number} in {text!r}")
    if field == "steps" and number < 1:
        raise ConfigError(f"{where}: --{name} must be >= 1, got {number} in {text!r}")
    if field in ("guidance", "lora_scale") and number < 0:
        raise ConfigError(f"{where}: --{name} must be >= 0, got {number} in {text!r}")
    return number
