"""`fluxray doctor`: each check against the real thing (a Ray cluster, an MLflow address where
nothing listens, model folders, the disk), and the exit code of the command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxray.advise.doctor import (Check, check_dataset, check_disk, check_gpus, check_mlflow, check_model, check_ray,
                                   format_checks, verdict)
from fluxray.config import load_config

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
    # Neither a folder nor a hub id: said as such, not as a hub library's validation error.
    c = check_model(tiny_config("model.path=/data/no-such-model"))
    assert c.status == "fatal" and c.message.startswith("model.path: '/data/no-such-model' does not exist")
    c = check_model(tiny_config(f"model.path={REPO / 'README.md'}"))
    assert c.status == "fatal" and "is a file, not a folder" in c.message


def test_mlflow_check_local_store_dead_server_and_file_store(free_port, tiny_config):
    assert check_mlflow(tiny_config()).status == "ok"
    dead = f"http://127.0.0.1:{free_port()}"
    c = check_mlflow(tiny_config(f"tracking.uri={dead}"), timeout=2)
    assert c.status == "warning" and dead in c.message and "keep their metrics on disk" in c.message
    assert check_mlflow(tiny_config("tracking.uri=file:///tmp/mlruns")).status == "fatal"


def test_disk_gpu_and_dataset_checks(tiny_config, tmp_path):
    c = check_disk(tiny_config(root=tmp_path / "not" / "yet"))
    assert c.status in ("ok", "warning") and "GiB free" in c.message
    assert check_dataset(tiny_config()).status == "ok"
    assert check_dataset(tiny_config(f"dataset.path={tmp_path / 'gone'}")).status == "fatal"
    c = check_dataset(tiny_config(f"dataset.path={REPO / 'samples' / 'pxco' / 'captions.json'}"))
    assert c.status == "fatal" and "is a file, not a folder" in c.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine lists its GPUs instead")
def test_gpu_check_without_a_gpu_depends_on_what_the_config_trains(tiny_config):
    dev = load_config(REPO / "configs" / "flux-dev.yaml")
    c = check_gpus(dev)
    assert c.status == "fatal" and c.facts["needs"] == "FLUX.1-dev needs a GPU" and "configs/tiny.yaml" in c.fix
    assert check_gpus(dev, cluster_gpus=8).status == "ok"  # the workers run where the GPUs are
    assert check_gpus(load_config(REPO / "configs" / "tiny.yaml")).status == "ok"  # the demo trains on CPU
    assert check_gpus(dev.model_copy(update={"distributed": dev.distributed.model_copy(
        update={"gpus_per_worker": 0})})).status == "ok"


def test_verdict_matches_what_was_found():
    disk, ray = Check("disk", "ok", "9 GiB free"), Check("ray", "warning", "nothing answers")
    gpu = Check("gpus", "fatal", "no GPU", facts={"needs": "FLUX.1-dev needs a GPU"})
    model = Check("model", "fatal", "model.path: ...")
    assert verdict([ray, disk]) == "ready to train"
    assert verdict([ray, gpu, disk]) == "not ready: FLUX.1-dev needs a GPU; the CPU demo (configs/tiny.yaml) is ready"
    assert verdict([ray, gpu, model, disk]) == "not ready: FLUX.1-dev needs a GPU; 1 more fatal problem(s) (model)"
    assert verdict([ray, model, disk]) == "not ready: 1 fatal problem(s) (model)"


def test_ray_check_on_a_dead_address_says_nothing_answers_with_or_without_a_token(free_port, tmp_path, monkeypatch):
    dead = f"127.0.0.1:{free_port()}"
    c = check_ray(dead, timeout=5)
    assert c.status == "warning" and c.message == f"nothing answers at {dead} (no Ray cluster there)"
    # A fresh machine (no ~/.ray/auth_token) in token mode: still a dead address, not a token problem.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    c = check_ray(dead, timeout=5)
    assert c.message == f"nothing answers at {dead} (no Ray cluster there)" and "token" not in c.message + c.fix


def test_ray_check_without_a_cluster_or_a_token_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` cluster left in Ray's temp dir
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    c = check_ray(timeout=120)
    assert c.status == "ok" and c.message == ("no running cluster: a job starts a local one, and the Ray token "
                                              f"({tmp_path / '.ray' / 'auth_token'}), as there is none yet")
    assert "ray get-auth-token --generate" in c.fix
    assert not (tmp_path / ".ray").exists()  # doctor changes nothing


@pytest.mark.ray
def test_ray_check_reaches_a_running_cluster(ray_cluster):
    c = check_ray(ray_cluster.address, timeout=120)
    from fluxray.cluster import machine_cpus

    assert c.status == "ok" and f"1 node(s), {machine_cpus()} CPUs" in c.message


def test_report_and_exit_code(free_port, tiny_config, tmp_path):
    text = format_checks([Check("disk", "ok", "9 GiB free"), Check("model", "fatal", "bad", "fix it")])
    assert "fix: fix it" in text and text.endswith("not ready: 1 fatal problem(s) (model)")
    fluxray = str(Path(sys.executable).parent / "fluxray")
    env = dict(os.environ)
    env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"  # nothing listens: the probe fails fast or times out
    args = [fluxray, "doctor", "--config", "configs/tiny.yaml", "--set", f"storage.root={tmp_path}", "--ray-timeout", "3"]
    r = subprocess.run(args + ["--set", f"model.path={tmp_path}"], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no model_index.json" in r.stdout and "not ready: 1 fatal problem(s) (model)" in r.stdout
    assert "warning ray" in r.stdout
    ok = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert ok.returncode == 0 and ok.stdout.endswith("ready to train\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine is ready for FLUX.1-dev")
def test_doctor_on_a_cpu_machine_says_flux_dev_is_not_ready_and_the_demo_is(free_port, tmp_path):
    fluxray = str(Path(sys.executable).parent / "fluxray")
    # Online, as a new user's machine is: FLUX.1-dev is not downloaded yet (a warning, not a fatal).
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path)}
    r = subprocess.run([fluxray, "doctor", "--set", f"storage.root={tmp_path}", "--ray-timeout", "3"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "fatal   gpus" in r.stdout  # the default config: FLUX.1-dev
    assert r.stdout.endswith("not ready: FLUX.1-dev needs a GPU; the CPU demo (configs/tiny.yaml) is ready\n")
