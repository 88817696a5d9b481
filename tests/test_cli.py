"""The `fluxray` command: real subprocesses, one-line errors (never a traceback), exit codes."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLUXRAY = str(Path(sys.executable).parent / "fluxray")


def run(*args, cwd=REPO, env=None, timeout=300):
    return subprocess.run([FLUXRAY, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


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
    assert data["train"]["steps"] == 7 and data["lora"]["rank"] == 16 and data["train"]["lr"] == 0.005  # tiny.yaml's


def test_set_errors_name_the_set_value_and_file_errors_the_file(tmp_path):
    r = run("config", "--config", "configs/tiny.yaml", "--set", "lora.rank=0")
    assert r.returncode == 2 and "invalid --set lora.rank=0:" in r.stderr and "lora.rank:" in r.stderr
    assert "configs/tiny.yaml" not in r.stderr  # the file is fine
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 0\n")
    r = run("config", "--config", str(bad), "--set", "train.steps=5")
    assert r.returncode == 2 and f"invalid config {bad}:" in r.stderr and "--set" not in r.stderr
    r = run("config", "--config", str(bad), "--set", "lora.rank=8")  # --set mends the file
    assert r.returncode == 0, r.stderr


def test_a_bad_model_path_is_one_line_from_train_advise_and_doctor(tmp_path, free_port):
    bad = ["--config", "configs/tiny.yaml", "--set", "model.path=/data/no-such-model", "--set", f"storage.root={tmp_path}"]
    said = "model.path: '/data/no-such-model' does not exist"
    for command in (["train", "--local"], ["advise"]):
        r = run(*command, *bad)
        assert r.returncode == 2, (command, r.stderr)
        assert said in r.stderr and "black-forest-labs/FLUX.1-dev" in r.stderr  # and what a valid one looks like
        assert "Traceback" not in r.stdout + r.stderr and "HFValidationError" not in r.stdout + r.stderr
    assert not (tmp_path / "runs").exists()  # nothing started
    r = run("doctor", *bad, "--ray-timeout", "5", env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert re.search(r"^fatal\s+model\s+" + re.escape(said), r.stdout, re.M), r.stdout
    assert r.stdout.rstrip().splitlines()[-1].startswith("not ready: 1 fatal problem(s) (model)")


def test_doctor_reports_a_config_that_does_not_load_and_still_checks_the_machine(tmp_path, free_port):
    r = run("doctor", "--config", "configs/tiny.yaml", "--set", "lora.rank=0", "--set", f"storage.root={tmp_path}",
            "--ray-timeout", "5", env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert re.search(r"^fatal\s+config\s+invalid --set lora.rank=0", r.stdout, re.M), r.stdout
    assert re.search(r"^\w+\s+disk\s+", r.stdout, re.M) and re.search(r"^warning\s+ray\s+nothing answers", r.stdout, re.M)
    assert r.stdout.rstrip().endswith("not ready: 1 fatal problem(s) (config)")


def test_a_file_given_as_a_folder_says_so(tmp_path):
    captions = "samples/pxco/captions.json"
    r = run("train", "--local", "--config", "configs/tiny.yaml", "--set", f"dataset.path={captions}",
            "--set", f"storage.root={tmp_path}")
    assert r.returncode == 2 and f"dataset.path: {captions} is a file, not a folder" in r.stderr, r.stderr
    r = run("prepare", captions, "--trigger", "pxco", "--out", str(tmp_path / "ds"))
    assert r.returncode == 2 and f"images folder {captions} is a file, not a folder" in r.stderr, r.stderr


def test_prepare_report_lists_every_file_it_did_not_use(tmp_path):
    src = tmp_path / "photos"
    shutil.copytree(REPO / "samples" / "pxco", src)
    (src / "notes.txt").write_text("shoot on Tuesday\n")
    (src / ".DS_Store").write_bytes(b"\0")
    r = run("prepare", str(src), "--trigger", "pxco", "--out", str(tmp_path / "ds"))
    assert r.returncode == 0, r.stderr

    def note(name: str) -> str:
        return next(line.split(None, 2) for line in r.stdout.splitlines() if f" {name}: " in line)

    assert note("notes.txt")[:2] == ["warning", "unsupported_file"] and "not used" in note("notes.txt")[2]
    assert note(".DS_Store")[:2] == ["info", "other_file"] and "hidden file" in note(".DS_Store")[2]
    assert "read for the captions" in note("captions.json")[2] and "trigger word file" in note("trigger.txt")[2]
    assert "Prepared 18 images" in r.stdout


@pytest.mark.slow
def test_local_train_runs_in_one_process_and_ends_with_the_next_steps(tmp_path):
    r = run("train", "--local", "--config", "configs/tiny.yaml", "--set", f"storage.root={tmp_path}",
            "--set", "train.steps=2", "--set", "sample.every=2", "--set", "save.every=2", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 steps in this process (--local: one process, no Ray)" in r.stdout and "worker(s)" not in r.stdout
    end = dict(re.findall(r"^  (LoRA file|previews|MLflow|web page)\s+(.+)$", r.stdout, re.M))
    assert Path(end["LoRA file"]).is_file() and Path(end["LoRA file"]).parent == tmp_path / "loras"
    assert sorted(p.name for p in Path(end["previews"]).glob("*grid.png")) == ["step000000-grid.png",
                                                                                "step000002-grid.png"]
    assert f"fluxray mlflow --config configs/tiny.yaml --set storage.root={tmp_path}`" in end["MLflow"]
    assert "workflowType=machine_learning" in end["MLflow"]
    assert f"fluxray serve --config configs/tiny.yaml --set storage.root={tmp_path}`" in end["web page"]


def test_advise_prints_the_peak_memory_line_for_the_named_or_assumed_card():
    r = run("advise", "--config", "configs/flux-dev.yaml", "--set", "model.quantize=nf4")
    assert r.returncode == 0, r.stderr
    line = r"peak GPU memory per worker: \d+\.\d GiB \(fits {}\)"
    assert re.search("^" + line.format("H100 80 GB") + "$", r.stdout, re.M), r.stdout  # no GPU here: an H100
    assert "(no GPU on this machine: the figure is for H100 GPUs; --gpu names another)" in r.stdout
    r = run("advise", "--config", "configs/flux-dev.yaml", "--gpu", "RTX 4090")
    assert re.search("^" + line.format("RTX 4090 24 GB") + "$", r.stdout, re.M), r.stdout
    assert "auto: int8 base, ZeRO-0, gradient checkpointing on" in r.stdout
    bad = run("advise", "--config", "configs/flux-dev.yaml", "--gpu", "Z80")
    assert bad.returncode == 2 and "unknown GPU 'Z80'" in bad.stderr and "Traceback" not in bad.stderr
