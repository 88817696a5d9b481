"""Two Ray nodes on this machine (`ray start --head` and `ray start --address=...`, 1 CPU each: the
machine's 2): a 2-worker job spreads one rank per node, writes its checkpoints, LoRA and MLflow run
into the one storage root, and resumes when the second node's worker is killed mid-run; the
workers never hold the service's token that the driver's shell had."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fluxray.cluster import machine_cpus, start_head, start_worker_node

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 24, 4
SECRET = "service-token-not-for-workers"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head with 1 CPU and a second node with the other; stopped at the end."""
    half = machine_cpus() // 2
    # Ray's socket paths must stay short: not under pytest's tmp dir.
    head = start_head(Path("/tmp") / f"rn{os.getpid()}h", num_cpus=half, wait_for_jobs=False)
    try:
        worker = start_worker_node(head, Path("/tmp") / f"rn{os.getpid()}w", num_cpus=machine_cpus() - half)
    except BaseException:
        head.stop()
        raise
    yield head, worker
    for node in (worker, head):
        node.stop()
        shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def spread_run(two_nodes, random_flux, quick_recipe, prepared_sample, tmp_path_factory, train_workers):
    """`fluxray train` of 2 spread workers from a shell that holds the service's token; the second
    node's worker is SIGKILLed once step 6 has run (after the step-4 save)."""
    head, worker = two_nodes
    root = tmp_path_factory.mktemp("two-nodes")
    sets = [f"model.path={random_flux}", f"dataset.path={prepared_sample}", f"storage.root={root}", *quick_recipe,
            "save.name=spread", f"train.steps={STEPS}", f"save.every={EVERY}", f"validation.every={STEPS}",
            "validation.images=1", "validation.sigmas=[0.5]", "sample.every=0", "distributed.workers=2",
            "distributed.placement=spread", "distributed.max_failures=1"]
    # Every rank's line in the log (Ray folds lines that differ only in numbers and ids).
    env = {**os.environ, "RAY_ADDRESS": head.address, "FLUXRAY_API_TOKEN": SECRET, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fluxray"), "train", "--config", "configs/tiny.yaml",
                             *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    killed, environs = None, []
    deadline = time.time() + 900
    try:
        while proc.poll() is None:
            assert time.time() < deadline, "".join(lines[-80:])
            if killed is None and any(f"step 6/{STEPS} loss" in ln for ln in lines):
                environs = [w.environ() for n in (head, worker) for w in train_workers(n)]
                victim, = train_workers(worker)
                killed = victim.pid
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(30)
    return {"root": root, "rc": proc.returncode, "log": "".join(lines), "killed": killed, "environs": environs}


def _ranks(log: str) -> list[dict[int, tuple[int, str]]]:
    """Each worker group's `{rank: (pid, node id)}`, in the order the groups started."""
    groups: list[dict] = []
    prefixed = r"\(RayTrainWorker pid=(\d+)[^)]*\)(?:\x1b\[[0-9;]*m)? rank (\d+)/2 on node (\w+)"  # colored
    for pid, rank, node in re.findall(prefixed, log):
        if not groups or int(rank) in groups[-1]:
            groups.append({})
        groups[-1][int(rank)] = (int(pid), node)
    return groups


def test_two_nodes_add_up_to_the_machine(two_nodes):
    import json

    head, worker = two_nodes
    r = subprocess.run([sys.executable, "-c", "import ray, json; ray.init(); "
                        "print(json.dumps([n['Resources'].get('CPU') for n in ray.nodes() if n['Alive']]))"],
                       env={**os.environ, "RAY_ADDRESS": head.address}, capture_output=True, text=True, timeout=120)
    cpus = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(cpus) == 2 and sum(cpus) == machine_cpus(), (cpus, r.stderr[-2000:])


def test_spread_ranks_sit_on_different_nodes_and_the_killed_one_was_on_the_second(spread_run):
    log = spread_run["log"]
    assert spread_run["rc"] == 0, log[-4000:]
    groups = _ranks(log)
    assert len(groups) == 2, log[-4000:]  # the first group, and the one restarted after the kill
    for group in groups:
        assert sorted(group) == [0, 1] and group[0][1] != group[1][1], groups
    # The process killed was a rank of the first group, on the node that is not the head's.
    first = {pid: node for pid, node in groups[0].values()}
    assert spread_run["killed"] in first, (spread_run["killed"], groups)
    head_node = next(node for pid, node in first.items() if pid != spread_run["killed"])
    assert first[spread_run["killed"]] != head_node


def test_a_run_across_two_nodes_resumes_into_one_storage_root_and_one_mlflow_run(spread_run):
    from mlflow.tracking import MlflowClient

    from fluxray.model.lora import read_lora_metadata
    from fluxray.track.local import read_metrics

    log, root = spread_run["log"], spread_run["root"]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed and resumed[0] >= EVERY and resumed[0] % EVERY == 0, log[-4000:]
    assert f"step {STEPS}/{STEPS} loss" in log
    assert read_lora_metadata(root / "loras" / "spread.safetensors")["steps"] == str(STEPS)
    saved = sorted(p.name for p in (root / "ray" / "spread").glob("checkpoint-step*"))
    assert saved and saved[-1] == f"checkpoint-step{STEPS:06d}", saved
    assert [r["step"] for r in read_metrics(root / "runs" / "spread") if "loss" in r] == list(range(1, STEPS + 1))
    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    run, = client.search_runs([client.get_experiment_by_name("fluxray").experiment_id])
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp)
    assert [m.step for m in history] == list(range(1, STEPS + 1))


def test_the_workers_never_hold_the_token_of_the_drivers_shell(spread_run):
    environs = spread_run["environs"]
    assert len(environs) == 2, environs  # both ranks looked at, mid-run
    for env in environs:
        assert SECRET not in env.values() and env.get("FLUXRAY_API_TOKEN", "") == ""
