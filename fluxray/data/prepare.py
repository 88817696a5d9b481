"""Turn an upload (a folder of images plus captions) into a prepared dataset, and read one back.

A prepared dataset is one flat folder: upright RGB PNGs, `metadata.jsonl` with the training
text of each (`{"file_name": "0001.png", "text": "pxco, ..."}`), `dataset.json` and
`report.json`. It is built in a hidden sibling folder and renamed into place, so a failed
prepare leaves no half-written dataset, and the upload folder is only ever read.
"""

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from fluxray.data.captions import (
    TRIGGER_FILE,
    TRIGGER_PLACEHOLDER,
    apply_trigger,
    caption_files,
    iter_metadata,
    load_captions,
    normalize_trigger,
)
from fluxray.data.images import IMAGE_SUFFIXES, ImageError, load_image
from fluxray.errors import DatasetError

METADATA = "metadata.jsonl"
DATASET_INFO = "dataset.json"
REPORT = "report.json"

ProblemKind = Literal[
    "not_an_image",  # the file does not decode as any supported image format
    "corrupt_image",  # an image file that is empty, truncated or damaged
    "too_large",  # over the pixel limit of `fluxray.data.images.MAX_PIXELS`
    "missing_caption",  # an image that no caption names
    "caption_without_image",  # a caption that names no image in the folder
    "duplicate_name",  # same name as an earlier image once case and extension are ignored
    "empty_caption",  # the image trains on the trigger word alone
    "unsupported_file",  # a file or folder that is neither an image nor a caption file
    "other_file",  # not an image by design: a caption file it read, trigger.txt, a hidden or system file
    "normalised",  # a documented change: EXIF rotation, transparency flattened, renamed, ...
]
Severity = Literal["info", "warning", "error"]

# Files and folders that uploads carry along and nobody means as data.
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')


class Problem(BaseModel):
    """One thing the report tells the user about one file of the upload."""

    file_name: str = Field(description="the image, caption key or folder entry it is about")
    kind: ProblemKind = Field(description="what went wrong, as a stable keyword")
    severity: Severity = Field(
        description="info: noted, image kept; warning: skipped or degraded; error: prepare fails"
    )
    message: str = Field(description="a sentence that names the file and says what was done")


class PreparedImage(BaseModel):
    """One image in the prepared dataset."""

    file_name: str = Field(description="file name in the prepared dataset, always .png")
    source: str = Field(description="file name in the upload")
    width: int
    height: int
    text: str = Field(description="the training text: the caption with the trigger word")


class DatasetInfo(BaseModel):
    """`dataset.json`: what a prepared dataset is, for training jobs and experiment tracking."""

    trigger_word: str
    num_images: int
    content_hash: str = Field(description="sha256 over the images and metadata.jsonl; no timestamps")
    source: str = Field(description="absolute path of the upload folder")
    created: str = Field(description="UTC time of preparation, ISO 8601")


class PrepareReport(BaseModel):
    """Every image used and every problem found; written as `report.json`."""

    trigger_word: str
    source: str
    out_dir: str
    strict: bool
    images: list[PreparedImage] = []
    problems: list[Problem] = []
    content_hash: str | None = Field(default=None, description="None when the prepare failed")

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def format(self) -> str:
        """The human summary the CLI prints."""
        if self.errors:
            head = f"Prepare of {self.source} failed: {len(self.errors)} error(s)"
        else:
            head = (
                f"Prepared {len(self.images)} images with trigger word {self.trigger_word!r}\n"
                f"  from {self.source}\n  to   {self.out_dir}\n  content hash {self.content_hash}"
            )
        lines = [head]
        if self.problems:
            width = max(len(p.kind) for p in self.problems)
            lines.append(f"{len(self.problems)} note(s) and problem(s):")
            lines += [f"  {p.severity:<7} {p.kind:<{width}}  {p.message}" for p in self.problems]
        return "\n".join(lines)


