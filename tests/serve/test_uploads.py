"""Uploads: names that try to leave the upload folder are refused before anything is written;
sizes and counts are bounded; a good upload is prepared."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from fluxray.errors import DatasetError
from fluxray.serve.uploads import Limits, UploadError, dataset_dir, safe_name, save_upload

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "pxco"
CAPTIONS = json.loads((SAMPLES / "captions.json").read_text())


def zipped(entries: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    buf.seek(0)
    return buf


def images(n: int) -> list[tuple[str, io.BytesIO]]:
    return [(name, io.BytesIO((SAMPLES / name).read_bytes())) for name in sorted(CAPTIONS)[:n]]


def captions(n: int) -> tuple[str, io.BytesIO]:
    return "captions.json", io.BytesIO(json.dumps({k: CAPTIONS[k] for k in sorted(CAPTIONS)[:n]}).encode())


def everything(root: Path) -> list[Path]:
    return sorted(root.parent.rglob("*"))


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:\\evil.png",
                                  "..\\evil.png", "evil\x00.png", ".hidden.png", "dir/", ""])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UploadError):
        safe_name(name)


def test_folders_in_a_name_are_dropped():
    assert safe_name("pxco/0001.png") == "0001.png"
    assert safe_name("pxco\\0001.png") == "0001.png"


@pytest.mark.parametrize("evil", ["../evil.png", "../../../../evil.png", "/tmp/evil.png", "ok/../../evil.png",
                                  "__MACOSX/../../evil.png"])
def test_zip_slip_refuses_the_whole_zip_and_writes_nothing(tmp_path, evil):
    root = tmp_path / "root"
    root.mkdir()
    before = everything(root)
    archive = zipped({"0001.png": (SAMPLES / "0001.png").read_bytes(), evil: b"x"})
    with pytest.raises(UploadError, match="refused") as e:
        save_upload(root, [("set.zip", archive)], None, "pxco", Limits())
    assert evil in str(e.value) and e.value.status == 400
    assert everything(root) == before


def test_a_zip_of_a_folder_is_prepared_without_the_zip_tools_noise(tmp_path):
    names = sorted(CAPTIONS)[:3]
    entries = {f"pxco/{n}": (SAMPLES / n).read_bytes() for n in names}
    entries["pxco/captions.json"] = json.dumps({n: CAPTIONS[n] for n in names}).encode()
    entries["__MACOSX/pxco/._0001.png"] = b"resource fork"
    entries["pxco/.DS_Store"] = b"finder"
    dataset_id, report = save_upload(tmp_path, [("pxco.zip", zipped(entries))], None, "pxco", Limits())
    assert [i.source for i in report.images] == names and not report.errors
    assert sorted(p.name for p in (tmp_path / "uploads" / dataset_id).iterdir()) == [*names, "captions.json"]
    assert dataset_dir(tmp_path, dataset_id) == tmp_path / "datasets" / dataset_id


def test_images_and_a_captions_file_are_prepared(tmp_path):
    dataset_id, report = save_upload(tmp_path, images(18), captions(18), " pxco ", Limits())
    assert len(report.images) == 18 and report.trigger_word == "pxco" and dataset_id.startswith("pxco-")
    assert all(i.text.startswith("pxco") for i in report.images)


def test_limits_on_count_and_bytes(tmp_path):
    with pytest.raises(UploadError, match="limit of 2") as e:
        save_upload(tmp_path, images(3), captions(3), "pxco", Limits(max_files=2))
    assert e.value.status == 413
    with pytest.raises(UploadError, match="larger than the limit") as e:
        save_upload(tmp_path, images(3), captions(3), "pxco", Limits(max_bytes=20_000))
    assert e.value.status == 413
    archive = zipped({n: (SAMPLES / n).read_bytes() for n in sorted(CAPTIONS)[:3]})
    with pytest.raises(UploadError, match="uncompressed"):
        save_upload(tmp_path, [("set.zip", archive)], None, "pxco", Limits(max_bytes=20_000))
    assert not list((tmp_path / "uploads").iterdir())  # a refused upload leaves no folder


def test_duplicates_bad_trigger_and_failed_prepare(tmp_path):
    twice = images(1) + [("pxco/0001.png", io.BytesIO(b"again"))]
    with pytest.raises(UploadError, match="more than once"):
        save_upload(tmp_path, twice, None, "pxco", Limits())
    with pytest.raises(DatasetError, match="one token"):
        save_upload(tmp_path, images(1), captions(1), "two words", Limits())
    with pytest.raises(DatasetError, match="0002.png"):  # a caption names an image not uploaded
        save_upload(tmp_path, images(1), captions(2), "pxco", Limits())
    assert not list((tmp_path / "uploads").iterdir())  # nothing refers to a failed upload
    assert not list((tmp_path / "datasets").glob("pxco-*"))
    with pytest.raises(DatasetError, match="no prepared dataset"):
        dataset_dir(tmp_path, "../datasets")


def test_a_damaged_zip_entry_is_a_400_not_a_crash(tmp_path):
    archive = zipped({"0001.png": (SAMPLES / "0001.png").read_bytes()}).getvalue()
    data = bytearray(archive)
    at = data.index(b"\x89PNG")
    data[at + 100:at + 110] = b"\x00" * 10  # corrupt the stored bytes: the CRC check fails
    with pytest.raises(UploadError, match="cannot be extracted") as e:
        save_upload(tmp_path, [("set.zip", io.BytesIO(bytes(data)))], None, "pxco", Limits())
    assert e.value.status == 400 and not list((tmp_path / "uploads").iterdir())
