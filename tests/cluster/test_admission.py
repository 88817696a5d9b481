"""Admission: what a job asks Ray for, whether it can ever fit (and what to change when not), and
the cluster's queue, whose jobs start in order and wait PENDING, saying why, with no worker."""

from __future__ import annotations

import pytest

from pathlib import Path

from fluxray.config import load_config
from fluxray.errors import ConfigError
from fluxray.cluster.admission import (JOIN_GRACE_S, Demand, JobQueue, check_admissible, job_demand, ordinal, pack,
                                     submitted_before, unschedulable)

REPO = Path(__file__).resolve().parents[2]


def tiny(*sets: str):
    return load_config(REPO / "configs" / "tiny.yaml", list(sets))


# -- the demand and the fit (pure) ------------------------------------------------------------

def test_the_demand_counts_workers_gpus_custom_resources_and_a_forced_preview_actor():
    d = job_demand(tiny(), cluster_gpus=0)
    assert d.bundles == [{"CPU": 1.0}] * 2 and d.describe() == "2 workers x 1 CPU"
    d = job_demand(tiny("distributed.gpus_per_worker=auto", "distributed.resources_per_worker={accel: 1}"), 1)
    assert d.per_worker == {"CPU": 1.0, "GPU": 1.0, "accel": 1.0}
    assert job_demand(tiny("distributed.gpus_per_worker=auto"), 0).per_worker == {"CPU": 1.0}
    # `auto` previews render inline when there is no room; only `actor` insists on one.
    assert job_demand(tiny("sample.mode=auto"), 0).actor is None
    d = job_demand(tiny("sample.mode=actor", "sample.actor_cpus=0.5"), 0)
    assert d.actor == {"CPU": 0.5} and d.total() == {"CPU": 2.5}
    # No previews, no actor (and no likeness to score: the demo's embedding_model goes too).
    assert job_demand(tiny("sample.mode=actor", "sample.every=0", "validation.embedding_model=null"), 0).actor is None


def test_pack_places_every_bundle_on_one_node():
    assert pack([{"CPU": 1}] * 2, [{"CPU": 2}])
    assert pack([{"CPU": 1}] * 2, [{"CPU": 1}, {"CPU": 1}])
    assert not pack([{"CPU": 2}], [{"CPU": 1}, {"CPU": 1}])  # 2 CPUs in all, but not on one node
    assert not pack([{"CPU": 1, "GPU": 1}] * 2, [{"CPU": 8, "GPU": 1}])
    assert pack([{"CPU": 1, "accel": 1}, {"CPU": 1}], [{"CPU": 2, "accel": 1}])


@pytest.mark.parametrize("sets, nodes, needs, has, fix", [
    ((), [{"CPU": 1}], "2 workers x 1 CPU", "1 CPU", "distributed.workers=1"),
    (("distributed.gpus_per_worker=1",), [{"CPU": 16, "GPU": 1}], "2 workers x 1 CPU, 1 GPU", "1 GPU",
     "distributed.workers=1"),
    (("distributed.cpus_per_worker=2",), [{"CPU": 1}, {"CPU": 1}], "2 workers x 2 CPU", "2 CPU on 2 nodes",
     "distributed.cpus_per_worker=1"),
    (("distributed.resources_per_worker={accel: 1}",), [{"CPU": 2}], "2 workers x 1 CPU, 1 accel",
     "0 accel", "distributed.resources_per_worker.accel=0"),
    (("sample.mode=actor", "distributed.workers=2"), [{"CPU": 2}], "the preview actor (1 CPU, sample.mode=actor)",
     "2 CPU", "distributed.workers=1 or sample.mode=inline"),
])
def test_a_job_that_can_never_fit_names_what_it_needs_what_there_is_and_the_fix(sets, nodes, needs, has, fix):
    cfg = tiny(*sets)
    why = unschedulable(job_demand(cfg, sum(n.get("GPU", 0) for n in nodes)), nodes)
    assert why.startswith("distributed: the job needs ") and needs in why, why
    assert f"the cluster has {has}" in why and why.endswith(f": set {fix}"), why
    # The fix it names makes the job fit.
    for alternative in fix.split(" or "):
        fixed = tiny(*sets, alternative)
        assert unschedulable(job_demand(fixed, sum(n.get("GPU", 0) for n in nodes)), nodes) is None, alternative


def test_a_job_that_fits_the_empty_cluster_is_not_refused():
    assert unschedulable(job_demand(tiny(), 0), [{"CPU": 2}]) is None
    assert unschedulable(Demand(4, {"CPU": 1, "GPU": 1}), [{"CPU": 8, "GPU": 2}] * 2) is None


