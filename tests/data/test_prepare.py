import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fluxray.data.prepare import (
    DatasetInfo,
    PrepareError,
    PrepareReport,
    is_prepared,
    prepare_dataset,
    read_prepared,
)
from fluxray.data.sample import make_sample_images
from fluxray.errors import DatasetError

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "pxco"


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def upload(tmp_path) -> Path:
    """A small valid upload: 4 images with captions.json."""
    make_sample_images(tmp_path / "upload", n=4, size=48)
    return tmp_path / "upload"


def set_captions(upload: Path, **changes: str | None) -> None:
    path = upload / "captions.json"
    captions = json.loads(path.read_text())
    for name, text in changes.items():
        name = name.replace("_", ".")
        if text is None:
            captions.pop(name)
        else:
            captions[name] = text
    path.write_text(json.dumps(captions))


def problems(report: PrepareReport) -> set[tuple[str, str, str]]:
    return {(p.file_name, p.kind, p.severity) for p in report.problems}


#: The `upload` fixture's captions file and trigger.txt, in every report: each file is accounted for.
UPLOAD_FILES = {("captions.json", "other_file", "info"), ("trigger.txt", "other_file", "info")}


def test_bundled_sample(tmp_path):
    before = snapshot(SAMPLE)
    trigger = (SAMPLE / "trigger.txt").read_text().strip()
    captions = json.loads((SAMPLE / "captions.json").read_text())
    report = prepare_dataset(SAMPLE, trigger_word=trigger, out_dir=tmp_path / "ds")

    assert snapshot(SAMPLE) == before
    assert trigger == "pxco" and problems(report) == UPLOAD_FILES
    lines = [json.loads(line) for line in (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines()]
    assert [x["file_name"] for x in lines] == [f"{i:04d}.png" for i in range(1, 19)]
    for line in lines:
        caption = captions[line["file_name"]]
        if "[trigger]" in caption:
            assert line["text"] == caption.replace("[trigger]", "pxco")
        else:
            assert line["text"] == f"pxco, {caption}"
    assert sum("[trigger]" in c for c in captions.values()) >= 2

    dataset = read_prepared(tmp_path / "ds")
    assert dataset.info.trigger_word == "pxco" and dataset.info.num_images == 18
    assert [(p.name, t) for p, t in dataset.items] == [(x["file_name"], x["text"]) for x in lines]
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text()).keys() == {
        "trigger_word", "num_images", "content_hash", "source", "created"
    }
    assert PrepareReport.model_validate_json((tmp_path / "ds" / "report.json").read_text()) == report


def test_bundled_sample_stays_small():
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) < 1_500_000
    assert len(list(SAMPLE.glob("*.png"))) == 18


def test_broken_upload_reports_every_file_and_fails_on_the_orphan_caption(upload, tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((48, 48), 40).save(buf, "PNG")
    (upload / "corrupt.png").write_bytes(buf.getvalue()[:200])
    (upload / "notes.png").write_text("not a picture")
    Image.new("RGB", (16, 16)).save(upload / "uncaptioned.png")
    set_captions(upload, corrupt_png="a man", notes_png="a man", ghost_png="a man who is not there")
    before = snapshot(upload)
    out = tmp_path / "ds"

    with pytest.raises(PrepareError, match=r"ghost\.png") as e:
        prepare_dataset(upload, trigger_word="pxco", out_dir=out)
    assert problems(e.value.report) == {
        ("corrupt.png", "corrupt_image", "warning"),
        ("notes.png", "not_an_image", "warning"),
        ("uncaptioned.png", "missing_caption", "warning"),
        ("ghost.png", "caption_without_image", "error"),
        *UPLOAD_FILES,
    }
    assert "ghost.png" in e.value.report.format()
    assert not out.exists() and list(tmp_path.iterdir()) == [upload]  # no half dataset, no temp dir
    assert snapshot(upload) == before

    set_captions(upload, ghost_png=None)
    before = snapshot(upload)
    report = prepare_dataset(upload, trigger_word="pxco", out_dir=out)
    assert [i.file_name for i in report.images] == ["0001.png", "0002.png", "0003.png", "0004.png"]
    assert {p[0] for p in problems(report)} == {"corrupt.png", "notes.png", "uncaptioned.png", "captions.json",
                                                  "trigger.txt"}
    assert all(name in report.format() for name in ("corrupt.png", "notes.png", "uncaptioned.png"))
    assert snapshot(upload) == before
    assert sorted(p.name for p in out.iterdir()) == [
        "0001.png", "0002.png", "0003.png", "0004.png", "dataset.json", "metadata.jsonl", "report.json"
    ]


def test_strict_makes_warnings_fatal(upload, tmp_path):
    Image.new("RGB", (16, 16)).save(upload / "uncaptioned.png")
    with pytest.raises(PrepareError, match=r"uncaptioned\.png") as e:
        prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "ds", strict=True)
    assert problems(e.value.report) == {("uncaptioned.png", "missing_caption", "error"), *UPLOAD_FILES}
    assert not (tmp_path / "ds").exists()


