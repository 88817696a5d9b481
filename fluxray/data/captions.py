"""Captions: read them in the forms users upload, and put the trigger word in them.

The trigger rules are ai-toolkit's: `[trigger]` is replaced by the trigger word, and a
caption that still lacks the word gets it prepended (`"pxco, <caption>"`).
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

from fluxray.data.images import IMAGE_SUFFIXES
from fluxray.errors import DatasetError

TRIGGER_PLACEHOLDER = "[trigger]"
# Caption files looked for inside the images folder when no `captions` path is given.
CAPTION_FILES = ("metadata.jsonl", "captions.json")
# A `.txt` file in the images folder that is not a caption sidecar.
TRIGGER_FILE = "trigger.txt"


def normalize_trigger(word: str) -> str:
    """Strip `word`; a trigger word is one token: not empty, no whitespace, no commas.

    The trigger is prepended as `"{trigger}, "`, so a comma or a space inside it would split
    it into two caption tags and the model would learn neither as the concept.
    """
    if not isinstance(word, str):
        raise DatasetError(f"trigger_word must be a string, got {type(word).__name__} {word!r}")
    trigger = word.strip()
    if not trigger:
        raise DatasetError(f"trigger_word must not be empty, got {word!r}")
    if any(ch.isspace() for ch in trigger) or "," in trigger:
        raise DatasetError(
            f"trigger_word must be one token without spaces or commas, got {word!r}"
        )
    return trigger


def apply_trigger(caption: str, trigger: str) -> str:
    """The training text for `caption`: placeholders filled, trigger first if it was absent.

    Whitespace runs (newlines from `.txt` sidecars included) collapse to one space. The word
    counts as present only as a whole, case-sensitive word: T5 tells `pxco` from `PXCO`.
    """
    text = " ".join(caption.replace(TRIGGER_PLACEHOLDER, trigger).split())
    if not text:
        return trigger
    if has_trigger(text, trigger):
        return text
    return f"{trigger}, {text}"


def has_trigger(text: str, trigger: str) -> bool:
    """Whether `text` holds `trigger` as a whole, case-sensitive word (T5 tells `pxco` from `PXCO`)."""
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text) is not None


def load_captions(images_dir: Path, captions: Path | None = None) -> dict[str, str]:
    """Captions keyed by image file name, from `captions` or from inside `images_dir`.

    `captions` may be a JSON object `{file_name: caption}`, a JSON list of
    `{"file_name", "caption" | "text"}` objects, or a `.jsonl` file of `{"file_name", "text"}`
    lines. Without it, `images_dir/metadata.jsonl` or `images_dir/captions.json` is read, and
    when neither is there, `.txt` sidecars (`0001.txt` for `0001.png`; `trigger.txt` is not a
    caption). A sidecar with no image keeps its own name as the key so the caller can report it.
    Returns `{}` when the folder holds no captions at all.
    """
    images_dir = Path(images_dir)
    files = caption_files(images_dir, captions)
    if captions is not None or (files and files[0].suffix.lower() != ".txt"):
        return _read_caption_file(files[0], images_dir)
    return _read_sidecars(images_dir, files)


def caption_files(images_dir: Path, captions: Path | None = None) -> list[Path]:
    """The files `load_captions` reads: `captions`, else the folder's caption file, else its
    `.txt` sidecars (every `.txt` but `trigger.txt`)."""
    images_dir = Path(images_dir)
    if captions is not None:
        return [Path(captions)]
    present = [images_dir / name for name in CAPTION_FILES if (images_dir / name).is_file()]
    if len(present) > 1:
        raise DatasetError(
            f"{images_dir}: both {present[0].name} and {present[1].name} are present; "
            "pass the one to use as `captions`"
        )
    if present:
        return present
    if not images_dir.is_dir():
        raise DatasetError(f"images folder {images_dir} does not exist")
    return sorted(p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() == ".txt" and p.name.lower() != TRIGGER_FILE)


def _read_caption_file(path: Path, images_dir: Path) -> dict[str, str]:
    if not path.is_file():
        raise DatasetError(f"captions file {path} does not exist")
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        return _from_jsonl(path, text, images_dir)
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicate_keys(path, pairs))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if isinstance(data, dict):
        out = {}
        for name, caption in data.items():
            _check_caption(caption, f"{path}: caption for key {name!r}")
            out[_key(name, path, images_dir)] = caption
        return out
    if isinstance(data, list):
        out = {}
        for i, item in enumerate(data):
            where = f"{path}: item {i}"
            name, caption = _entry(item, where, ("caption", "text"))
            _add(out, _key(name, path, images_dir), caption, where)
        return out
    raise DatasetError(
        f"{path}: expected a JSON object {{file_name: caption}} or a list of "
        f"{{\"file_name\", \"caption\"}} objects, got {type(data).__name__}"
    )


def _from_jsonl(path: Path, text: str, images_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for where, name, caption in iter_metadata(path, text):
        _add(out, _key(name, path, images_dir), caption, where)
    return out


def iter_metadata(path: Path, text: str | None = None) -> Iterator[tuple[str, str, str]]:
    """`(where, file_name, text)` per line of a `metadata.jsonl`; `where` names file and line.

    Each line is `{"file_name": ..., "text": ...}` (`"caption"` is accepted for `"text"`).
    """
    text = _read_text(path) if text is None else text
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: invalid JSON at column {e.colno}: {e.msg}")
        name, caption = _entry(item, where, ("text", "caption"))
        yield where, name, caption


def _read_sidecars(images_dir: Path, sidecars: list[Path]) -> dict[str, str]:
    images_by_stem: dict[str, str] = {}
    for p in sorted(images_dir.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
            images_by_stem.setdefault(p.stem, p.name)
    return {images_by_stem.get(p.stem, p.name): _read_text(p) for p in sidecars}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})")


def _no_duplicate_keys(path: Path, pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DatasetError(f"{path}: key {key!r} appears twice")
        out[key] = value
    return out


def _entry(item: object, where: str, text_keys: tuple[str, ...]) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise DatasetError(
            f"{where}: expected an object with \"file_name\" and \"{text_keys[0]}\", "
            f"got {type(item).__name__} {_short(item)}"
        )
    name = item.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise DatasetError(f"{where}: \"file_name\" must be a non-empty string, got {_short(name)}")
    key = next((k for k in text_keys if k in item), None)
    if key is None:
        raise DatasetError(f"{where}: {name!r} has no \"{text_keys[0]}\"")
    _check_caption(item[key], f"{where}: \"{key}\" for {name!r}")
    return name, item[key]


def _check_caption(caption: object, where: str) -> None:
    if not isinstance(caption, str):
        raise DatasetError(f"{where} must be a string, got {type(caption).__name__} {_short(caption)}")


def _add(out: dict[str, str], name: str, caption: str, where: str) -> None:
    if name in out and out[name] != caption:
        raise DatasetError(f"{where}: a second, different caption for {name!r}")
    out[name] = caption


def _key(name: str, captions_file: Path, images_dir: Path) -> str:
    """`images/0001.png` written next to the images folder names the image `0001.png`."""
    if "/" not in name and "\\" not in name:
        return name
    target = (captions_file.parent / name.replace("\\", "/")).resolve()
    return target.name if target.parent == images_dir.resolve() else name


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