class PrepareError(DatasetError):
    """A prepare that failed; `report` says why, file by file."""

    def __init__(self, message: str, report: PrepareReport):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset as `read_prepared` found it."""

    root: Path
    info: DatasetInfo
    items: list[tuple[Path, str]]  # (image path, training text), in metadata.jsonl order


def prepare_dataset(
    images_dir: Path,
    captions: Path | None = None,
    *,
    trigger_word: str,
    out_dir: Path,
    strict: bool = False,
) -> PrepareReport:
    """Prepare the images in `images_dir` (top level only) with their captions into `out_dir`.

    Captions come from `captions` or from the folder (see `load_captions`). By default a bad
    image, an image without a caption, a duplicate name and an unsupported file are skipped
    with a warning, while a caption without an image fails the prepare; `strict=True` makes
    every warning fail it too. `out_dir` must be new, empty, or an earlier prepared dataset,
    which is then replaced. Raises `PrepareError` (a `DatasetError`) carrying the report.
    """
    trigger = normalize_trigger(trigger_word)
    src, out = Path(images_dir), Path(out_dir)
    if not src.is_dir():
        raise DatasetError(f"images folder {src} {'is a file, not a folder' if src.exists() else 'does not exist'}")
    _check_out_dir(src, out)
    caption_map = load_captions(src, captions)
    if not caption_map:
        raise DatasetError(
            f"{captions or src}: no captions found; add captions.json, metadata.jsonl or "
            ".txt sidecars, or pass a captions file"
        )
    report = PrepareReport(trigger_word=trigger, source=str(src.resolve()), out_dir=str(out), strict=strict)

    def problem(file_name: str, kind: ProblemKind, message: str, severity: Severity = "warning") -> None:
        if strict and severity == "warning":
            severity = "error"
        report.problems.append(Problem(file_name=file_name, kind=kind, severity=severity, message=message))

    candidates = _list_upload(src, problem, {p.name for p in caption_files(src, captions) if p.parent == src},
                              trigger)
    matched, orphans = _match_captions([p.name for p in candidates], caption_map)
    for key in orphans:
        message = f"{key}: has a caption but there is no such image in {src}"
        problem(key, "caption_without_image", message, "error")
    candidates = _drop_duplicates(candidates, matched, problem)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        digests = _write_images(candidates, matched, trigger, tmp, report, problem)
        if report.errors:
            raise PrepareError(f"cannot prepare {src}: " + _summary(report.errors), report)
        if not report.images:
            raise PrepareError(f"{src}: no usable images: " + _summary(report.problems), report)
        report.images.sort(key=lambda item: item.file_name)
        metadata = "".join(
            json.dumps({"file_name": i.file_name, "text": i.text}, ensure_ascii=False) + "\n"
            for i in report.images
        ).encode("utf-8")
        (tmp / METADATA).write_bytes(metadata)
        report.content_hash = _content_hash(report.images, digests, metadata)
        info = DatasetInfo(
            trigger_word=trigger,
            num_images=len(report.images),
            content_hash=report.content_hash,
            source=report.source,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        (tmp / DATASET_INFO).write_text(info.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (tmp / REPORT).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report


def read_prepared(path: Path) -> PreparedDataset:
    """Read a prepared dataset, checking every `metadata.jsonl` line names a file inside it."""
    root = Path(path)
    meta, info_path = root / METADATA, root / DATASET_INFO
    for required in (meta, info_path):
        if not required.is_file():
            raise DatasetError(f"{root} is not a prepared dataset: {required.name} is missing")
    try:
        info = DatasetInfo.model_validate_json(info_path.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        raise DatasetError(f"{info_path}: not a valid dataset.json: {first['loc']} {first['msg']}")
    inside = root.resolve()
    items, seen = [], set()
    for where, name, text in iter_metadata(meta):
        image = root / name
        if (
            name in (".", "..")
            or "/" in name
            or "\\" in name
            or Path(name).is_absolute()
            or image.resolve().parent != inside
        ):
            raise DatasetError(f"{where}: file_name {name!r} points outside the dataset folder {root}")
        if not image.is_file():
            raise DatasetError(f"{where}: file_name {name!r} does not exist in {root}")
        if name in seen:
            raise DatasetError(f"{where}: file_name {name!r} is listed twice")
        seen.add(name)
        items.append((image, text))
    if len(items) != info.num_images:
        raise DatasetError(
            f"{meta}: lists {len(items)} images but {info_path.name} says num_images={info.num_images}"
        )
    if not items:
        raise DatasetError(f"{meta}: lists no images")
    return PreparedDataset(root=root, info=info, items=items)


def is_prepared(path: Path) -> bool:
    """Whether `path` looks like the output of `prepare_dataset` (`read_prepared` checks it fully)."""
    return (Path(path) / METADATA).is_file() and (Path(path) / DATASET_INFO).is_file()


def _check_out_dir(src: Path, out: Path) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise DatasetError(f"out_dir {out} overlaps the images folder {src}; choose a folder outside it")
    if o.exists() and not (o.is_dir() and (is_prepared(o) or not any(o.iterdir()))):
        raise DatasetError(f"out_dir {out} exists and is not a prepared dataset; refusing to overwrite it")


def _list_upload(src: Path, problem, caption_names: set[str], trigger: str) -> list[Path]:
    """The image files in name order; every other entry is reported with the reason it is not
    used (`caption_names`: the caption files read)."""
    images = []
    for p in sorted(src.iterdir(), key=lambda p: p.name):
        if p.name in _IGNORED_NAMES:
            problem(p.name, "other_file", f"{p.name}: a file the operating system adds; not used", "info")
        elif p.name.startswith("."):
            problem(p.name, "other_file", f"{p.name}: a hidden file; not used", "info")
        elif p.name in caption_names:
            problem(p.name, "other_file", f"{p.name}: read for the captions", "info")
        elif p.name.lower() == TRIGGER_FILE:
            problem(p.name, "other_file",
                    f"{p.name}: the trigger word file, not an image (the trigger word is {trigger!r})", "info")
        elif p.is_dir():
            problem(p.name, "unsupported_file", f"{p.name}/: a folder; only images at the top level are used")
        elif not p.is_file():  # opening a named pipe would block the prepare forever
            problem(p.name, "unsupported_file", f"{p.name}: not a regular file (a pipe, device or broken link); not used")
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            problem(
                p.name, "unsupported_file",
                f"{p.name}: not a supported image type ({' '.join(IMAGE_SUFFIXES)}) nor a caption file in use; "
                "not used",
            )
    return images


def _drop_duplicates(images: list[Path], matched: dict[str, str], problem) -> list[Path]:
    """One image per output name, ignoring case: the first with a caption, else the first."""
    groups: dict[str, list[Path]] = {}
    for p in images:
        groups.setdefault(_output_name(p.name).casefold(), []).append(p)
    kept = []
    for group in groups.values():
        keep = next((p for p in group if p.name in matched), group[0])
        kept.append(keep)
        for p in group:
            if p is not keep:
                message = f"{p.name}: same name as {keep.name} apart from case or extension; skipped"
                problem(p.name, "duplicate_name", message)
    return kept


def _match_captions(names: list[str], captions: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Caption per image name, and the keys that name no image. A key matches by exact name,
    then ignoring case, then, if it has no image extension, by stem (`"0001"` -> `0001.png`)."""
    lookups = [
        ({n: n for n in names}, lambda key: key),
        ({n.casefold(): n for n in reversed(names)}, str.casefold),
        (
            {Path(n).stem: n for n in reversed(names)},
            lambda key: None if Path(key).suffix.lower() in IMAGE_SUFFIXES else key,
        ),
    ]
    matched: dict[str, str] = {}
    left = list(captions)
    for table, lookup in lookups:
        unmatched = []
        for key in left:
            name = table.get(lookup(key))
            if name is None or name in matched:
                unmatched.append(key)
            else:
                matched[name] = captions[key]
        left = unmatched
    return matched, left