def test_normalisations_are_reported_and_applied(upload, tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(upload / "0005.JPG", exif=exif)
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(upload / "0006.png")
    set_captions(upload, **{"0005_JPG": "rotated", "0006_png": "clear"})
    report = prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "ds", strict=True)
    assert problems(report) == {("0005.JPG", "normalised", "info"), ("0006.png", "normalised", "info"),
                                *UPLOAD_FILES}
    with Image.open(tmp_path / "ds" / "0005.png") as out:
        assert out.size == (10, 30) and out.mode == "RGB"
    with Image.open(tmp_path / "ds" / "0006.png") as out:
        assert out.getpixel((5, 5)) == (255, 255, 255)


def test_unicode_spaces_and_unsafe_names(tmp_path):
    src = tmp_path / "up"
    src.mkdir()
    names = ["café photo 1.jpg", "cafe\u0301 2.webp", "a\\b.png", "日本語.gif"]
    for name in names:
        Image.new("RGB", (8, 8), (0, 90, 0)).save(src / name)
    (src / "captions.json").write_text(json.dumps({n: f"caption of {n}" for n in names}))
    before = snapshot(src)
    report = prepare_dataset(src, trigger_word="pxco", out_dir=tmp_path / "ds")
    assert {i.source: i.file_name for i in report.images} == {
        "café photo 1.jpg": "café photo 1.png",
        "cafe\u0301 2.webp": "caf\u00e9 2.png",  # NFC
        "a\\b.png": "a_b.png",
        "日本語.gif": "日本語.png",
    }
    dataset = read_prepared(tmp_path / "ds")
    assert {p.name for p, _ in dataset.items} == {i.file_name for i in report.images}
    assert all(p.is_file() and p.parent == tmp_path / "ds" for p, _ in dataset.items)
    assert snapshot(src) == before


def test_duplicate_names_keep_the_first_with_a_caption(upload, tmp_path):
    shutil.copy(upload / "0001.png", upload / "0001.PNG")
    Image.new("RGB", (8, 8)).save(upload / "0002.jpg")
    set_captions(upload, **{"0002_jpg": "the jpeg"})
    report = prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "ds")
    assert problems(report) == {
        ("0001.PNG", "duplicate_name", "warning"),  # sorts first, but has no caption
        ("0002.png", "duplicate_name", "warning"),  # both captioned: "0002.jpg" sorts first
        *UPLOAD_FILES,
    }
    assert {i.source for i in report.images} == {"0001.png", "0002.jpg", "0003.png", "0004.png"}
    assert report.images[1].text == "pxco, the jpeg"


def test_empty_caption_trains_on_the_trigger(upload, tmp_path):
    set_captions(upload, **{"0001_png": "  ", "0002_png": "[trigger]"})
    report = prepare_dataset(upload, trigger_word=" pxco ", out_dir=tmp_path / "ds")
    assert problems(report) == {
        ("0001.png", "empty_caption", "warning"),
        ("0002.png", "empty_caption", "warning"),
        *UPLOAD_FILES,
    }
    assert [i.text for i in report.images[:2]] == ["pxco", "pxco"]


def test_sidecars_and_stem_keys(tmp_path):
    src = tmp_path / "up"
    src.mkdir()
    for name in ("a.png", "b.jpeg"):
        Image.new("RGB", (8, 8)).save(src / name)
    (src / "a.txt").write_text("first\n")
    (src / "b.txt").write_text("second [trigger]")
    (src / "cover.heic").write_bytes(b"x")
    (src / ".DS_Store").write_bytes(b"x")
    (src / "extra").mkdir()
    report = prepare_dataset(src, trigger_word="pxco", out_dir=tmp_path / "ds")
    assert [(i.file_name, i.text) for i in report.images] == [
        ("a.png", "pxco, first"),
        ("b.png", "second pxco"),
    ]
    assert problems(report) == {
        ("cover.heic", "unsupported_file", "warning"),
        ("extra", "unsupported_file", "warning"),
        ("a.txt", "other_file", "info"),  # every file is accounted for: the sidecars it read,
        ("b.txt", "other_file", "info"),
        (".DS_Store", "other_file", "info"),  # and the hidden file it skipped
    }

    captions = tmp_path / "by_stem.json"
    captions.write_text(json.dumps({"a": "one", "B.JPEG": "two"}))
    report = prepare_dataset(src, captions, trigger_word="pxco", out_dir=tmp_path / "ds2")
    assert [i.text for i in report.images] == ["pxco, one", "pxco, two"]
    # The captions came from a file: the sidecars were not read, and the report says so.
    assert {(p.file_name, p.kind) for p in report.problems if p.file_name.endswith(".txt")} == {
        ("a.txt", "unsupported_file"), ("b.txt", "unsupported_file")}


