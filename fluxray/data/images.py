"""Decode one uploaded image into plain 8-bit sRGB, refusing files that are unsafe or unreadable.

Each change from the stored file (EXIF rotation, transparency, colour mode, extra frames) is
added to `notes`, so the prepare report can say what happened to every image.
"""

import io
import re
from pathlib import Path

from PIL import ExifTags, Image, ImageCms, ImageOps

from fluxray.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# 8000x8000: far above any training bucket, far below what a decompression bomb asks for.
MAX_PIXELS = 64_000_000
# Only these decoders run on uploads (the JPEG one also opens multi-picture phone JPEGs).
_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
_MODE_NAMES = {"1": "black-and-white", "L": "greyscale"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageError(DatasetError):
    """An image that cannot be used; `kind` is its problem kind in the prepare report."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def load_image(path: Path, notes: list[str] | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path` as RGB, upright; raises `ImageError` naming the file.

    The size is checked from the header before any pixel is decoded. Transparent pixels are
    composited on white, 16-bit greyscale is scaled to 8 bits, an embedded colour profile is
    converted to sRGB, and of an animation only the first frame is kept.
    """
    path = Path(path)
    notes = [] if notes is None else notes
    with path.open("rb") as f:
        head = f.read(16)
        if not head:
            raise ImageError(f"{path.name}: empty file (0 bytes)", "corrupt_image")
        f.seek(0)
        try:
            img = Image.open(f, formats=_FORMATS)  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path.name}: {_bomb_size(e)}, over the {_mp(max_pixels)} limit", "too_large")
        except _DECODE_ERRORS as e:
            if head.startswith(_MAGIC):
                raise ImageError(f"{path.name}: damaged image header ({e})", "corrupt_image")
            raise ImageError(f"{path.name}: not an image file (it starts with {head[:8]!r})", "not_an_image")
        with img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(
                    f"{path.name}: {w}x{h} is {_mp(w * h)}, over the {_mp(max_pixels)} limit", "too_large"
                )
            try:
                # A phone's multi-picture JPEG is one photo plus a preview, not an animation.
                frames = getattr(img, "n_frames", 1) if img.format != "MPO" else 1
                img.seek(0)
                img.load()
                out = _to_rgb(img, notes)
            except _DECODE_ERRORS as e:
                raise ImageError(f"{path.name}: damaged image data ({e})", "corrupt_image")
    if frames > 1:
        notes.append(f"{frames} frames; used the first")
    return out


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError):
        orientation = 1
        notes.append("unreadable EXIF; orientation not applied")
    if orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    icc = img.info.get("icc_profile")
    mode = img.mode
    if mode.startswith("I"):  # 16-bit greyscale PNG; `convert` would clip it to white
        img = img.convert("I").point(lambda v: v / 256).convert("L")
        notes.append(f"16-bit greyscale ({mode}) scaled to 8-bit RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            notes.append("transparent pixels composited on white")
        img = rgba.convert("RGB")
    if icc and img.mode in ("RGB", "L", "CMYK"):
        img = _to_srgb(img, icc, notes)
    if img.mode != "RGB":
        if img.mode != "P" and not mode.startswith("I"):  # a palette converts losslessly
            notes.append(f"{_MODE_NAMES.get(img.mode, img.mode)} converted to RGB")
        img = img.convert("RGB")
    return img


def _to_srgb(img: Image.Image, icc: bytes, notes: list[str]) -> Image.Image:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        name = ImageCms.getProfileDescription(profile).strip()
        if "srgb" in name.lower():
            return img
        out = ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        notes.append("unreadable colour profile; pixel values used as stored")
        return img
    notes.append(f"colour profile {name!r} converted to sRGB")
    return out


def _bomb_size(e: Exception) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(e))
    return _mp(int(pixels.group(1))) if pixels else str(e)


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} MP"