def _write_images(candidates, matched, trigger, tmp, report, problem) -> dict[str, str]:
    """Decode, normalise and write each captioned image; returns sha256 per written file."""
    digests = {}
    for path in candidates:
        name = _output_name(path.name)
        caption = matched.get(path.name)
        if caption is None:
            problem(path.name, "missing_caption", f"{path.name}: no caption names this image; skipped")
            continue
        notes: list[str] = []
        try:
            img = load_image(path, notes)
        except ImageError as e:
            problem(path.name, e.kind, f"{e}; skipped")
            continue
        if name != f"{path.stem}.png":
            notes.append(f"saved as {name}")
        for note in notes:
            problem(path.name, "normalised", f"{path.name}: {note}", "info")
        if not caption.replace(TRIGGER_PLACEHOLDER, "").strip():
            problem(path.name, "empty_caption", f"{path.name}: empty caption; trains on {trigger!r} alone")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (tmp / name).write_bytes(buf.getvalue())
        digests[name] = hashlib.sha256(buf.getvalue()).hexdigest()
        report.images.append(
            PreparedImage(
                file_name=name, source=path.name, width=img.width, height=img.height,
                text=apply_trigger(caption, trigger),
            )
        )
    return digests


def _output_name(file_name: str) -> str:
    """`0001.jpg` -> `0001.png`: unicode (NFC) and spaces kept, separators and controls made `_`."""
    stem = unicodedata.normalize("NFC", Path(file_name).stem)
    stem = _UNSAFE_CHARS.sub("_", stem).strip(" .")
    return f"{stem or 'image'}.png"


def _content_hash(images: list[PreparedImage], digests: dict[str, str], metadata: bytes) -> str:
    h = hashlib.sha256()
    for item in images:
        h.update(f"{item.file_name}\0{digests[item.file_name]}\n".encode("utf-8"))
    h.update(metadata)
    return h.hexdigest()


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, moving an earlier dataset aside first and deleting it after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)


def _summary(errors: list[Problem], limit: int = 5) -> str:
    text = "; ".join(p.message for p in errors[:limit])
    return text + (f"; and {len(errors) - limit} more" if len(errors) > limit else "")
