"""Admission of a Ray job: refuse at once what the cluster can never run, then wait in the
cluster's one queue of fluxray jobs until it is first and its resources are free, saying why
in the run status (`state: queued`, `reason`, `queue_position`) while no worker of it exists.

The queue is a detached Ray actor that every job driver joins (`ray job submit`, `fluxray
train`, the service's jobs alike); the service reads it to keep generation out of the way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fluxray.config import JobConfig
from fluxray.errors import ConfigError, FluxrayError

QUEUE_NAME, NAMESPACE = "fluxray-job-queue-v1", "fluxray"
#: A driver not heard from for this long is gone (killed with its job): its place is freed.
STALE_S = 60.0
POLL_S = 2.0
#: How long a driver may take from `ray job submit` to joining the queue (imports on a busy
#: machine): a job submitted earlier that has not joined by then does not queue (`--local`).
JOIN_GRACE_S = 120.0
_FLUXRAY_ENTRYPOINT = re.compile(r"jobs/train\.py|fluxray(?:\.cli)? train")
#: Where a per-worker resource is set in the config, for the fix a refusal names.
_KEYS = {"CPU": "distributed.cpus_per_worker", "GPU": "distributed.gpus_per_worker"}


# -- what a job needs, and whether it can ever fit (pure) ------------------------------------

@dataclass(frozen=True)
class Demand:
    """A job's Ray resources: `workers` bundles of `per_worker`, plus the preview actor's."""

    workers: int
    per_worker: dict[str, float]
    actor: dict[str, float] | None = None

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [self.per_worker] * self.workers + ([self.actor] if self.actor else [])

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self) -> str:
        text = f"{self.workers} worker{'s' if self.workers > 1 else ''} x {fmt(self.per_worker)}"
        return text + (f" + the preview actor ({fmt(self.actor)}, sample.mode=actor)" if self.actor else "")


def fmt(resources: dict[str, float]) -> str:
    """`{"CPU": 2.0, "GPU": 1.0}` -> `2 CPU, 1 GPU`."""
    return ", ".join(f"{v:g} {k}" for k, v in resources.items()) or "nothing"


def worker_resources(cfg: JobConfig, cluster_gpus: float) -> dict[str, float]:
    """One worker's Ray resources; `gpus_per_worker: auto` is 1 GPU when the cluster has GPUs."""
    d = cfg.distributed
    gpus = d.gpus_per_worker if d.gpus_per_worker != "auto" else (1.0 if cluster_gpus > 0 else 0.0)
    out = {"CPU": float(d.cpus_per_worker), "GPU": float(gpus), **d.resources_per_worker}
    return {k: float(v) for k, v in out.items() if v}


def job_demand(cfg: JobConfig, cluster_gpus: float) -> Demand:
    """What the job asks Ray for. A preview actor counts only with `sample.mode: actor`: `auto`
    renders inline when there is no room for one."""
    s = cfg.sample
    actor = None
    if s.every and s.mode == "actor":
        actor = {k: float(v) for k, v in (("CPU", s.actor_cpus), ("GPU", s.actor_gpus)) if v}
    return Demand(cfg.distributed.workers, worker_resources(cfg, cluster_gpus), actor)


def pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether every bundle fits on some node at once (first fit, biggest bundles first)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: sorted(b.values(), reverse=True), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def unschedulable(demand: Demand, nodes: list[dict[str, float]]) -> str | None:
    """Why `demand` can never run on nodes of these total resources, with what to change; None
    when it fits the empty cluster."""
    if pack(demand.bundles, nodes):
        return None
    need = demand.total()
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    # Name what is short in all; when nothing is, the nodes are each too small.
    have = {k: v for k, v in have.items() if v < need[k] - 1e-9} or have
    where = f" on {len(nodes)} nodes" if len(nodes) > 1 else ""
    fixes = []
    if not pack([demand.per_worker], nodes):
        # Not even one worker fits a node: the per-worker amount is what to change.
        for k, v in demand.per_worker.items():
            largest = max((n.get(k, 0.0) for n in nodes), default=0.0)
            if v > largest:
                key = _KEYS.get(k, f"distributed.resources_per_worker.{k}")
                fixes.append(f"{key}={largest:g}")
    else:
        extra = [demand.actor] if demand.actor else []
        fit = max((w for w in range(1, demand.workers) if pack([demand.per_worker] * w + extra, nodes)), default=0)
        if fit:
            fixes.append(f"distributed.workers={fit}")
        if demand.actor and pack([demand.per_worker] * demand.workers, nodes):
            fixes.append("sample.mode=inline")
    fix = f": set {' or '.join(fixes)}" if fixes else ": add nodes, or ask for less"
    return f"distributed: the job needs {demand.describe()}; the cluster has {fmt(have)}{where}{fix}"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# -- the cluster's queue (a detached actor) ---------------------------------------------------