def test_report_accounts_for_every_file_it_did_not_use(upload, tmp_path):
    (upload / "notes.txt").write_text("shoot on Tuesday")
    (upload / ".hidden.png").write_bytes(b"x")
    (upload / "Thumbs.db").write_bytes(b"x")
    report = prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "ds")
    assert len(report.images) == 4
    assert problems(report) == {
        ("notes.txt", "unsupported_file", "warning"),
        *UPLOAD_FILES,
        (".hidden.png", "other_file", "info"),
        ("Thumbs.db", "other_file", "info"),
    }
    why = {p.file_name: p.message for p in report.problems}
    assert "not used" in why["notes.txt"] and "read for the captions" in why["captions.json"]
    assert "hidden" in why[".hidden.png"] and "'pxco'" in why["trigger.txt"]
    assert "notes.txt" in report.format()


def test_no_images_or_no_captions(tmp_path):
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "captions.json").write_text('{"a.png": "x"}')
    with pytest.raises(PrepareError, match="a.png"):
        prepare_dataset(tmp_path / "up", trigger_word="pxco", out_dir=tmp_path / "ds")
    (tmp_path / "up" / "captions.json").unlink()
    Image.new("RGB", (8, 8)).save(tmp_path / "up" / "a.png")
    with pytest.raises(DatasetError, match="no captions found"):
        prepare_dataset(tmp_path / "up", trigger_word="pxco", out_dir=tmp_path / "ds")
    (tmp_path / "up" / "a.txt").write_text("x")
    (tmp_path / "up" / "a.png").write_text("x")
    with pytest.raises(PrepareError, match="no usable images"):
        prepare_dataset(tmp_path / "up", trigger_word="pxco", out_dir=tmp_path / "ds")
    with pytest.raises(DatasetError, match="missing does not exist"):
        prepare_dataset(tmp_path / "missing", trigger_word="pxco", out_dir=tmp_path / "ds")


def test_bad_trigger_fails_before_anything(upload, tmp_path):
    with pytest.raises(DatasetError, match="'px co'"):
        prepare_dataset(upload, trigger_word="px co", out_dir=tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_content_hash_is_reproducible(upload, tmp_path):
    first = prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "a")
    second = prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "b")
    assert first.content_hash == second.content_hash
    info = DatasetInfo.model_validate_json((tmp_path / "a" / "dataset.json").read_text())
    assert info.content_hash == first.content_hash
    set_captions(upload, **{"0001_png": "changed"})
    changed = prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "c")
    assert changed.content_hash != first.content_hash


def test_out_dir_rules(upload, tmp_path):
    with pytest.raises(DatasetError, match="overlaps"):
        prepare_dataset(upload, trigger_word="pxco", out_dir=upload / "prepared")
    with pytest.raises(DatasetError, match="overlaps"):
        prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        prepare_dataset(upload, trigger_word="pxco", out_dir=tmp_path / "taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"

    out = tmp_path / "ds"
    prepare_dataset(upload, trigger_word="pxco", out_dir=out)
    assert is_prepared(out) and not is_prepared(upload)
    (upload / "0004.png").unlink()
    set_captions(upload, **{"0004_png": None})
    prepare_dataset(upload, trigger_word="zq", out_dir=out)  # replaces the earlier dataset
    assert read_prepared(out).info.num_images == 3 and read_prepared(out).info.trigger_word == "zq"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "taken", "upload"]


@pytest.mark.parametrize(
    "file_name, message",
    [
        ("../outside.png", "points outside"),
        ("/etc/passwd", "points outside"),
        ("sub/0001.png", "points outside"),
        ("..", "points outside"),
        ("missing.png", "does not exist"),
    ],
)
def test_read_prepared_rejects_bad_names(upload, tmp_path, file_name, message):
    out = tmp_path / "ds"
    prepare_dataset(upload, trigger_word="pxco", out_dir=out)
    (tmp_path / "outside.png").write_bytes((out / "0001.png").read_bytes())
    meta = out / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    lines[1] = json.dumps({"file_name": file_name, "text": "pxco"})
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=f"metadata.jsonl line 2: file_name .* {message}"):
        read_prepared(out)


def test_read_prepared_needs_its_files(upload, tmp_path):
    out = tmp_path / "ds"
    prepare_dataset(upload, trigger_word="pxco", out_dir=out)
    (out / "dataset.json").write_text('{"trigger_word": "pxco"}')
    with pytest.raises(DatasetError, match="dataset.json: not a valid"):
        read_prepared(out)
    (out / "metadata.jsonl").unlink()
    with pytest.raises(DatasetError, match="metadata.jsonl is missing"):
        read_prepared(out)


def test_sample_images_are_deterministic(tmp_path):
    first = make_sample_images(tmp_path / "a", n=3, size=32)
    second = make_sample_images(tmp_path / "b", n=3, size=32)
    assert first == second and snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    assert len({hashlib.sha256((tmp_path / "a" / n).read_bytes()).digest() for n in first}) == 3