def test_the_drivers_check_refuses_a_preview_actor_beside_two_workers_on_two_cpus_at_once(monkeypatch, capsys):
    # The preview-actor job of tests/train/test_preview.py as it was: 2 workers + the actor = 3 CPU,
    # which waits forever on the machine's 2 CPUs unless the driver refuses it before Ray sees it.
    import fluxray.cluster

    monkeypatch.setattr(fluxray.cluster, "node_totals", lambda: [{"CPU": 2.0, "memory": 8e9}])
    monkeypatch.setattr(fluxray.cluster, "has_autoscaler", lambda: False)
    unfit = tiny("sample.mode=actor", "distributed.workers=2")
    with pytest.raises(ConfigError, match=r"needs 2 workers x 1 CPU \+ the preview actor \(1 CPU, sample.mode=actor\); "
                                          r"the cluster has 2 CPU: set distributed.workers=1 or sample.mode=inline$"):
        check_admissible(unfit)
    # As the test runs it now: 1 worker beside the actor fits the 2 CPUs.
    assert check_admissible(tiny("sample.mode=actor", "distributed.workers=1")).total() == {"CPU": 2.0}
    # With an autoscaler the driver only warns: nodes may come.
    monkeypatch.setattr(fluxray.cluster, "has_autoscaler", lambda: True)
    assert check_admissible(unfit).total() == {"CPU": 3.0}
    assert "warning: distributed: the job needs 2 workers x 1 CPU + the preview actor" in capsys.readouterr().out


# -- the queue (the actor's class, in this process) -------------------------------------------

def entry(key: str, submitted: float) -> dict:
    return {"key": key, "run_name": key, "submitted": submitted, "demand": {"CPU": 2.0}, "ray_job_id": key}


def test_the_queue_orders_by_submission_and_frees_the_place_of_a_driver_gone_quiet(monkeypatch):
    import fluxray.cluster.admission as admission

    q = JobQueue()
    q.join(entry("b", 2.0))
    q.join(entry("a", 1.0))  # submitted first, joined second (its driver prepared longer)
    assert (q.poll("a")["position"], q.poll("b")["position"]) == (0, 1)
    assert [e["key"] for e in q.poll("b")["ahead"]] == ["a"]
    q.start("a")
    view = q.poll("b")
    assert view["position"] == 0 and [(e["key"], e["state"]) for e in view["active"]] == [("a", "starting")]
    q.running("a")
    assert [e["state"] for e in q.snapshot()] == ["running", "queued"]
    q.leave("a")
    assert q.poll("a") is None and q.poll("b")["active"] == []
    # A driver that stops polling (killed) loses its place after STALE_S.
    q.join(entry("c", 3.0))
    now = admission.time.time()
    monkeypatch.setattr(admission.time, "time", lambda: now + admission.STALE_S / 2)
    q.poll("b")
    monkeypatch.setattr(admission.time, "time", lambda: now + admission.STALE_S * 1.1)
    assert q.poll("c") is None and q.poll("b")["position"] == 0


def test_jobs_submitted_earlier_whose_drivers_are_still_starting_go_first():
    from types import SimpleNamespace as Job

    me = {"submission_id": "raysubmit_me", "submitted": 1000.0}
    train = "python jobs/train.py --config c.yaml"
    jobs = [Job(submission_id="raysubmit_b", status="RUNNING", entrypoint="fluxray train --config c", start_time=990e3),
            Job(submission_id="raysubmit_a", status="PENDING", entrypoint=train, start_time=980e3),
            Job(submission_id="raysubmit_me", status="RUNNING", entrypoint=train, start_time=1000e3),
            Job(submission_id="raysubmit_later", status="PENDING", entrypoint=train, start_time=1001e3),
            Job(submission_id="raysubmit_done", status="SUCCEEDED", entrypoint=train, start_time=970e3),
            Job(submission_id="raysubmit_other", status="RUNNING", entrypoint="python etl.py", start_time=970e3),
            Job(submission_id=None, status="RUNNING", entrypoint=train, start_time=970e3)]
    assert submitted_before(jobs, me, now=1010.0) == ["raysubmit_a", "raysubmit_b"]
    # A driver that never joins (a `--local` run) holds the later ones back for JOIN_GRACE_S at most.
    assert submitted_before(jobs, me, now=980.0 + JOIN_GRACE_S + 1) == ["raysubmit_b"]
    q = JobQueue()
    q.join(entry("b", 990.0) | {"submission_id": "raysubmit_b"})
    q.leave("b")
    assert q.not_joined(["raysubmit_a", "raysubmit_b"]) == ["raysubmit_a"]  # one that ran and left counts


def test_the_queue_listing_shows_who_runs_and_who_waits_why(tmp_path):
    from fluxray.track.local import RunRecord
    from fluxray.cluster.admission import format_queue

    RunRecord(tmp_path / "b").set_status(state="queued", reason="waiting for 2 CPU (0 free): held by job a (running)")
    entries = [{**entry("a", 100.0), "state": "running", "started": 160.0, "run_dir": str(tmp_path / "a")},
               {**entry("b", 130.0), "state": "queued", "run_dir": str(tmp_path / "b"), "submission_id": "raysubmit_b"}]
    assert format_queue(entries, now=400.0).splitlines() == [
        "running    a                                4m  a",
        "queued #1  b                                4m  raysubmit_b",
        "           waiting for 2 CPU (0 free): held by job a (running)"]
    assert format_queue([], now=0.0) == "no fluxray job runs or waits on this cluster"


