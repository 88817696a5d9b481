"""Uploads: image files (or one zip) and a captions file, into `<root>/uploads/<id>/`, then prepared.

Every name is checked before anything is written: no path traversal, no absolute or hidden
names, no zip-slip. Sizes and counts are bounded, and the upload folder is never modified once
written; `prepare_dataset` reads it into `<root>/datasets/<id>/`.
"""

from __future__ import annotations

import re
import shutil
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fluxray.data.captions import normalize_trigger
from fluxray.data.prepare import PrepareReport, prepare_dataset
from fluxray.errors import DatasetError, FluxrayError

_CHUNK = 1 << 20
_DATASET_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,80}$")
# Archive entries that zip tools add and nobody means as data.
_ZIP_NOISE = ("__MACOSX/",)


class UploadError(FluxrayError):
    """An upload refused before anything was written; `status` is the HTTP code (400 or 413)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_files: int = 500
    max_bytes: int = 512 << 20
    max_file_bytes: int = 100 << 20


def _check_path(name: str, where: str) -> list[str]:
    """The parts of `name`, or UploadError for a name that could leave its folder."""
    path = name.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path) or ".." in path.split("/"):
        raise UploadError(f"{where}: {name!r} is an absolute or parent-relative path; refused")
    if re.search(r"[\x00-\x1f\x7f]", path):
        raise UploadError(f"{where}: {name!r} holds control characters; refused")
    return path.split("/")


def safe_name(name: str | None, where: str = "upload") -> str:
    """The base name of an uploaded file, or UploadError for a name that tries to leave its folder.

    Folders in a name (`pxco/0001.png`, as a browser's folder upload sends) are dropped;
    `..`, absolute paths, drive letters, control characters and hidden names are refused.
    """
    if not name:
        raise UploadError(f"{where}: a file has no name")
    base = _check_path(name, where)[-1]
    if not base or base.startswith("."):
        raise UploadError(f"{where}: {name!r} is not a plain file name; refused")
    return base


def new_id(trigger: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', trigger)[:40]}-{uuid.uuid4().hex[:8]}"


def dataset_dir(root: Path, dataset_id: str) -> Path:
    """The prepared dataset `dataset_id`; DatasetError for an id that names nothing."""
    path = Path(root) / "datasets" / dataset_id
    if not _DATASET_ID.match(dataset_id) or not (path / "dataset.json").is_file():
        raise DatasetError(f"dataset_id: no prepared dataset {dataset_id!r}; upload one with POST /v1/datasets")
    return path


def _zip_entries(zf: zipfile.ZipFile, limits: Limits) -> list[tuple[str, zipfile.ZipInfo]]:
    """(safe base name, entry) of each file in the archive; any unsafe name refuses the whole zip."""
    out, total = [], 0
    for info in zf.infolist():
        base = _check_path(info.filename, "zip")[-1]  # every entry, even those skipped below
        if info.is_dir() or info.filename.startswith(_ZIP_NOISE) or base.startswith("."):
            continue
        if info.file_size > limits.max_file_bytes:
            raise UploadError(f"zip: {info.filename}: {info.file_size} bytes uncompressed, more than the per-file "
                              f"limit of {limits.max_file_bytes} (max_file_mb)", 413)
        total += info.file_size
        out.append((base, info))
    if len(out) > limits.max_files:
        raise UploadError(f"zip: {len(out)} files, more than the limit of {limits.max_files} (max_upload_files)", 413)
    if total > limits.max_bytes:
        raise UploadError(f"zip: {total} bytes uncompressed, more than the limit of {limits.max_bytes} "
                          "(max_upload_mb)", 413)
    return out


def _copy(src: BinaryIO, dst: Path, budget: int, name: str, limits: Limits) -> int:
    """Copy in chunks; refuse a file over the per-file limit, or once the upload's byte budget is
    spent (a zip's sizes can lie)."""
    n = 0
    with open(dst, "xb") as out:
        while chunk := src.read(_CHUNK):
            n += len(chunk)
            if n > limits.max_file_bytes:
                raise UploadError(f"{name}: larger than the per-file limit of {limits.max_file_bytes} bytes "
                                  "(max_file_mb)", 413)
            if n > budget:
                raise UploadError(f"{name}: the upload is larger than the limit of {limits.max_bytes} bytes "
                                  "(max_upload_mb)", 413)
            out.write(chunk)
    return n


def save_upload(root: Path, files: list[tuple[str | None, BinaryIO]], captions: tuple[str | None, BinaryIO] | None,
                trigger_word: str, limits: Limits) -> tuple[str, PrepareReport]:
    """Write the upload to `<root>/uploads/<id>/`, prepare it into `<root>/datasets/<id>/`.

    `files` are (client file name, stream): images, or a single zip of images (and captions).
    Returns (dataset id, report); raises UploadError, DatasetError or PrepareError.
    """
    trigger = normalize_trigger(trigger_word)
    if not files:
        raise UploadError("images: no files uploaded")
    if len(files) > limits.max_files:
        raise UploadError(f"images: {len(files)} files, more than the limit of {limits.max_files} (max_upload_files)",
                          413)
    names = [safe_name(n, "images") for n, _ in files]
    zf = None
    if len(files) == 1 and zipfile.is_zipfile(files[0][1]):
        files[0][1].seek(0)
        try:
            zf = zipfile.ZipFile(files[0][1])
        except zipfile.BadZipFile as e:
            raise UploadError(f"{names[0]}: not a readable zip: {e}") from None
        entries = _zip_entries(zf, limits)
        names = [n for n, _ in entries]
    else:
        for _, f in files:
            f.seek(0)
    cap_name = safe_name(captions[0], "captions") if captions else None
    every = names + ([cap_name] if cap_name else [])
    dupes = sorted({n for n in every if every.count(n) > 1})
    if dupes:
        raise UploadError(f"images: {', '.join(dupes)} uploaded more than once")

    dataset_id = new_id(trigger)
    upload = Path(root) / "uploads" / dataset_id
    upload.mkdir(parents=True)
    budget = limits.max_bytes
    try:
        if zf is not None:
            for name, info in entries:
                try:
                    with zf.open(info) as src:
                        budget -= _copy(src, upload / name, budget, f"zip: {info.filename}", limits)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
                    # damaged, truncated, encrypted or an unknown compression method
                    raise UploadError(f"zip: {info.filename}: cannot be extracted: {e}") from None
        else:
            for name, (_, f) in zip(names, files):
                budget -= _copy(f, upload / name, budget, name, limits)
        if cap_name:
            captions[1].seek(0)
            _copy(captions[1], upload / cap_name, budget, cap_name, limits)
    except UploadError:
        shutil.rmtree(upload)
        raise
    try:
        report = prepare_dataset(upload, upload / cap_name if cap_name else None, trigger_word=trigger,
                                 out_dir=Path(root) / "datasets" / dataset_id)
    except FluxrayError:
        shutil.rmtree(upload)  # no dataset refers to it
        raise
    return dataset_id, report
