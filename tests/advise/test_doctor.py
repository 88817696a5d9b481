"""`fluxray doctor`: each check against the real thing (a Ray cluster, an MLflow address where
nothing listens, model folders, the disk), and the exit code of the command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxray.advise.doctor import (Check, check_dataset, check_disk, check_gpus, check_mlflow, check_model, check_ray,
                                   format_checks)

REPO = Path(__file__).resolve().parent.parent.parent


def test_model_check_knows_tiny_folders_and_the_hf_cache(tiny_config, tmp_path, monkeypatch):
    assert check_model(tiny_config()).status == "ok"
    assert check_model(tiny_config("model.path=tiny")).status == "ok"
    c = check_model(tiny_config(f"model.path={tmp_path}"))
    assert c.status == "fatal" and "no model_index.json" in c.message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = check_model(tiny_config("model.path=black-forest-labs/FLUX.1-dev"))
    assert c.status == "fatal" and "not in the HF cache" in c.message and "HF_HUB_OFFLINE" in c.message
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    c = check_model(tiny_config("model.path=black-forest-labs/FLUX.1-dev"))
    assert c.status == "warning" and "HF_TOKEN" in c.fix


def test_mlflow_check_local_store_dead_server_and_file_store(free_port, tiny_config):
    assert check_mlflow(tiny_config()).status == "ok"
    dead = f"http://127.0.0.1:{free_port()}"
    c = check_mlflow(tiny_config(f"tracking.uri={dead}"), timeout=2)
    assert c.status == "warning" and dead in c.message and "keep their metrics on disk" in c.message
    assert check_mlflow(tiny_config("tracking.uri=file:///tmp/mlruns")).status == "fatal"


def test_disk_gpu_and_dataset_checks(tiny_config, tmp_path):
    c = check_disk(tiny_config(root=tmp_path / "not" / "yet"))
    assert c.status in ("ok", "warning") and "GiB free" in c.message
    g = check_gpus()  # this machine has none; a GPU box lists them with their memory
    assert (g.status == "warning" and "no GPU" in g.message) or "GiB" in g.message
    assert check_dataset(tiny_config()).status == "ok"
    assert check_dataset(tiny_config(f"dataset.path={tmp_path / 'gone'}")).status == "fatal"


def test_ray_check_times_out_on_a_dead_address(free_port):
    c = check_ray(f"127.0.0.1:{free_port()}", timeout=5)
    assert c.status == "warning" and ("did not answer" in c.message or "cannot connect" in c.message)


@pytest.mark.ray
def test_ray_check_reaches_a_running_cluster(ray_cluster):
    c = check_ray(ray_cluster.address, timeout=120)
    from fluxray.cluster import machine_cpus

    assert c.status == "ok" and f"1 node(s), {machine_cpus()} CPUs" in c.message


def test_report_and_exit_code(free_port, tiny_config, tmp_path):
    text = format_checks([Check("disk", "ok", "9 GiB free"), Check("model", "fatal", "bad", "fix it")])
    assert "fix: fix it" in text and text.endswith("1 fatal problem(s)")
    fluxray = str(Path(sys.executable).parent / "fluxray")
    env = dict(os.environ)
    env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"  # nothing listens: the probe fails fast or times out
    args = [fluxray, "doctor", "--config", "configs/tiny.yaml", "--set", f"storage.root={tmp_path}", "--ray-timeout", "3"]
    r = subprocess.run(args + ["--set", f"model.path={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no model_index.json" in r.stdout and "1 fatal problem(s)" in r.stdout and "warning ray" in r.stdout
    ok = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert ok.returncode == 0 and ok.stdout.endswith("ready to train\n")