class JobQueue:
    """Every fluxray job of the cluster that waits, starts or runs, in order of submission.

    Jobs `queued` start in order: the first may start once no other job is `starting` (its
    workers not placed yet) and its resources are free. Entries whose driver stops calling
    (killed) for `STALE_S` are dropped.
    """

    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.joined: set[str] = set()  # the submission ids of every job that ever joined

    def join(self, entry: dict) -> None:
        self.entries[entry["key"]] = {**entry, "state": "queued", "seen": time.time()}
        if entry.get("submission_id"):
            self.joined.add(entry["submission_id"])

    def not_joined(self, submission_ids: list[str]) -> list[str]:
        return [s for s in submission_ids if s not in self.joined]

    def poll(self, key: str) -> dict | None:
        """The caller's place: `position` among the queued (0 = first), `ahead` (queued before
        it), `active` (starting or running); None if it is not in the queue (re-join)."""
        self._expire()
        me = self.entries.get(key)
        if me is None:
            return None
        me["seen"] = time.time()
        queued = self._queued()
        ahead = queued[:queued.index(me)] if me in queued else []
        return {"position": len(ahead), "ahead": ahead, "state": me["state"],
                "active": [e for e in self.entries.values() if e["state"] in ("starting", "running") and e is not me]}

    def start(self, key: str) -> None:
        self.entries[key].update(state="starting", started=time.time())

    def running(self, key: str) -> None:
        if key in self.entries:
            self.entries[key]["state"] = "running"

    def leave(self, key: str) -> None:
        self.entries.pop(key, None)

    def snapshot(self) -> list[dict]:
        """Active jobs, then the queued ones in order."""
        self._expire()
        return [e for e in self.entries.values() if e["state"] != "queued"] + self._queued()

    def _queued(self) -> list[dict]:
        return sorted((e for e in self.entries.values() if e["state"] == "queued"),
                      key=lambda e: (e["submitted"], e["key"]))

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, e in self.entries.items() if now - e["seen"] > STALE_S]:
            del self.entries[key]


def get_queue(create: bool = True):
    """The cluster's queue actor (made by the first job that needs it); with `create=False`,
    None when no job has made one."""
    import ray

    if not create:
        try:
            return ray.get_actor(QUEUE_NAME, namespace=NAMESPACE)
        except ValueError:
            return None
    # No CPU (it must never wait for the resources it hands out); restarted empty if its node
    # dies, and the drivers join again.
    return ray.remote(num_cpus=0, max_restarts=-1)(JobQueue).options(
        name=QUEUE_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


def queue_snapshot() -> list[dict]:
    """The queue as the service shows it; [] when there is none yet."""
    import ray

    queue = get_queue(create=False)
    return ray.get(queue.snapshot.remote()) if queue is not None else []


def format_queue(entries: list[dict], now: float) -> str:
    """`fluxray queue`: one line per job, running first, then the queued in order, each waiting
    one with its run status's reason."""
    if not entries:
        return "no fluxray job runs or waits on this cluster"
    lines, place = [], 0
    for e in entries:
        try:
            reason = json.loads((Path(e["run_dir"]) / "status.json").read_text()).get("reason") or ""
        except (OSError, ValueError, KeyError):
            reason = ""
        since = e.get("started") or e["submitted"]
        state = e["state"]
        if state == "queued":
            place += 1
            state = f"queued #{place}"
        line = f"{state:<10} {e['run_name']:<28} {_ago(now - since):>6}  {e.get('submission_id') or e['ray_job_id']}"
        lines.append(line + (f"\n{'':11}{reason}" if e["state"] == "queued" and reason else ""))
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    return f"{seconds / 60:.0f}m" if seconds >= 90 else f"{max(0, seconds):.0f}s"


# -- the driver's side ------------------------------------------------------------------------

def check_admissible(cfg: JobConfig) -> Demand:
    """Refuse (ConfigError) a job whose workers can never be scheduled on this cluster; on a
    cluster with an autoscaler, warn instead (it may add nodes). Returns what the job needs."""
    from fluxray.cluster import has_autoscaler, node_totals

    nodes = node_totals()
    demand = job_demand(cfg, sum(n.get("GPU", 0.0) for n in nodes))
    why = unschedulable(demand, nodes)
    if why and has_autoscaler():
        print(f"warning: {why} (an autoscaler may add the nodes it needs)", flush=True)
    elif why:
        raise ConfigError(why)
    return demand


@dataclass
class Ticket:
    """A job's place in the queue, from joining it until the job ends (`leave`)."""

    queue: object
    entry: dict
    _stop: threading.Event = field(default_factory=threading.Event)
    _sigterm: object = None  # the SIGTERM handler before ours

    def leave_on_sigterm(self) -> None:
        """`ray job stop` (SIGTERM) ends the driver through `leave`, not in the middle of the
        queue: a stopped job's place frees at once, not after STALE_S."""
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit)

    @property
    def key(self) -> str:
        return self.entry["key"]

    def keep_alive(self) -> None:
        """Tell the queue every few seconds that the driver lives, while the job runs."""

        def beat():
            import ray

            while not self._stop.wait(STALE_S / 6):
                try:
                    if ray.get(self.queue.poll.remote(self.key), timeout=30) is None:
                        self.queue.join.remote(self.entry)  # the queue actor was restarted
                        self.queue.running.remote(self.key)
                except Exception:  # noqa: BLE001 - a missed beat; the next one tries again
                    continue

        threading.Thread(target=beat, name="fluxray-queue-heartbeat", daemon=True).start()

    def leave(self) -> None:
        import ray

        self._stop.set()
        try:
            ray.get(self.queue.leave.remote(self.key), timeout=10)  # sent before the driver exits
        except Exception:  # noqa: BLE001 - Ray is going away: the entry expires by itself
            pass
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None


