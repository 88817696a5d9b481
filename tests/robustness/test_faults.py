"""Faults while training: the job driver killed, the worker holding rank 0 killed, the disk filling
up during a save. Each run ends at its configured step (or fails clearly), resumes from its last
save, and leaves the dataset it trained on byte-identical."""

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fluxray.errors import FluxrayError
from fluxray.model.lora import read_lora_metadata
from fluxray.train.job import run_job
from fluxray.train.checkpoint import STATE_FILE

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


# -- kill the job driver, and the worker that holds rank 0 --------------------------------

#: One validation forward, no previews: these runs are about saves, not learning.
LEAN = ["sample.every=0", "validation.embedding_model=null", "validation.images=1", "validation.sigmas=[0.5]"]
#: Saved every 2 steps; rank 0 dies at step 3 (one failure allowed), the driver once step 5 runs,
#: well before the end.
STEPS = 12
JOB = [*LEAN, f"train.steps={STEPS}", "save.every=2", f"validation.every={STEPS}", "distributed.workers=2",
       "distributed.max_failures=1", "save.name=faults"]


def _wait(client, job: str, until, what: str, timeout: float = 300) -> str:
    """Poll the job's logs until `until(logs)`; fails with the log tail on timeout or job end."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while True:
        logs = client.get_job_logs(job)
        if until(logs):
            return logs
        status = client.get_job_status(job)
        if status.is_terminal() or time.time() > deadline:
            pytest.fail(f"job {job} is {status} before {what}; log tail:\n{logs[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def killed_job(ray_cluster, random_flux, prepared_sample, tmp_path_factory):
    """One job submitted with `ray job submit`: rank 0 exits at step 3 (Ray Train restarts the
    workers), then the driver is SIGKILLed once step 5 runs, and the same command is resubmitted."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = tmp_path_factory.mktemp("faults")
    sets = [f"model.path={random_flux}", f"dataset.path={prepared_sample}", f"storage.root={root}", *JOB]
    entrypoint = shlex.join([sys.executable, "jobs/train.py", "--config", "configs/tiny.yaml",
                             *[a for s in sets for a in ("--set", s)]])
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "tests", "benchmarks"],
                   "env_vars": {"FLUXRAY_CRASH_AT": "3:0"}}
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    dataset_before = snapshot(prepared_sample)

    def submit() -> str:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                 submission_id=f"fluxray-faults-{uuid.uuid4().hex[:8]}")

    first = submit()
    # "step 5/N" prints once step 4's save is reported by every rank and recorded by Ray Train.
    _wait(client, first, lambda logs: f"step 5/{STEPS} loss" in logs, "step 5")
    os.kill(int(client.get_job_info(first).driver_info.pid), signal.SIGKILL)
    deadline = time.time() + 60
    while not client.get_job_status(first).is_terminal():
        assert time.time() < deadline, "the killed driver's job never ended"
        time.sleep(0.5)
    first_logs = client.get_job_logs(first)
    # Ray Train's record of the saves it will resume from (a checkpoint folder alone may be one
    # whose report never completed).
    snapshot_file = root / "ray" / "faults" / "checkpoint_manager_snapshot.json"
    committed = json.loads(snapshot_file.read_text())["latest_checkpoint_result"]["metrics"]["step"]

    second = submit()
    second_logs = _wait(client, second, lambda logs: client.get_job_status(second) == JobStatus.SUCCEEDED,
                        "it succeeds")
    return {"root": root, "first": (client.get_job_status(first), first_logs), "second": second_logs,
            "committed": committed, "dataset": (prepared_sample, dataset_before)}


@pytest.mark.ray
@pytest.mark.slow
def test_killed_rank0_worker_restarts_from_the_last_save(killed_job):
    _, logs = killed_job["first"]
    run = killed_job["root"] / "runs" / "faults"
    assert (run / ".crashed-3-0").exists(), "the injected failure never fired"
    assert "FLUXRAY_CRASH_AT: rank 0 exits at step 3" in logs, logs[-3000:]
    # Step 2 was saved: step 3 is the only one lost, and the restarted workers go on from there.
    after = logs.split("rank 0 exits at step 3", 1)[1]
    assert re.search(r"resumed from \S+ at step 2\b", after) and f"step 4/{STEPS} loss" in after, logs[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == STEPS  # once resubmitted (below)
    dataset, before = killed_job["dataset"]
    assert snapshot(dataset) == before


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_resubmitted_resumes_from_the_last_save(killed_job):
    from mlflow import MlflowClient

    status, first_logs = killed_job["first"]
    assert status.value in ("FAILED", "STOPPED"), status
    # A save is complete once the step after it ran: the resumed run may lose only later steps.
    completed = max(s for s in range(2, STEPS, 2) if f"step {s + 1}/{STEPS} loss" in first_logs)
    logs = killed_job["second"]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", logs)]
    assert resumed and resumed[0] == killed_job["committed"] >= completed >= 4, (resumed, completed, logs[-3000:])
    assert f"step {resumed[0]}/{STEPS} loss" not in logs and f"step {STEPS}/{STEPS} loss" in logs, logs[-3000:]
    root = killed_job["root"]
    assert read_lora_metadata(root / "loras" / "faults.safetensors")["steps"] == str(STEPS)
    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fluxray").experiment_id],
                              filter_string="tags.`fluxray.run_name` = 'faults'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    dataset, before = killed_job["dataset"]
    assert snapshot(dataset) == before


# -- fill the disk while a checkpoint is written ------------------------------------------

def _pages(path: Path) -> int:
    """Bytes a tmpfs needs for the files under `path` (whole pages)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"`mount {' '.join(args)}` failed ({r.stderr.strip()}): this test fills a tmpfs and needs "
                    "root (CI runs as root)")


@pytest.fixture
def tmpfs():
    """`tmpfs(dir, size)` mounts a tmpfs of `size` bytes at `dir`; unmounted at teardown."""
    mounted = []

    def mount(folder: Path, size: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def test_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tiny_config, prepared_sample, tmpfs):
    recipe = [*LEAN, "train.steps=2", "save.every=1", "distributed.workers=1"]
    dataset_before = snapshot(prepared_sample)
    # The same run on the normal disk measures one save: room for the first, not the second.
    run_job(tiny_config(*recipe, "save.name=measure"), local=True)
    measured = tiny_config().storage_root / "runs" / "measure"
    second_save = _pages(measured / "checkpoints" / "step000002") + sum(
        _pages(p) for p in (measured / "loras").glob("*step000002*"))
    size = _pages(measured) - second_save + second_save // 2 // PAGE * PAGE

    cfg = tiny_config(*recipe, "save.name=full")
    run = tmpfs(cfg.storage_root / "runs" / "full", size)
    with pytest.raises(FluxrayError) as e:
        run_job(cfg, local=True)
    msg = str(e.value)
    assert "No space left on device" in msg and f"storage.root {cfg.storage_root}" in msg, msg
    assert str(run / "checkpoints" / "step000002") in msg or str(run / "loras") in msg, msg

    checkpoints = run / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step000001"]  # the half-written one is gone
    assert (checkpoints / "step000001" / STATE_FILE).exists()

    _mount("-o", "remount,size=64m", str(run))  # space again: the same job resumes from step 1
    summary = run_job(cfg, local=True)
    assert summary["start_step"] == 1 and summary["steps"] == 2
    root = cfg.storage_root
    assert _same_tensors(root / "loras" / "full.safetensors", root / "loras" / "measure.safetensors")
    assert snapshot(prepared_sample) == dataset_before