def test_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st"]


# -- on the session's cluster (the machine's 2 CPUs) -------------------------------------------

#: Two steps on 2 workers (both CPUs), one save, one validation forward, no previews.
TWO_STEPS = ["train.steps=2", "save.every=2", "validation.every=2", "validation.images=1", "validation.sigmas=[0.5]",
             "sample.every=0", "distributed.workers=2", "distributed.max_failures=0"]


@pytest.fixture
def base_sets(random_flux, prepared_sample, quick_recipe) -> list[str]:
    """The random model, the sample set and the quick recipe, as `--set`s."""
    return [f"model.path={random_flux}", f"dataset.path={prepared_sample}", *quick_recipe]


def _entrypoint(root, name: str, *sets: str, base: list[str]) -> str:
    import shlex
    import sys

    sets = [*base, f"storage.root={root}", f"save.name={name}", *TWO_STEPS, *sets]
    return shlex.join([sys.executable, "jobs/train.py", "--config", "configs/tiny.yaml",
                       *[a for s in sets for a in ("--set", s)]])


def _status(root, name: str) -> dict:
    import json

    path = root / "runs" / name / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.ray
@pytest.mark.slow
def test_two_jobs_back_to_back_run_in_order_and_the_second_waits_pending_without_workers(
        ray_driver, base_sets, tmp_path):
    import subprocess
    import sys
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    client = JobSubmissionClient(ray_driver.dashboard_url)
    env = {"working_dir": str(REPO), "excludes": [".venv", ".git", "tests", "benchmarks"]}
    jobs = {}
    for name in ("first", "second"):
        jobs[name] = client.submit_job(entrypoint=_entrypoint(tmp_path, name, base=base_sets), runtime_env=env)
    seen_pending, listing = [], None
    deadline = time.time() + 900
    while not all(client.get_job_status(j).is_terminal() for j in jobs.values()):
        assert time.time() < deadline, {n: client.get_job_logs(j)[-2000:] for n, j in jobs.items()}
        st = _status(tmp_path, "second")
        if st.get("state") == "queued" and st.get("ray_job_id"):
            # While it waits, no training worker of the second job exists.
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", st["ray_job_id"]),
                                           ("state", "!=", "DEAD")])
            if _status(tmp_path, "second").get("state") == "queued":  # still waiting after the look
                assert not workers, workers
                seen_pending.append(st)
                if listing is None:  # what `fluxray queue` shows meanwhile
                    listing = subprocess.run([str(Path(sys.executable).parent / "fluxray"), "queue", "--address",
                                              ray_driver.address], capture_output=True, text=True, timeout=120)
        time.sleep(1)
    for name, job in jobs.items():
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    # It waited, saying why and where: behind the first while both waited (2nd), then first in line
    # while the first started and trained on the CPUs it needs.
    shown = {(s["queue_position"], s["reason"]) for s in seen_pending}
    # Its driver may come up before the first's: then it waits behind the first's submission id.
    behind = ("queued behind first", f"queued behind {jobs['first']} (submitted before it, its driver is starting)")
    assert seen_pending and all(r in behind if n == 2 else n == 1 and "first" in r for n, r in shown), shown
    assert any(n == 1 for n, _ in shown), shown
    assert "PENDING (1st in the queue)" in client.get_job_logs(jobs["second"])
    queued = listing.stdout.split("queued #", 1)
    assert listing.returncode == 0 and len(queued) == 2 and queued[1].split()[1] == "second", listing
    # In order: the second was admitted after the first had finished training.
    first, second = _status(tmp_path, "first"), _status(tmp_path, "second")
    assert first["submitted"] < second["submitted"]
    assert first["admitted"] < first["updated"] <= second["admitted"], (first, second)


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_that_can_never_fit_is_refused_at_once_by_the_cli_and_ray_job_submit(
        ray_driver, base_sets, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    expected = ("distributed: the job needs 3 workers x 1 CPU; the cluster has 2 CPU: set distributed.workers=2")
    sets = [*base_sets, f"storage.root={tmp_path}", "distributed.workers=3"]
    r = subprocess.run([str(Path(sys.executable).parent / "fluxray"), "train", "--config", "configs/tiny.yaml",
                        *[a for s in sets for a in ("--set", s)]], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "RAY_ADDRESS": ray_driver.address})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"fluxray train: error: {expected}", r.stderr

    client = JobSubmissionClient(ray_driver.dashboard_url)
    job = client.submit_job(entrypoint=_entrypoint(tmp_path, "too-big", "distributed.workers=3", base=base_sets),
                            runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "tests", "benchmarks"]})
    deadline = time.time() + 300
    while not client.get_job_status(job).is_terminal():
        assert time.time() < deadline
        time.sleep(1)
    assert client.get_job_status(job) == JobStatus.FAILED
    assert f"fluxray train: error: {expected}" in client.get_job_logs(job)
    assert _status(tmp_path, "too-big") == {}  # refused before anything was recorded
