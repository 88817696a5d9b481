import io
import struct
import time
import zlib

import pytest
from PIL import Image, ImageCms

from fluxray.data.images import ImageError, load_image
from fluxray.errors import DatasetError


def png_header_only(path, width, height):
    """A PNG whose header claims `width`x`height` but holds no pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def load(path, **kwargs):
    notes = []
    return load_image(path, notes, **kwargs), notes


def test_rgb_png_unchanged(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path)
    img, notes = load(path)
    assert (img.mode, img.size, img.getpixel((0, 0)), notes) == ("RGB", (8, 6), (10, 20, 30), [])


def test_notes_are_optional(tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (4, 4), 9).save(path)
    assert load_image(path).mode == "RGB"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file \(0 bytes\)") as e:
        load_image(path)
    assert e.value.kind == "corrupt_image" and isinstance(e.value, DatasetError)


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: damaged image data") as e:
        load_image(path)
    assert e.value.kind == "corrupt_image"


def test_png_cut_inside_the_header_is_corrupt_not_foreign(tmp_path):
    path = tmp_path / "stub.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert e.value.kind == "corrupt_image" and "stub.png" in str(e.value)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are my notes, not a picture")
    with pytest.raises(ImageError, match=r"notes\.png: not an image file") as e:
        load_image(path)
    assert e.value.kind == "not_an_image"


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.new("I;16", (4, 4), 40000).save(path)
    img, notes = load(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256
    assert any("16-bit" in n for n in notes)


def test_greyscale(tmp_path):
    path = tmp_path / "grey.jpg"
    Image.new("L", (8, 8), 128).save(path)
    img, notes = load(path)
    assert img.mode == "RGB" and abs(img.getpixel((0, 0))[0] - 128) <= 2
    assert notes == ["greyscale converted to RGB"]


def test_rgba_is_composited_on_white(tmp_path):
    path = tmp_path / "cutout.png"
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0, 0))
    img.save(path)
    out, notes = load(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)
    assert notes == ["transparent pixels composited on white"]


def test_opaque_rgba_is_dropped_silently(tmp_path):
    path = tmp_path / "opaque.png"
    Image.new("RGBA", (4, 4), (1, 2, 3, 255)).save(path)
    out, notes = load(path)
    assert out.getpixel((0, 0)) == (1, 2, 3) and notes == []


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "pal.png"
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.save(path, transparency=0)
    out, notes = load(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (0, 200, 0)
    assert "transparent pixels composited on white" in notes


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # red in CMYK
    img, notes = load(path)
    r, g, b = img.getpixel((4, 4))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60
    assert notes == ["CMYK converted to RGB"]


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(path, exif=exif, quality=95)
    out, notes = load(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left edge is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    assert notes == ["EXIF orientation 6 applied"]


def test_animated_gif_uses_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    img, notes = load(path)
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert "3 frames; used the first" in notes


def test_bomb_guard_trips_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    png_header_only(path, 20000, 20000)
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"huge\.png: 400 MP, over the 64 MP limit") as e:
        load_image(path)
    assert e.value.kind == "too_large" and time.perf_counter() - start < 1


def test_own_pixel_limit_names_the_size(tmp_path):
    path = tmp_path / "big.png"
    png_header_only(path, 9000, 8000)  # 72 MP: under Pillow's limit, over ours
    with pytest.raises(ImageError, match=r"big\.png: 9000x8000 is 72 MP, over the 64 MP limit"):
        load_image(path)
    Image.new("RGB", (20, 10)).save(path)
    with pytest.raises(ImageError, match=r"20x10 is 0 MP"):
        load_image(path, max_pixels=100)


def test_srgb_profile_is_left_alone(tmp_path):
    path = tmp_path / "srgb.png"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 4), (10, 200, 30)).save(path, icc_profile=icc)
    img, notes = load(path)
    assert img.getpixel((0, 0)) == (10, 200, 30) and notes == []


def test_other_profiles_are_converted_to_srgb(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 4), (10, 200, 30)).save(path, icc_profile=icc)
    monkeypatch.setattr(ImageCms, "getProfileDescription", lambda profile: "Display P3")
    img, notes = load(path)
    assert img.mode == "RGB" and all(abs(a - b) <= 2 for a, b in zip(img.getpixel((0, 0)), (10, 200, 30)))
    assert notes == ["colour profile 'Display P3' converted to sRGB"]


@pytest.mark.parametrize("name, fmt", [("a.webp", "WEBP"), ("b.bmp", "BMP"), ("c.JPEG", "JPEG")])
def test_other_formats(tmp_path, name, fmt):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / name, fmt)
    img, notes = load(tmp_path / name)
    assert img.size == (8, 8) and img.getpixel((4, 4))[2] > 200 and notes == []


def test_unreadable_profile_is_noted(tmp_path):
    path = tmp_path / "badicc.png"
    Image.new("RGB", (4, 4), (10, 200, 30)).save(path, icc_profile=b"not a profile")
    img, notes = load(path)
    assert img.getpixel((0, 0)) == (10, 200, 30)
    assert notes == ["unreadable colour profile; pixel values used as stored"]


def test_source_file_is_only_read(tmp_path):
    path = tmp_path / "ro.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0o444)
    before = path.read_bytes()
    load_image(path)
    assert path.read_bytes() == before