def _exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def wait_for_turn(cfg: JobConfig, demand: Demand, submitted: float, record) -> Ticket:
    """Join the queue and return once this job is first and its resources are free; until then
    the run status (`record`, a RunRecord) says `queued`, why, and the place in the queue.

    Fails (FluxrayError) when, first in the queue and with no fluxray job ahead that will end,
    the resources stay taken for `distributed.start_timeout_s`.
    """
    import ray

    from fluxray.cluster import node_free

    ids = {"submitted": submitted, **ray_ids()}  # a submitted job is placed by its submission time
    entry = {"key": f"{cfg.save.name}:{ids['ray_job_id']}", "run_name": cfg.save.name,
             "run_dir": str(record.dir), "demand": demand.total(), "workers": demand.workers, **ids}
    queue = get_queue()
    ray.get(queue.join.remote(entry))
    ticket = Ticket(queue, entry)
    ticket.leave_on_sigterm()
    record.set_status(state="queued", reason="in the queue", queue_position=None, **ids)
    blocked_since, shown = None, None
    try:
        while True:
            view = ray.get(queue.poll.remote(ticket.key))
            if view is None:  # the queue actor was restarted: join again, in the same order
                ray.get(queue.join.remote(entry))
                continue
            first = view["position"] == 0
            starting = [e for e in view["active"] if e["state"] == "starting"]
            if first and not starting:
                free = node_free()
                fits = pack(demand.bundles, free)
                # Jobs submitted before this one whose drivers are still starting go first: in
                # submission order, not in the order the drivers happen to come up.
                earlier = starting_before(queue, entry) if fits else []
                if fits and not earlier:
                    ray.get(queue.start.remote(ticket.key))
                    record.set_status(state="starting", reason=f"starting {demand.describe()}",
                                      queue_position=None, admitted=time.time())
                    print(f"admitted: starting {demand.describe()}", flush=True)
                    ticket.keep_alive()
                    return ticket
                if earlier:
                    reason = f"queued behind {', '.join(earlier)} (submitted before it, its driver is starting)"
                    view = {**view, "position": len(earlier)}
                    blocked_since = None
                else:
                    reason = waiting_for(demand, free, view["active"])
                    # Jobs ahead end by themselves; anything else (an idle replica, other Ray work)
                    # gets `start_timeout_s`.
                    blocked_since = None if view["active"] else blocked_since or time.time()
                    timeout = cfg.distributed.start_timeout_s
                    if blocked_since is not None and time.time() - blocked_since > timeout:
                        raise FluxrayError(f"distributed.start_timeout_s: the workers could not start within "
                                           f"{timeout:g} s: {reason}")
            elif first:
                reason = f"next in the queue: {starting[0]['run_name']} is starting its workers"
            else:
                names = ", ".join(e["run_name"] for e in view["ahead"][:3])
                more = f" and {len(view['ahead']) - 3} more" if len(view["ahead"]) > 3 else ""
                reason = f"queued behind {names}{more}"
            if (reason, view["position"]) != shown:
                shown = (reason, view["position"])
                record.set_status(state="queued", reason=reason, queue_position=view["position"] + 1)
                print(f"PENDING ({ordinal(view['position'] + 1)} in the queue): {reason}", flush=True)
            time.sleep(POLL_S)
    except BaseException as e:
        ticket.leave()
        if isinstance(e, FluxrayError):
            record.set_status(state="failed", reason=str(e), queue_position=None)
        raise


