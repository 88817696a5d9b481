"""What `model.path` names, checked before anything loads: the embedded demo model (`tiny`), a
local folder or a hub id. No torch here: `advise` and `doctor` ask it too, so that a typo is one
line from every command, not a hub library's validation error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fluxray.config import TINY_MODEL
from fluxray.errors import ConfigError

#: What a valid `model.path` looks like, for the messages.
VALID_MODEL_PATHS = ("a local diffusers folder (the one that holds model_index.json), a hub id such as "
                     "black-forest-labs/FLUX.1-dev, or `tiny` (the demo model)")


def model_source(path: str) -> Literal["tiny", "folder", "hub"]:
    """Which kind of `model.path` this is; `ConfigError` when it is none of them."""
    if path == TINY_MODEL:
        return "tiny"
    local = Path(path).expanduser()
    if local.is_dir():
        return "folder"
    if local.exists():
        raise ConfigError(f"model.path: {path} is a file, not a folder; use {VALID_MODEL_PATHS}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ConfigError(f"model.path: {path!r} does not exist (no such folder, and not a hub id); "
                          f"use {VALID_MODEL_PATHS}") from None
    return "hub"


def local_model_folder(cfg) -> Path | None:
    """The folder `model.path` loads from on this machine: the shipped demo model, the folder itself
    or a hub id's snapshot in the HF cache; None when it is not here yet. Nothing is downloaded."""
    kind = model_source(cfg.model.path)
    if kind == "tiny":
        from fluxray.model.demo import demo_model_dir

        folder = demo_model_dir()
    elif kind == "folder":
        folder = Path(cfg.model.path).expanduser()
    else:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(cfg.model.path, "model_index.json", revision=cfg.model.revision)
        folder = Path(index).parent if isinstance(index, str) else None
    return folder if folder is not None and folder.is_dir() else None
