"""The `fluxray` command: real subprocesses, one-line errors (never a traceback), exit codes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLUXRAY = str(Path(sys.executable).parent / "fluxray")


def run(*args, cwd=REPO):
    return subprocess.run([FLUXRAY, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_prepare_writes_trigger_first_metadata(tmp_path):
    out = tmp_path / "ds"
    r = run("prepare", str(REPO / "samples" / "pxco"), "--captions", str(REPO / "samples" / "pxco" / "captions.json"),
            "--trigger", "pxco", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "Prepared 18 images" in r.stdout
    lines = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and all(l["text"].startswith("pxco, ") for l in lines)


def test_prepare_failure_is_one_clear_error_without_traceback(tmp_path):
    src = tmp_path / "up"
    src.mkdir()
    shutil.copy(REPO / "samples" / "pxco" / "0001.png", src / "0001.png")
    (src / "captions.json").write_text(json.dumps({"0001.png": "a man", "0099.png": "nobody"}))
    r = run("prepare", str(src), "--trigger", "pxco", "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "0099.png" in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_bad_config_and_bad_trigger_name_the_key_or_value(tmp_path):
    r = run("config", "--config", "configs/tiny.yaml", "--set", "lora.rank=0")
    assert r.returncode == 2 and "lora.rank" in r.stderr and "got 0" in r.stderr and "Traceback" not in r.stderr
    r = run("prepare", str(REPO / "samples" / "pxco"), "--trigger", "px co", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "'px co'" in r.stderr and "Traceback" not in r.stderr


def test_batch_larger_than_dataset_fails_before_start(tmp_path):
    r = run("train", "--config", "configs/tiny.yaml", "--local", "--set", f"storage.root={tmp_path}",
            "--set", "train.batch_size=16")
    assert r.returncode == 2
    assert "train.batch_size (16)" in r.stderr and "distributed.workers" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_config_prints_the_resolved_config():
    r = run("config", "--config", "configs/tiny.yaml", "--set", "train.steps=7")
    assert r.returncode == 0
    import yaml

    data = yaml.safe_load(r.stdout)
    assert data["train"]["steps"] == 7 and data["lora"]["rank"] == 4 and data["train"]["lr"] == 0.001
