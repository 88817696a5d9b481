"""Issue 7's bad-input corpus through the real `fluxray` command, in subprocesses: each input ends
in a clear error that names the file, key or value, or in a documented normalisation, and never
in a traceback. The library-level cases are in tests/data/ and tests/test_config.py."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fluxray.data.sample import make_sample_images

REPO = Path(__file__).resolve().parents[2]
FLUXRAY = str(Path(sys.executable).parent / "fluxray")


def fluxray(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([FLUXRAY, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


# -- images and names: one upload holds them all --------------------------------------------

def _truncated(path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _rgba(path: Path) -> None:
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    img.putpixel((0, 0), (255, 0, 0, 0))
    img.save(path)


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.new("RGB", (32, 16), (200, 0, 0)).save(path, exif=exif)


def _animated(path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)


#: name in the upload -> (how it is written, report kind, words of its report line). Every one is
#: captioned; each is skipped with a warning naming it, kept with a note saying what changed, or
#: (kind None) kept exactly as named.
IMAGES = {
    "cut.png": (_truncated, "corrupt_image", "damaged image data"),
    "empty.png": (lambda p: p.write_bytes(b""), "corrupt_image", "empty file (0 bytes)"),
    "notes.png": (lambda p: p.write_text("not a picture"), "not_an_image", "not an image file"),
    "deep.png": (lambda p: Image.new("I;16", (16, 16), 40000).save(p), "normalised", "16-bit greyscale"),
    "grey.jpg": (lambda p: Image.new("L", (16, 16), 128).save(p), "normalised", "greyscale converted to RGB"),
    "cutout.png": (_rgba, "normalised", "transparent pixels composited on white"),
    "print.jpg": (lambda p: Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p), "normalised",
                  "CMYK converted to RGB"),
    "phone.jpg": (_exif_rotated, "normalised", "EXIF orientation 6 applied"),
    # A real bomb: 48 kB of PNG that decodes to 400 megapixels.
    "huge.png": (lambda p: Image.new("1", (20000, 20000)).save(p), "too_large", "400 MP, over the 64 MP limit"),
    "anim.gif": (_animated, "normalised", "3 frames; used the first"),
    "café photo 1.png": (lambda p: Image.new("RGB", (16, 16)).save(p), None, ""),
    "cafe\u0301 2.png": (lambda p: Image.new("RGB", (16, 16)).save(p), "normalised", "saved as caf\u00e9 2.png"),
    "0001.PNG": (lambda p: shutil.copy(p.with_name("0001.png"), p), "duplicate_name",
                 "same name as 0001.png apart from case"),
}
SKIPPED = {name for name, (_, kind, _) in IMAGES.items() if kind not in ("normalised", None)}


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    """`fluxray prepare` over the image corpus, lenient and --strict."""
    tmp = tmp_path_factory.mktemp("corpus")
    up = tmp / "upload"
    make_sample_images(up, n=2, size=32)
    captions = json.loads((up / "captions.json").read_text())
    for name, (write, _, _) in IMAGES.items():
        write(up / name)
        if name != "0001.PNG":  # its twin 0001.png has the caption
            captions[name] = f"a photo called {name}"
    (up / "captions.json").write_text(json.dumps(captions, ensure_ascii=False))
    lenient = fluxray("prepare", str(up), "--trigger", "pxco", "--out", str(tmp / "ds"))
    strict = fluxray("prepare", str(up), "--trigger", "pxco", "--out", str(tmp / "strict"), "--strict")
    return tmp, lenient, strict


def _line(output: str, name: str) -> str | None:
    lines = [ln for ln in output.splitlines() if f"  {name}: " in ln]
    assert len(lines) <= 1, f"{name!r} is named more than once in:\n{output}"
    return lines[0] if lines else None


@pytest.mark.parametrize("name", IMAGES)
def test_each_bad_image_or_name_is_named_with_what_was_done(image_runs, name):
    tmp, lenient, strict = image_runs
    _, kind, words = IMAGES[name]
    assert lenient.returncode == 0, lenient.stderr
    prepared = {json.loads(x)["file_name"] for x in (tmp / "ds" / "metadata.jsonl").read_text().splitlines()}
    line = _line(lenient.stdout, name)
    if kind is None:
        assert line is None and name in prepared, (line, prepared)
        return
    assert line and kind in line and words in line, lenient.stdout
    if name in SKIPPED:
        assert line.lstrip().startswith("warning") and "skipped" in line
        assert not any(p.startswith(Path(name).stem + ".") for p in prepared - {"0001.png"})
    else:
        renamed = words.removeprefix("saved as ") if words.startswith("saved as ") else f"{Path(name).stem}.png"
        assert line.lstrip().startswith("info") and renamed in prepared, prepared
    # --strict turns every skip into an error that names the file, and prepares nothing.
    assert strict.returncode == 2 and not (tmp / "strict").exists()
    severity = _line(strict.stderr, name).split()[0]
    assert severity == ("error" if name in SKIPPED else "info"), strict.stderr


# -- captions and trigger words --------------------------------------------------------------

#: id -> (captions.json text, --trigger, exit code, words the output must hold)
CAPTIONS = {
    "malformed-json": ('{"0001.png": "a man",\n "0002.png": }', "pxco", 2, ["captions.json", "line 2"]),
    "wrong-type": ('{"0001.png": 5, "0002.png": "a man"}', "pxco", 2, ["captions.json", "'0001.png'"]),
    "not-a-mapping": ('"just a string"', "pxco", 2, ["captions.json", "got str"]),
    "empty-caption": ('{"0001.png": "  ", "0002.png": "a man"}', "pxco", 0,
                      ["0001.png: empty caption; trains on 'pxco' alone"]),
    "caption-without-image": ('{"0001.png": "a", "0002.png": "b", "ghost.png": "c"}', "pxco", 2,
                              ["ghost.png: has a caption but there is no such image"]),
    "trigger-empty": (None, "", 2, ["trigger_word", "''"]),
    "trigger-spaces": (None, "px co", 2, ["'px co'"]),
    "trigger-comma": (None, "px,co", 2, ["'px,co'"]),
    "trigger-padded": (None, "  pxco ", 0, ["trigger word 'pxco'"]),  # stripped: documented
}


@pytest.mark.parametrize("case", CAPTIONS)
def test_bad_captions_and_trigger_words(tmp_path, case):
    text, trigger, code, words = CAPTIONS[case]
    up = tmp_path / "upload"
    make_sample_images(up, n=2, size=32)
    if text is not None:
        (up / "captions.json").write_text(text)
    r = fluxray("prepare", str(up), "--trigger", trigger, "--out", str(tmp_path / "ds"))
    assert r.returncode == code, r.stdout + r.stderr
    out = r.stdout if code == 0 else r.stderr
    assert all(w in out for w in words), out
    if code:
        assert r.stderr.splitlines()[-1].startswith("fluxray prepare: error: ")
        assert not (tmp_path / "ds").exists()


# -- job configs: `fluxray config` and `fluxray train --local` --------------------------------

#: id -> (config YAML, words of the error): each names the key and the value.
CONFIGS = {
    "tabs": ("train:\n\tsteps: 3\n", ["line 2", "tabs"]),
    "unknown-key": ("train:\n  stpes: 100\n", ["train.stpes", "did you mean `train.steps`"]),
    "wrong-type": ("lora:\n  rank: sixteen\n", ["lora.rank", "'sixteen'"]),
    "negative-steps": ("train:\n  steps: -5\n", ["train.steps", "got -5"]),
    "rank-0": ("lora:\n  rank: 0\n", ["lora.rank", "got 0"]),
    "lr-0": ("train:\n  lr: 0\n", ["train.lr", "got 0"]),
    "not-a-mapping": ("- a\n- b\n", ["must be a mapping"]),
    "trigger-empty": ('dataset:\n  trigger_word: ""\n', ["dataset.trigger_word", "must not be empty, got ''"]),
    "trigger-spaces": ("dataset:\n  trigger_word: px co\n", ["dataset.trigger_word", "got 'px co'"]),
    "trigger-comma": ('dataset:\n  trigger_word: "px,co"\n', ["dataset.trigger_word", "got 'px,co'"]),
}


@pytest.mark.parametrize("command", ["config", "train"])
@pytest.mark.parametrize("case", CONFIGS)
def test_bad_config_names_key_and_value(tmp_path, case, command):
    text, words = CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    extra = ["--local", "--set", f"storage.root={tmp_path / 'root'}"] if command == "train" else []
    r = fluxray(command, "--config", str(path), *extra)
    assert r.returncode == 2 and r.stderr.startswith(f"fluxray {command}: error: "), r.stderr
    assert str(path) in r.stderr and all(w in r.stderr for w in words), r.stderr
    assert not (tmp_path / "root").exists()  # failed before anything was written


@pytest.mark.parametrize("sets, words", [
    (["train.batch_size=16"], ["train.batch_size (16)", "distributed.workers (2)", "18 examples"]),
    (["dataset.trigger_word=px,co"], ["'px,co'"]),
    (["dataset.path=samples/nowhere"], ["dataset.path", "samples/nowhere", "does not exist"]),
], ids=["batch-larger-than-dataset", "trigger-with-comma", "missing-dataset"])
def test_train_rejects_bad_input_before_training(tmp_path, sets, words):
    root = tmp_path / "root"
    r = fluxray("train", "--config", "configs/tiny.yaml", "--local", "--set", f"storage.root={root}",
                *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 2 and r.stderr.startswith("fluxray train: error: "), r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert not (root / "runs").exists()  # no run was started


def test_a_fifo_in_the_upload_is_reported_not_read(tmp_path):
    """A named pipe called `x.png` would block a reader forever; it is listed and skipped."""
    up = tmp_path / "upload"
    make_sample_images(up, n=2, size=32)
    os.mkfifo(up / "pipe.png")
    r = fluxray("prepare", str(up), "--trigger", "pxco", "--out", str(tmp_path / "ds"))
    assert r.returncode == 0, r.stderr
    assert "pipe.png" in _line(r.stdout, "pipe.png") and "not a regular file" in r.stdout, r.stdout


def test_a_prepared_dataset_keeps_the_trigger_its_captions_were_written_with(tiny_config):
    from fluxray.errors import ConfigError
    from fluxray.train.job import resolve_job

    with pytest.raises(ConfigError) as e:
        resolve_job(tiny_config("dataset.trigger_word=zxqv"))
    msg = str(e.value)
    assert msg.startswith("dataset.trigger_word: 'zxqv'") and "'pxco'" in msg and "fluxray prepare" in msg
    assert resolve_job(tiny_config("dataset.trigger_word=' pxco '")).dataset.trigger_word == "pxco"
