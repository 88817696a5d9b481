"""The Ray cluster as this machine sees it: the auth token a fresh machine lacks, its real CPU
count, local Ray nodes (`ray start`) for the demo, the tests and the benchmarks, and the
resources of a running cluster per node (what a job or a replica could get, and who holds it).

Ray 2.60 runs with token auth, and `ray start --head` refuses to start when `~/.ray/auth_token`
does not exist yet (a fresh machine); `ensure_auth_token` writes it, as
`ray get-auth-token --generate` does, and leaves an existing one alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def ensure_auth_token() -> Path | None:
    """Token auth on for this process and its children, with a token to use: `$RAY_AUTH_TOKEN`,
    `$RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, written (once) if none exists.

    Returns the token file when it is one. Call it before `import ray` where possible: Ray reads
    `RAY_AUTH_MODE` when first imported.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = auth_token_path()
    if not has_auth_token():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        # Readable by its owner only: anyone holding it may run code on the cluster.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # no overwrite: another process's token, written first, wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path


def auth_token_path() -> Path:
    """Where Ray reads the token from: `$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def has_auth_token() -> bool:
    """Whether this process has a Ray token to give: `$RAY_AUTH_TOKEN` or a non-empty token file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = auth_token_path()
    return path.is_file() and bool(path.read_text().strip())


def machine_cpus() -> int:
    """CPUs this process may really run on (its affinity mask, as Ray counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalNode:
    """One `ray start --block` process group on this machine; `stop()` ends it alone (`ray stop`
    would end every cluster on the machine)."""

    proc: subprocess.Popen
    address: str                 # GCS address of the cluster (host:port)
    temp_dir: Path
    log: Path
    dashboard_url: str | None = None
    env: dict = field(default_factory=dict)

    def stop(self, grace: float = 5.0) -> None:
        # A graceful stop of `ray start --block` takes ~35 s on 2 cores (each process gets its
        # grace period in turn); a throwaway node needs none of it.
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue


def start_head(temp_dir: Path, *, num_cpus: int | None = None, resources: dict[str, float] | None = None,
               log: Path | None = None, timeout: float = 180.0, wait_for_jobs: bool = True) -> LocalNode:
    """`ray start --head` on 127.0.0.1 with a dashboard and job API, the machine's real CPUs
    (`num_cpus` may only take some of them), and this venv's python on the cluster's PATH (as an
    activated venv would put it), so a job's `python jobs/train.py` has fluxray installed."""
    ensure_auth_token()
    port, dash = free_port(), free_port()
    args = ["--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--include-dashboard=true"]
    node = _start(args, f"127.0.0.1:{port}", temp_dir, num_cpus, resources, log, timeout)
    node.dashboard_url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(node, time.time() + timeout)
        if wait_for_jobs:
            _wait_for_job_agent(node, time.time() + timeout)
    except BaseException:
        node.stop(grace=0)  # a cluster that never came up is not left running
        raise
    return node


def start_worker_node(head: LocalNode, temp_dir: Path, *, num_cpus: int, resources: dict[str, float] | None = None,
                      log: Path | None = None, timeout: float = 120.0) -> LocalNode:
    """A second node of `head`'s cluster on this machine (`ray start --address=...`), with its
    own temp dir and `num_cpus` of the machine's CPUs."""
    node = _start([f"--address={head.address}"], head.address, temp_dir, num_cpus, resources, log, timeout)
    node.dashboard_url = head.dashboard_url
    deadline = time.time() + timeout
    probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    while True:  # up when the cluster counts one more live node
        r = subprocess.run([sys.executable, "-c", probe, head.address], capture_output=True, text=True,
                           env=node.env, timeout=60)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] and int(r.stdout.split()[-1]) >= 2:
            return node
        if node.proc.poll() is not None or time.time() > deadline:
            node.stop(grace=0)
            raise RuntimeError(f"ray start --address={head.address} did not join; see {node.log}")
        time.sleep(1)


