"""The service and training share the machine's 2 CPUs, as the README runs them: the tiny config
(2 workers; on the random model with the quick recipe), the sample photos uploaded, a job started
with the prefilled settings while generation is warm. The job waits PENDING saying why, runs to
SUCCEEDED, generate answers 503 at once while training holds the CPUs and works after; a `ray job
submit` job into the same storage root is in the service's list and queue."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SMALL = {"prompt": "[trigger], portrait", "steps": 2, "width": 64, "height": 64}
IDLE_S = 5  # generation_idle_s: how long an idle replica keeps its CPU here


@pytest.fixture(scope="module")
def service(deploy_service, tmp_path_factory):
    from ray import serve

    # The README's `fluxray serve --config configs/tiny.yaml`: 2 workers, both of the machine's CPUs.
    svc = deploy_service(tmp_path_factory.mktemp("serve-sharing"), overrides=("distributed.workers=2",),
                         generation_idle_s=IDLE_S)
    yield svc
    serve.delete("fluxray")


def timed(call):
    start = time.monotonic()
    r = call()
    return r, time.monotonic() - start


@pytest.fixture(scope="module")
def shared(service, http, dataset, ray_cluster, random_flux, quick_recipe, prepared_sample, jobs_helpers):
    """The scenario, once; what each step saw. A `ray job submit` job follows the service's
    job while that one waits."""
    from ray.job_submission import JobSubmissionClient

    _, follow_job = jobs_helpers
    ray_jobs = JobSubmissionClient(ray_cluster.dashboard_url)
    seen: dict = {"pending": [], "listed": []}

    def listed() -> dict | None:
        return {j["job_id"]: j for j in http.get("/v1/jobs").json()}.get("from-ray-job-submit")

    def on_view(view: dict) -> None:
        if view["status"] == "PENDING":
            seen["pending"].append(view)
            if "generate_pending" not in seen and view["queue_position"]:
                seen["generate_pending"] = timed(lambda: http.post("/v1/generate", json=SMALL))
        elif view["status"] == "RUNNING" and view["step"] > 0 and "generate_running" not in seen:
            seen["generate_running"] = timed(lambda: http.post("/v1/generate", json=SMALL))
        if "cli_job" not in seen and view["queue_position"]:
            # A job from `ray job submit` into the same root, while this one waits: it queues behind.
            sets = (f"model.path={random_flux}", f"dataset.path={prepared_sample}", f"storage.root={service.root}",
                    *quick_recipe, "save.name=from-ray-job-submit", "train.steps=2", "save.every=2", "sample.every=0",
                    "validation.every=2", "validation.images=1")
            seen["cli_job"] = ray_jobs.submit_job(
                entrypoint=shlex.join([sys.executable, "jobs/train.py", "--config", "configs/tiny.yaml",
                                       *[a for s in sets for a in ("--set", s)]]),
                runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "tests", "benchmarks"]})
        if "cli_job" in seen:
            seen["listed"].append(listed())

    # The scenario starts on an idle service: the replica up and holding a CPU. Jobs of earlier
    # modules may still be ending on the session's cluster (generate says so: a 503 naming them).
    deadline = time.time() + 300
    while (r := http.post("/v1/generate", json=SMALL)).status_code == 503 and time.time() < deadline:
        time.sleep(5)
    assert r.status_code == 200, r.text
    prefilled = http.get("/v1/defaults").json()["simple"]  # what the page sends unchanged
    r = http.post("/v1/jobs", json={"dataset_id": dataset, **prefilled})
    assert r.status_code == 200, r.text
    seen["job"] = r.json()["job_id"]
    seen["final"] = follow_job(http, seen["job"], on_view, timeout=1200)
    assert "cli_job" in seen, "the job never waited"
    until = time.time() + 600
    while True:
        seen["listed"].append(last := listed())
        if last and last["status"] in ("SUCCEEDED", "FAILED"):
            seen["cli_final"] = last
            break
        assert time.time() < until, ray_jobs.get_job_logs(seen["cli_job"])[-3000:]
        time.sleep(1)
    # Both jobs done: a generate starts a replica again (training jobs queued would have come first).
    seen["generate_after"] = timed(lambda: http.post("/v1/generate", json=SMALL))
    return seen


def test_the_readme_job_on_two_cpus_succeeds_and_generate_works_after_it(shared, http):
    job = shared["final"]
    assert job["status"] == "SUCCEEDED", (job["message"], http.get(f"/v1/jobs/{job['job_id']}/logs").text[-3000:])
    assert job["step"] == job["total"] == 40 and [s["step"] for s in job["samples"]] == [0, 20, 40]
    r, _ = shared["generate_after"]
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text


def test_a_job_submitted_while_generation_is_warm_is_pending_saying_why_never_running_at_step_0(shared):
    pending = shared["pending"]
    assert pending, "the job never showed PENDING although the generation replica held a CPU"
    waiting = [v for v in pending if v["queue_position"]]
    assert waiting and all(v["queue_position"] == 1 for v in waiting)
    # Why: the CPUs it needs, and who holds them.
    assert any("waiting for" in v["message"] and "CPU" in v["message"] and "generation replica" in v["message"]
               for v in waiting), [v["message"] for v in pending]


def test_generate_is_an_immediate_503_with_retry_after_while_training_waits_for_or_holds_the_cpus(shared):
    job = shared["job"]
    # While the job waits: it comes first. While it runs: it holds the CPUs, or (once the `ray job
    # submit` job has joined the queue) that one waits for them.
    for key, reasons in (("generate_pending", [f"training comes first: job {job} is waiting for the 1 CPU"]),
                         ("generate_running", [f"training job {job} holds the 1 CPU a generation replica needs",
                                               "training comes first: job from-ray-job-submit is waiting"])):
        r, seconds = shared[key]
        assert r.status_code == 503 and any(why in r.json()["detail"] for why in reasons), (key, r.text)
        assert int(r.headers["retry-after"]) >= 1 and seconds < 30, (key, seconds)


def test_a_ray_job_submit_job_is_listed_queued_then_done_with_its_progress(shared):
    listed = [v for v in shared["listed"] if v]
    assert listed, "the ray job submit job never appeared in GET /v1/jobs"
    # It waited behind the service's job, in the same queue, and said so.
    assert any(v["status"] == "PENDING" and v["queue_position"] and shared["job"] in v["message"]
               for v in listed), [(v["status"], v["queue_position"], v["message"]) for v in listed]
    final = shared["cli_final"]
    assert (final["status"], final["step"], final["total"], final["progress"]) == ("SUCCEEDED", 2, 2, 1.0)
    assert final["submission_id"] and final["dataset_id"] == "pxco"
