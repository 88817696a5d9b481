"""`fluxray doctor`: is this machine ready to train? Ray, GPUs, MLflow, the model, disk space.

Each check returns a `Check`: ok, warning (works, but read the fix) or fatal (a job would
fail). Nothing here changes the machine; the Ray probe runs in a child process with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fluxray.cluster import auth_token_path, has_auth_token
from fluxray.config import TINY_MODEL, JobConfig
from fluxray.errors import ConfigError

Status = Literal["ok", "warning", "fatal"]
MIN_FREE_GIB, LOW_FREE_GIB = 2, 20  # latent/text caches, checkpoints and samples of a few runs
FLUX_BF16_GIB = 23.8  # FLUX.1-dev's frozen transformer in bf16

# The cluster a job would join (`fluxray.cluster.connect`): $RAY_ADDRESS, else the one `ray start` left.
_RAY_PROBE = """
import json, os, sys, ray
from ray._private.services import find_bootstrap_address
address = os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None)
if not address:
    print("FLUXRAY_PROBE_NONE")
    sys.exit(0)
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
r = ray.cluster_resources()
print("FLUXRAY_PROBE " + json.dumps({"address": address, "nodes": sum(1 for n in ray.nodes() if n["Alive"]),
                                     "cpus": r.get("CPU", 0), "gpus": r.get("GPU", 0)}))