def submitted_before(jobs: list, entry: dict, now: float) -> list[str]:
    """The submission ids of Ray jobs (`JobDetails`) running fluxray's job driver, submitted
    before `entry` and less than JOIN_GRACE_S ago, whose drivers may not have joined the queue."""
    return [j.submission_id for j in sorted(jobs, key=lambda j: j.start_time or 0)
            if j.submission_id and j.submission_id != entry.get("submission_id")
            and j.status in ("PENDING", "RUNNING") and _FLUXRAY_ENTRYPOINT.search(j.entrypoint or "")
            and j.start_time and j.start_time / 1000 < entry["submitted"] and now - j.start_time / 1000 < JOIN_GRACE_S]


def starting_before(queue, entry: dict) -> list[str]:
    """Fluxray jobs submitted before `entry` whose drivers have not joined the queue yet."""
    import ray
    from ray.util.state import list_jobs

    try:
        candidates = submitted_before(list_jobs(limit=10_000, timeout=30, detail=True,
                                                raise_on_missing_output=False),
                                      entry, time.time())
    except Exception:  # noqa: BLE001 - no job API (a plain `ray.init` cluster): nothing to wait for
        return []
    return ray.get(queue.not_joined.remote(candidates)) if candidates else []


def waiting_for(demand: Demand, free: list[dict[str, float]], active: list[dict]) -> str:
    """`waiting for 2 CPU (1 free): held by job X (running), the generation replica`."""
    from fluxray.cluster import resource_holders

    need = demand.total()
    have = {k: sum(n.get(k, 0.0) for n in free) for k in need}
    short = {k: v for k, v in need.items() if have[k] < v - 1e-9} or need  # else: free, but split over nodes
    text = f"waiting for {fmt(short)} ({fmt({k: have[k] for k in short})} free)"
    holders = [f"job {e['run_name']} ({e['state']}{_eta(e)})" for e in active if set(e["demand"]) & set(short)]
    for cls, held in resource_holders(set(short)):
        if cls.startswith("ServeReplica:") and cls.endswith(":Generator"):
            holders.append("the generation replica (it gives way once idle: generation_idle_s)")
        elif not (active and cls.startswith(("RayTrainWorker", "PreviewRenderer"))):  # not the jobs named
            holders.append(f"{cls} ({fmt(held)})")
    return text + (f": held by {', '.join(dict.fromkeys(holders))}" if holders else "")


def _eta(entry: dict) -> str:
    """`, ~3 min left` when the job has a pace."""
    left = seconds_left(entry)
    return f", ~{max(1, round(left / 60))} min left" if left else ""


def seconds_left(entry: dict) -> float | None:
    """A queued job's remaining training time at its measured pace (its run status), if known."""
    try:
        st = json.loads((Path(entry["run_dir"]) / "status.json").read_text())
        return max(0.0, (st["total"] - st["step"]) * st["sec_per_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ray_ids() -> dict:
    """This driver's Ray job id and, under `ray job submit`, its submission id (how the service
    finds the job in Ray's job list) and the time it was submitted (its place in the queue)."""
    import ray

    out = {"ray_job_id": ray.get_runtime_context().get_job_id(), "submission_id": None}
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for the entrypoint
    if config:
        try:
            out["submission_id"] = json.loads(config).get("metadata", {}).get("job_submission_id")
            from ray.util.state import get_job

            job = get_job(out["submission_id"], timeout=30)
            if job is not None and job.start_time:
                out["submitted"] = job.start_time / 1000  # ms
        except Exception:  # noqa: BLE001 - the driver's own start time places it then
            pass
    return out


def mark_running(key: str | None) -> None:
    """From rank 0 once the workers are placed: the job no longer holds back the next one."""
    queue = get_queue(create=False) if key else None
    if queue is not None:
        queue.running.remote(key)
