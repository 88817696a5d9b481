"""`fluxray doctor`: is this machine ready to train? Ray, GPUs, MLflow, the model, disk space.

Each check returns a `Check`: ok, warning (works, but read the fix) or fatal (a job would
fail). Nothing here changes the machine; the Ray probe runs in a child process with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fluxray.config import TINY_MODEL, JobConfig

Status = Literal["ok", "warning", "fatal"]
MIN_FREE_GIB, LOW_FREE_GIB = 2, 20  # latent/text caches, checkpoints and samples of a few runs
FLUX_BF16_GIB = 23.8  # FLUX.1-dev's frozen transformer in bf16

_RAY_PROBE = """
import json, os, ray
ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR", log_to_driver=False)
r = ray.cluster_resources()
print("FLUXRAY_PROBE " + json.dumps({"nodes": sum(1 for n in ray.nodes() if n["Alive"]),
                                     "cpus": r.get("CPU", 0), "gpus": r.get("GPU", 0)}))
"""


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""


def doctor(cfg: JobConfig | None = None, ray_timeout: float = 30.0) -> list[Check]:
    """Every check, for `cfg` (the defaults when None)."""
    cfg = cfg or JobConfig()
    checks = [check_ray(timeout=ray_timeout), check_gpus(), check_mlflow(cfg), check_model(cfg), check_disk(cfg)]
    if cfg.dataset.path:
        checks.append(check_dataset(cfg))
    return checks


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<7} {c.name:<{width}}  {c.message}")
        if c.fix:
            lines.append(f"{'':<7} {'':<{width}}  fix: {c.fix}")
    fatal = sum(c.status == "fatal" for c in checks)
    lines.append(f"{fatal} fatal problem(s)" if fatal else "ready to train")
    return "\n".join(lines)


def check_ray(address: str | None = None, timeout: float = 30.0) -> Check:
    """Connect to the running cluster (`RAY_ADDRESS` or `auto`) from a child process."""
    env = {**os.environ, **({"RAY_ADDRESS": address} if address else {})}
    where = env.get("RAY_ADDRESS") or "auto"
    try:
        r = subprocess.run([sys.executable, "-c", _RAY_PROBE], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("ray", "warning", f"the Ray cluster at {where} did not answer within {timeout:.0f} s",
                     "check `ray status`, or unset RAY_ADDRESS to let jobs start a local cluster")
    probe = next((ln for ln in r.stdout.splitlines() if ln.startswith("FLUXRAY_PROBE ")), None)
    if probe:
        info = json.loads(probe.split(" ", 1)[1])
        return Check("ray", "ok", f"cluster at {where}: {info['nodes']} node(s), {info['cpus']:g} CPUs, "
                                  f"{info['gpus']:g} GPUs")
    err = r.stderr.lower()
    if "token" in err or "unauthenticated" in err or "auth" in err:
        return Check("ray", "warning", f"the Ray cluster at {where} refused the connection (token auth)",
                     "export RAY_AUTH_MODE=token (the cluster's token is in ~/.ray/auth_token)")
    if where == "auto":
        return Check("ray", "warning", "no running cluster: jobs will start a local one",
                     "for a shared cluster: `ray start --head` (or set RAY_ADDRESS)")
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return Check("ray", "warning", f"cannot connect to Ray at {where}: {last[:200]}",
                 "check the address and `ray status`; unset RAY_ADDRESS to start a local cluster")


def check_gpus() -> Check:
    """GPUs this process sees, with their memory."""
    import torch

    if not torch.cuda.is_available():
        return Check("gpus", "warning", "no GPU visible: only the tiny model is practical on CPU",
                     "check nvidia-smi and CUDA_VISIBLE_DEVICES, and that torch is a CUDA build "
                     f"(torch {torch.__version__}); Ray workers on other nodes may still have GPUs")
    parts, small = [], []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        parts.append(f"{i}: {p.name} {total / 2**30:.0f} GiB ({free / 2**30:.0f} free)")
        if total / 2**30 < FLUX_BF16_GIB + 8:
            small.append(i)
    fix = (f"FLUX.1-dev's bf16 base is {FLUX_BF16_GIB} GB: on GPU(s) {small} train with several workers "
           "(distributed.zero_stage: auto picks ZeRO-3) and gradient checkpointing") if small else ""
    return Check("gpus", "warning" if small else "ok", "; ".join(parts), fix)


def check_mlflow(cfg: JobConfig, timeout: float = 5.0) -> Check:
    """The tracking store answers (a job trains on without it, keeping its metrics on disk)."""
    from fluxray.track.mlflow_run import tracking_uri

    uri = tracking_uri(cfg)
    lost = "jobs still train and keep their metrics on disk until it is back"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        folder = _existing_parent(db.parent)
        if not os.access(folder, os.W_OK):
            return Check("mlflow", "warning", f"cannot write the local store {db} ({folder} is read-only); {lost}",
                         "set storage.root or tracking.uri to a writable place")
        return Check("mlflow", "ok", f"local store {db} ({'exists' if db.exists() else 'created on the first job'})")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                return Check("mlflow", "ok", f"server {uri} answers ({resp.status})")
        except (urllib.error.URLError, OSError) as e:
            return Check("mlflow", "warning", f"server {uri} does not answer ({getattr(e, 'reason', e)}); {lost}",
                         "start it (`fluxray mlflow` or `mlflow server`), or unset tracking.uri for the local store")
    if uri.startswith("file:"):
        return Check("mlflow", "fatal", f"tracking.uri {uri}: MLflow 3 rejects a file: tracking store",
                     "use sqlite:///path/to/mlflow.db or an http:// server")
    return Check("mlflow", "ok", f"{uri} (not probed)")


def check_model(cfg: JobConfig) -> Check:
    """`model.path` loads: the tiny model, a diffusers folder, or a hub id in the HF cache."""
    path = cfg.model.path
    if path == TINY_MODEL:
        return Check("model", "ok", "the embedded tiny model (built under storage.root on first use)")
    local = Path(path).expanduser()
    if local.exists():
        if (local / "model_index.json").is_file():
            return Check("model", "ok", f"local diffusers pipeline {local}")
        return Check("model", "fatal", f"model.path {local} is a folder but not a diffusers pipeline (no model_index.json)",
                     "point model.path at the folder that holds model_index.json")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "model_index.json", revision=cfg.model.revision)
    if isinstance(cached, str):
        return Check("model", "ok", f"{path} is in the HF cache ({Path(cached).parent})")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return Check("model", "fatal", f"{path} is not in the HF cache and HF_HUB_OFFLINE is set",
                     f"download it where the network is (`huggingface-cli download {path}`) or unset HF_HUB_OFFLINE")
    return Check("model", "warning", f"{path} is not in the HF cache: the first job downloads it (~34 GB)",
                 f"`huggingface-cli download {path}` ahead of time; FLUX.1-dev is gated: accept its license and set HF_TOKEN")


def check_disk(cfg: JobConfig) -> Check:
    """Free space and write access at the storage root."""
    root = cfg.storage_root
    folder = _existing_parent(root)
    if not os.access(folder, os.W_OK):
        return Check("disk", "fatal", f"storage.root {root}: {folder} is not writable",
                     "set storage.root to a writable folder")
    free = shutil.disk_usage(folder).free / 2**30
    if free < MIN_FREE_GIB:
        return Check("disk", "fatal", f"only {free:.1f} GiB free at {root}", "free space or move storage.root")
    if free < LOW_FREE_GIB:
        return Check("disk", "warning", f"{free:.1f} GiB free at {root}: caches and checkpoints of a few runs fill it",
                     "free space, or lower save.keep_last")
    return Check("disk", "ok", f"{free:.0f} GiB free at {root}")


def check_dataset(cfg: JobConfig) -> Check:
    from fluxray.data.prepare import is_prepared

    src = Path(cfg.dataset.path).expanduser()
    if not src.exists():
        return Check("dataset", "fatal", f"dataset.path {src} does not exist", "point dataset.path at your images")
    kind = "prepared dataset" if is_prepared(src) else "raw folder (prepared on submit)"
    return Check("dataset", "ok", f"{kind} {src}")


def _existing_parent(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