def _start(args: list[str], address: str, temp_dir: Path, num_cpus: int | None, resources: dict[str, float] | None,
           log: Path | None, timeout: float) -> LocalNode:
    import json

    ensure_auth_token()
    temp_dir.mkdir(parents=True, exist_ok=True)
    log = log or temp_dir / "ray-start.log"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Its own cluster, whatever the shell pointed at: Ray's job supervisor gives it to the jobs'
    # drivers, and Ray Train's PlacementGroupCleaner finds the cluster by it when other clusters
    # run on the machine.
    env["RAY_ADDRESS"] = address
    # Ray gives its dashboard 60 s to come up; a busy machine (a CI runner, 2 cores) takes longer.
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", str(int(timeout)))
    cmd = [str(bin_dir / "ray"), "start", "--block", *args, f"--num-cpus={num_cpus or machine_cpus()}",
           "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           # Its own ports: the defaults are taken when another cluster runs on the machine.
           f"--dashboard-agent-listen-port={free_port()}", f"--node-manager-port={free_port()}",
           f"--object-manager-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    out = open(log, "w")
    # Its own process group, so `stop()` ends this node only.
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return LocalNode(proc=proc, address=address, temp_dir=temp_dir, log=log, env=env)


def _wait_for_dashboard(node: LocalNode, deadline: float) -> None:
    while True:  # the dashboard (job server) is the last part to come up
        try:
            urllib.request.urlopen(node.dashboard_url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return
        except OSError:
            if node.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start --head did not come up; see {node.log}") from None
            time.sleep(1)


def _wait_for_job_agent(node: LocalNode, deadline: float) -> None:
    """The job API answers before the node's job agent is up: submit a no-op until it runs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(node.dashboard_url)
    while True:
        try:
            job = client.submit_job(entrypoint="python -c pass")
            break
        except RuntimeError:
            if node.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the job API of {node.dashboard_url} never took a job; see {node.log}") from None
            time.sleep(1)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)


def connect(**init_kwargs) -> None:
    """`ray.init` for a job driver: the running cluster (`$RAY_ADDRESS`, or the one `ray start`
    left in Ray's temp dir, as `ray.init()` finds them), else a new local one.

    A new local cluster gets a dashboard at a known address, given to its processes as
    `RAY_API_SERVER_ADDRESS`: with other Ray clusters on the machine, Ray Train's helpers that
    look the dashboard up otherwise fail ("Found multiple active Ray instances", a traceback
    in the job's output). Nothing preempts a local node, so Ray Train's preemption watcher is off.
    """
    import ray
    from ray._private.services import find_bootstrap_address

    ensure_auth_token()
    if os.environ.get("RAY_ADDRESS") or find_bootstrap_address(None):
        ray.init(**init_kwargs)
        return
    dash = free_port()
    # Read by the processes the new cluster starts: they inherit this environment.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash,
             **init_kwargs)


# -- a running cluster's resources (the caller is connected: ray.init) ------------------------

def node_totals() -> list[dict[str, float]]:
    """Each live node's total resources (CPU, GPU, custom ones, `node:<ip>`, ...)."""
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"]]


def node_free() -> list[dict[str, float]]:
    """Each live node's resources free right now (a snapshot: tasks start and end meanwhile)."""
    # Ray has no public per-node view of free resources; its own TPU helpers use this one.
    from ray._private.state import available_resources_per_node

    return [{k: float(v) for k, v in r.items()} for r in available_resources_per_node().values()]


def has_autoscaler() -> bool:
    """Whether the cluster was started with an autoscaler config (it may add nodes on demand)."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - older GCS without the key: a fixed cluster
        return False
    return bool(config and config.node_group_configs)


def resource_holders(keys: set[str]) -> list[tuple[str, dict[str, float]]]:
    """(actor class, its resources) of the live actors that hold any of `keys`, for a message
    saying who holds what a job waits for; [] when Ray's state API does not answer."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000, timeout=10,
                             raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - only a message depends on it
        return []
    out = []
    for a in actors:
        held: dict[str, float] = {}
        for k, v in (a.required_resources or {}).items():
            # An actor in a placement group shows `CPU_group_<i>_<pg>` and `CPU_group_<pg>`: one CPU.
            k = k.split("_group_")[0]
            if k in keys and v:
                held[k] = max(held.get(k, 0.0), float(v))
        if held:
            out.append((a.class_name, held))
    return out