"""


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    message: str
    fix: str = ""
    #: What the check found that another one uses (the Ray cluster's GPUs).
    facts: dict = field(default_factory=dict, compare=False)


def doctor(cfg: JobConfig | None = None, ray_timeout: float = 30.0, config_error: str | None = None) -> list[Check]:
    """Every check, for `cfg` (the defaults when None). `config_error`: the config did not load;
    the machine is still checked (with the defaults), the model and dataset are not."""
    checks = [Check("config", "fatal", config_error, "fix the config; `fluxray config --config FILE` shows "
                                                     "what it resolves to")] if config_error else []
    cfg = cfg or JobConfig()
    ray = check_ray(timeout=ray_timeout)
    checks += [ray, check_gpus(None if config_error else cfg, ray.facts.get("gpus", 0.0)), check_mlflow(cfg)]
    if not config_error:
        checks.append(check_model(cfg))
    checks.append(check_disk(cfg))
    if cfg.dataset.path and not config_error:
        checks.append(check_dataset(cfg))
    return checks


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<7} {c.name:<{width}}  {c.message}")
        if c.fix:
            lines.append(f"{'':<7} {'':<{width}}  fix: {c.fix}")
    lines.append(verdict(checks))
    return "\n".join(lines)


def verdict(checks: list[Check]) -> str:
    """The last line: ready, or not and why; when only a GPU is missing, whether the CPU demo is ready."""
    fatal = [c for c in checks if c.status == "fatal"]
    if not fatal:
        return "ready to train"
    gpu = next((c for c in fatal if c.name == "gpus"), None)
    others = [c.name for c in fatal if c is not gpu]
    reasons = [gpu.facts["needs"]] if gpu else []
    if others:
        reasons.append(f"{len(others)} {'more ' if gpu else ''}fatal problem(s) ({', '.join(others)})")
    if gpu and not others:
        reasons.append("the CPU demo (configs/tiny.yaml) is ready")
    return "not ready: " + "; ".join(reasons)


def check_ray(address: str | None = None, timeout: float = 30.0) -> Check:
    """Connect to the running cluster (`RAY_ADDRESS` or `auto`) from a child process, with the
    token fluxray would use (see `fluxray.cluster.ensure_auth_token`; nothing is written here)."""
    env = {**os.environ, **({"RAY_ADDRESS": address} if address else {})}
    where = env.get("RAY_ADDRESS") or "this machine's `ray start` cluster"
    token = has_auth_token()
    if token and env.get("RAY_AUTH_MODE") is None:
        env["RAY_AUTH_MODE"] = "token"  # as every fluxray process runs
    hostport = _host_port(where)
    if hostport is not None and not _answers(*hostport, timeout=min(timeout, 5.0)):
        return Check("ray", "warning", f"nothing answers at {where} (no Ray cluster there)",
                     "check the address (RAY_ADDRESS) and `ray status` on the head node; unset RAY_ADDRESS to "
                     "let jobs start a local cluster")
    try:
        r = subprocess.run([sys.executable, "-c", _RAY_PROBE], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("ray", "warning", f"the Ray cluster at {where} did not answer within {timeout:.0f} s",
                     "check `ray status`, or unset RAY_ADDRESS to let jobs start a local cluster")
    probe = next((ln for ln in r.stdout.splitlines() if ln.startswith("FLUXRAY_PROBE ")), None)
    if probe:
        info = json.loads(probe.split(" ", 1)[1])
        return Check("ray", "ok", f"cluster at {info['address']}: {info['nodes']} node(s), {info['cpus']:g} CPUs, "
                                  f"{info['gpus']:g} GPUs", facts={"gpus": info["gpus"]})
    err = r.stderr.lower()
    path = auth_token_path()
    if "token" in err or "unauthenticated" in err:
        if not token:
            asked = ("RAY_AUTH_MODE=token asks for a Ray token" if env.get("RAY_AUTH_MODE") == "token"
                     else f"the Ray cluster at {where} wants a token")
            return Check("ray", "warning", f"{asked}, and this machine has none ({path} does not exist)",
                         "copy the cluster's token to that file (or set RAY_AUTH_TOKEN)")
        return Check("ray", "warning", f"the Ray cluster at {where} refused this machine's token ({path})",
                     "use the cluster's token: copy its ~/.ray/auth_token here, or set RAY_AUTH_TOKEN")
    if "FLUXRAY_PROBE_NONE" in r.stdout:
        made = "" if token else f", and the Ray token ({path}), as there is none yet"
        return Check("ray", "ok", f"no running cluster: a job starts a local one{made}",
                     "" if token else "for a shared cluster: `ray get-auth-token --generate`, then `ray start --head`")
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return Check("ray", "warning", f"cannot connect to Ray at {where}: {last[:200]}",
                 "check the address and `ray status`; unset RAY_ADDRESS to start a local cluster")


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of a `host:port` GCS address; None for `auto` and client (`ray://`) addresses."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    return host, int(port)


def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_gpus(cfg: JobConfig | None = None, cluster_gpus: float = 0.0) -> Check:
    """GPUs this process sees, with their memory; fatal when `cfg` needs one and neither this
    machine nor the Ray cluster (`cluster_gpus`) has any."""
    import torch

    if not torch.cuda.is_available():
        if cluster_gpus:
            return Check("gpus", "ok", f"no GPU on this machine; the Ray cluster has {cluster_gpus:g} for the workers")
        if cfg is not None and cfg.model.path != TINY_MODEL and cfg.distributed.gpus_per_worker != 0:
            needs = f"{Path(cfg.model.path).name} needs a GPU"
            return Check("gpus", "fatal", f"no GPU here nor in a Ray cluster: {needs} (its bf16 transformer alone "
                                          f"is {FLUX_BF16_GIB} GB)",
                         "run on a GPU machine (check nvidia-smi, and that torch is a CUDA build: torch "
                         f"{torch.__version__}) or join a GPU cluster (RAY_ADDRESS); the CPU demo runs here: "
                         "fluxray train --config configs/tiny.yaml", facts={"needs": needs})
        return Check("gpus", "ok", "no GPU: this config trains on CPU")
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
    """`model.path` loads: the demo model, a diffusers folder, or a hub id in the HF cache."""
    from fluxray.model.source import model_source

    path = cfg.model.path
    try:
        kind = model_source(path)
    except ConfigError as e:
        return Check("model", "fatal", str(e), "set model.path (in the config, or --set model.path=...)")
    if kind == "tiny":
        from fluxray.model.demo import demo_model_dir

        if (demo_model_dir() / "model_index.json").is_file():
            return Check("model", "ok", f"the demo model shipped with fluxray ({demo_model_dir()})")
        return Check("model", "fatal", f"model.path tiny: the demo model is missing from {demo_model_dir()}",
                     "reinstall fluxray, or rebuild it: fluxray make-demo-model")
    local = Path(path).expanduser()
    if kind == "folder":
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
    if not src.is_dir():
        return Check("dataset", "fatal", f"dataset.path {src} is a file, not a folder",
                     "point dataset.path at the folder of your images (or a prepared dataset)")
    kind = "prepared dataset" if is_prepared(src) else "raw folder (prepared on submit)"
    return Check("dataset", "ok", f"{kind} {src}")


def _existing_parent(path: Path) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
