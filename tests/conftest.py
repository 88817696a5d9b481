"""Shared fixtures: the tiny model, the bundled sample dataset prepared once, a job config
factory, and one real local Ray cluster (`ray start --head`) for every Ray, Serve and job test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "pxco"
BIN = Path(sys.executable).parent

# Keep the test runs quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray fixes its auth mode when first imported, and collecting a test module may import it
# (fluxray.serve does) before `ray_cluster` runs: token mode from the start.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def session_root(tmp_path_factory) -> Path:
    """A storage root shared by the session: the tiny model and caches are built once."""
    return tmp_path_factory.mktemp("fluxray-root")


@pytest.fixture(scope="session")
def tiny_model(session_root) -> Path:
    from fluxray.model.tiny import ensure_tiny_model

    return ensure_tiny_model(session_root / "models" / "tiny-flux")


@pytest.fixture(scope="session")
def prepared_sample(session_root) -> Path:
    """The bundled sample set, prepared (18 images, trigger pxco)."""
    from fluxray.data.prepare import prepare_dataset

    out = session_root / "datasets" / "pxco"
    prepare_dataset(SAMPLES, SAMPLES / "captions.json", trigger_word="pxco", out_dir=out)
    return out


@pytest.fixture
def tiny_config(session_root, tiny_model, prepared_sample, tmp_path):
    """`tiny_config(*overrides)` -> a validated JobConfig for the tiny model on the sample set.

    Runs, LoRAs and the MLflow store go to this test's tmp_path; the model and the caches
    are shared by the session (the model through `model.path`, caches by content key).
    """
    from fluxray.config import load_config

    def make(*overrides: str, root: Path | None = None):
        base = [f"model.path={tiny_model}", f"dataset.path={prepared_sample}",
                f"storage.root={root or tmp_path / 'root'}", "save.name=test-run"]
        return load_config(REPO / "configs" / "tiny.yaml", base + list(overrides))

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """`free_port()` -> a TCP port nothing listens on right now (for a server to start, or a dead address)."""
    return _free_port


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster started with `ray start --head`; yields its GCS address.

    The driver of each test connects with `ray.init(address=...)`; `ray job submit` and
    Ray Serve use the dashboard at `dashboard_url`.
    """
    port, dash = _free_port(), _free_port()
    # Ray 2.60 protects a cluster's dashboard and job API with a token (~/.ray/auth_token);
    # clients send it when RAY_AUTH_MODE=token, so set it for the cluster and this process.
    os.environ["RAY_AUTH_MODE"] = "token"
    # The venv's bin first on PATH, as when a user activates it before `ray start`: a job's
    # `python jobs/train.py` entrypoint then runs the interpreter that has fluxray installed.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    temp = Path("/tmp") / f"rt{os.getpid()}"  # Ray's socket paths must stay short
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
           "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats",
           f"--temp-dir={temp}", "--include-dashboard=true",
           # Its own agent port: the default (52365) is taken when another cluster runs on the machine.
           f"--dashboard-agent-listen-port={_free_port()}"]
    log = open(tmp_path_factory.mktemp("ray-log") / "ray-start.log", "w")
    # Its own process group, so teardown stops this cluster only (`ray stop` would stop them all).
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    info = type("RayCluster", (), {"address": address, "dashboard_url": f"http://127.0.0.1:{dash}",
                                   "temp_dir": temp})()
    import urllib.error
    import urllib.request

    deadline = time.time() + 120
    while True:  # the dashboard (job server) is the last part to come up
        try:
            urllib.request.urlopen(info.dashboard_url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start --head failed; see {log.name}")
            time.sleep(1)
    os.environ["RAY_ADDRESS"] = address
    try:
        _wait_for_job_agent(info.dashboard_url, deadline)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # a cluster that never came up is not left running
        raise
    yield info
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    # A graceful `ray start --block` stop takes ~35 s on 2 cores (each process gets its grace
    # period in turn); nothing of this throwaway cluster needs it.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def _wait_for_job_agent(dashboard_url: str, deadline: float) -> None:
    """The job API answers before the node's job agent is up: submit a no-op until it runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    while True:
        try:
            job = client.submit_job(entrypoint="python -c pass")
            break
        except RuntimeError:
            if time.time() > deadline + 60:
                raise
            time.sleep(1)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)


@pytest.fixture
def ray_driver(ray_cluster):
    """This test process connected to the session's Ray cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=True, configure_logging=False)
    return ray_cluster
