"""Shared fixtures: the tiny model, the bundled sample dataset prepared once, a job config
factory, and one real local Ray cluster (`ray start --head`) for every Ray, Serve and job test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "pxco"

# Keep the test runs quiet and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray fixes its auth mode when first imported, and collecting a test module may import it
# (fluxray.serve does) before `ray_cluster` runs: token mode, and a token, from the start.
from fluxray.cluster import ensure_auth_token  # noqa: E402

ensure_auth_token()


@pytest.fixture(scope="session")
def session_root(tmp_path_factory) -> Path:
    """A storage root shared by the session: the random model and caches are built once."""
    return tmp_path_factory.mktemp("fluxray-root")


@pytest.fixture(scope="session")
def random_flux(session_root) -> Path:
    """The 1+1-block random-weight FLUX pipeline: draws noise, but runs every code path in milliseconds."""
    from fluxray.model.tiny import ensure_random_flux

    return ensure_random_flux(session_root / "models" / "random-flux")


@pytest.fixture(scope="session")
def prepared_sample(session_root) -> Path:
    """The bundled sample set, prepared (18 images, trigger pxco)."""
    from fluxray.data.prepare import prepare_dataset

    out = session_root / "datasets" / "pxco"
    prepare_dataset(SAMPLES, SAMPLES / "captions.json", trigger_word="pxco", out_dir=out)
    return out


#: configs/tiny.yaml cut to a quick recipe for the random model: what tests run, unless they say otherwise.
QUICK = ["train.steps=40", "train.lr=0.001", "lora.rank=4", "sample.every=20", "sample.steps=4", "save.every=20",
         "train.early_stop_min_delta=0.01", "validation.embedding_model=null"]


@pytest.fixture(scope="session")
def quick_recipe() -> list[str]:
    """QUICK, for the tests that build their configs at a wider scope than `tiny_config`."""
    return list(QUICK)


@pytest.fixture
def tiny_config(session_root, random_flux, prepared_sample, tmp_path):
    """`tiny_config(*overrides)` -> a validated JobConfig: configs/tiny.yaml on the random model and
    the sample set, with the QUICK recipe.

    Runs, LoRAs and the MLflow store go to this test's tmp_path; the model and the caches
    are shared by the session (the model through `model.path`, caches by content key).
    """
    from fluxray.config import load_config

    def make(*overrides: str, root: Path | None = None):
        base = [f"model.path={random_flux}", f"dataset.path={prepared_sample}",
                f"storage.root={root or tmp_path / 'root'}", "save.name=test-run", *QUICK]
        return load_config(REPO / "configs" / "tiny.yaml", base + list(overrides))

    return make


@pytest.fixture
def free_port():
    """`free_port()` -> a TCP port nothing listens on right now (for a server to start, or a dead address)."""
    from fluxray.cluster import free_port

    return free_port


@pytest.fixture(scope="session")
def train_workers():
    """`train_workers(node)` -> the live Ray Train worker processes (psutil) of a LocalNode: the
    children of the raylet that runs in its temp dir."""
    import psutil

    def find(node) -> list:
        out = []
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.info["name"] == "raylet" and f"{node.temp_dir}/" in " ".join(p.info["cmdline"] or []):
                out += [c for c in p.children() if " ".join(c.cmdline()).startswith("ray::RayTrainWorker")]
        return out

    return find


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster started with `ray start --head`, with the machine's real CPU
    count (never an inflated one: a job that cannot fit must not fit here either); yields the
    node (`address`, `dashboard_url`, `temp_dir`).

    The driver of each test connects with `ray.init(address=...)`; `ray job submit` and
    Ray Serve use the dashboard at `dashboard_url`. The auth token is made by fluxray itself
    (`fluxray.cluster.ensure_auth_token`), as on a fresh machine.
    """
    from fluxray.cluster import start_head

    # Ray's socket paths must stay short (~107 bytes): not under pytest's tmp dir.
    node = start_head(Path("/tmp") / f"rt{os.getpid()}", log=tmp_path_factory.mktemp("ray-log") / "ray-start.log")
    os.environ["RAY_ADDRESS"] = node.address
    yield node
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    node.stop()
    shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_driver(ray_cluster):
    """This test process connected to the session's Ray cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=True, configure_logging=False)
    return ray_cluster


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After the session: Ray's and DeepSpeed's exit handlers may block in C (a driver still
    attached to a cluster that is gone); dump the stacks and end the process rather than hang CI."""
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)


@pytest.fixture(autouse=True)
def one_job_per_process():
    """DeepSpeed's `zero.Init` swaps `torch.nn.functional.linear` for its ZeRO-3 linear for the
    rest of the process ("This will persist unless manually reset"). A job's worker is a process of
    its own; tests share one, so the next test gets torch's linear back (a quantized base's
    weights have no ZeRO-3 linear)."""
    import torch.nn.functional as F

    linear = F.linear
    yield
    F.linear = linear
