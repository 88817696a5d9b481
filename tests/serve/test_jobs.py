"""Jobs of the service: the config a job gets, what is submitted to Ray, and the state read back
from Ray Jobs plus the run folder (a fake job client here; tests/serve/test_app.py uses Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.job_submission import JobStatus

from fluxray.config import JobConfig, load_config
from fluxray.errors import ConfigError, FluxrayError
from fluxray.serve.jobs import ClusterUnavailable, JobNotFound, JobService, job_config, simple_defaults
from fluxray.track.local import RunRecord

REPO = Path(__file__).resolve().parents[2]


class FakeJobClient:
    """Ray's JobSubmissionClient, as far as the service uses it."""

    def __init__(self, fail: bool = False):
        self.jobs, self.fail = {}, fail

    def submit_job(self, *, entrypoint, runtime_env, submission_id, metadata):
        if self.fail:
            raise RuntimeError("Request failed with status code 500")
        self.jobs[submission_id] = SimpleNamespace(submission_id=submission_id, job_id=None, status=JobStatus.PENDING,
                                                   message="", start_time=0, entrypoint=entrypoint,
                                                   runtime_env=runtime_env, metadata=metadata)
        return submission_id

    def list_jobs(self):
        return list(self.jobs.values())


@pytest.fixture
def service(tmp_path, prepared_sample):
    svc = JobService(tmp_path / "root")
    svc._client = FakeJobClient()
    return svc


def submit(service, prepared_sample, **settings):
    base = load_config(REPO / "configs" / "tiny.yaml")
    return service.submit(job_config(base, settings), "pxco-set", prepared_sample, "pxco")


def test_simple_defaults_are_the_guides():
    d = simple_defaults(JobConfig())
    assert (d["steps"], d["learning_rate"], d["rank"], d["batch_size"], d["ema"], d["sample_every"]) == \
        (1000, 5e-4, 16, 1, True, 50)
    assert len(d["sample_prompts"]) == 3


def test_simple_settings_and_expert_yaml_make_the_config():
    base = load_config(REPO / "configs" / "tiny.yaml")
    cfg = job_config(base, {"steps": 12, "learning_rate": 2e-4, "rank": 8, "ema": False, "sample_prompts": ["[trigger]"]})
    assert (cfg.train.steps, cfg.train.lr, cfg.lora.rank, cfg.train.ema) == (12, 2e-4, 8, False)
    assert cfg.sample.every == base.sample.every and cfg.sample.prompts == ["[trigger]"]
    expert = job_config(base, config_yaml="train:\n  steps: 7\n")
    assert expert.train.steps == 7 and expert.lora.rank == 16  # standalone: JobConfig's defaults
    with pytest.raises(ConfigError, match="train.steps"):
        job_config(base, {"steps": 0})
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        job_config(base, config_yaml="train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match="config_yaml"):
        job_config(base, config_yaml="train: [1, 2")


def test_submit_writes_the_config_and_the_index_and_runs_jobs_train(service, prepared_sample):
    rec = submit(service, prepared_sample, steps=5)
    job = service._client.jobs[rec.submission_id]
    assert rec.submission_id == f"fluxray-{rec.job_id}" and rec.job_id.startswith("pxco-")
    assert job.entrypoint.endswith(f"jobs/train.py --config {rec.config}")
    assert job.runtime_env["working_dir"] == str(REPO)
    cfg = load_config(rec.config)
    assert cfg.save.name == rec.run_name == rec.job_id
    assert cfg.storage_root == service.root.resolve() and cfg.train.steps == 5
    assert (cfg.dataset.path, cfg.dataset.trigger_word) == (str(prepared_sample), "pxco")
    # The index is on disk: a new service (a redeployed replica) lists the same job.
    fresh = JobService(service.root)
    fresh._client = service._client
    assert [j["job_id"] for j in fresh.list()] == [rec.job_id]


def test_a_refused_submit_leaves_nothing_behind(service, prepared_sample):
    service._client = FakeJobClient(fail=True)
    with pytest.raises(ClusterUnavailable, match="did not accept"):
        submit(service, prepared_sample)
    assert not list(service.index.iterdir())


def test_view_reads_progress_eta_losses_and_samples_from_the_run_folder(service, prepared_sample):
    rec = submit(service, prepared_sample, steps=20, sample_every=10)
    service._client.jobs[rec.submission_id].status = JobStatus.RUNNING
    record = RunRecord(service.root / "runs" / rec.run_name)
    record.set_status(state="running", step=5, total=20, loss=0.5, sec_per_step=2.0, sample_seconds=3.0,
                      convergence="likely converged at step 4", converged_step=4, best_step=5)
    for step in range(1, 6):
        record.log_metrics({"loss": 1 / step}, step)
    record.log_metrics({"val_loss": 0.7}, 0)
    for key in ("sample_0", "grid"):
        record.sample_path(key, 0).write_bytes(b"png")
    job = service.get(rec.job_id, "/v1/jobs/")
    assert (job["status"], job["step"], job["total"], job["progress"], job["loss"]) == ("RUNNING", 5, 20, 0.25, 0.5)
    assert job["eta_seconds"] == 15 * 2.0 + 2 * 3.0  # steps left, and the previews at 10 and 20
    assert (job["convergence"], job["converged_step"], job["best_step"], job["sample_seconds"]) == \
        ("likely converged at step 4", 4, 5, 3.0)
    assert job["losses"] == [[s, 1 / s] for s in range(1, 6)] and job["val_losses"] == [[0, 0.7]]
    assert job["samples"] == [{"step": 0, "images": [f"/v1/jobs/{rec.job_id}/samples/step000000-sample_0.png"],
                               "grid": f"/v1/jobs/{rec.job_id}/samples/step000000-grid.png"}]
    assert job["sample_prompts"][0]["prompt"].startswith("pxco, ")
    assert service.sample_file(rec.job_id, "step000000-sample_0.png").read_bytes() == b"png"
    with pytest.raises(JobNotFound):
        service.sample_file(rec.job_id, "../config.yaml")


def test_without_ray_the_run_folder_decides_the_status(service, prepared_sample):
    rec = submit(service, prepared_sample)
    service._client.jobs.clear()  # a new cluster: Ray forgot the job
    assert service.get(rec.job_id)["status"] == "UNKNOWN"
    RunRecord(service.root / "runs" / rec.run_name).set_status(state="finished", step=40, total=40)
    job = service.get(rec.job_id)
    assert (job["status"], job["progress"]) == ("SUCCEEDED", 1.0)
    with pytest.raises(JobNotFound):
        service.get("../jobs/x")


def test_an_expert_config_cannot_move_checkpoints_or_tracking_off_the_service(tmp_path, prepared_sample):
    operator = load_config(REPO / "configs" / "tiny.yaml", [f"storage.root={tmp_path / 'root'}",
                                                            "tracking.uri=sqlite:////srv/mlflow.db"])
    svc = JobService(tmp_path / "root", operator=operator)
    svc._client = FakeJobClient()
    sneaky = job_config(operator, config_yaml="storage:\n  checkpoints: /elsewhere\ntracking:\n  uri: sqlite:////tmp/x.db\n")
    rec = svc.submit(sneaky, "ds", prepared_sample, "pxco")
    written = load_config(tmp_path / "root" / "jobs" / f"{rec.job_id}.yaml")
    assert written.storage.checkpoints is None and written.tracking.uri == "sqlite:////srv/mlflow.db"
    assert written.storage.root == str(tmp_path / "root")


def test_a_job_whose_driver_waits_is_pending_with_its_reason_and_place_never_running(service, prepared_sample):
    rec = submit(service, prepared_sample)
    ray_job = service._client.jobs[rec.submission_id]
    ray_job.status, ray_job.start_time = JobStatus.RUNNING, 1_000_000  # ms: the driver started at t=1000 s
    record = RunRecord(service.root / "runs" / rec.run_name)
    # A status left by an earlier run of the same name (written before this driver started).
    record.set_status(state="running", step=7, total=40)
    (record.dir / "status.json").write_text(json.dumps({**json.loads((record.dir / "status.json").read_text()),
                                                        "updated": 999.0}))
    job = service.get(rec.job_id)
    assert (job["status"], job["message"]) == ("PENDING", "the job driver is starting (preparing the dataset)")
    record.set_status(state="queued", reason="queued behind pxco-1", queue_position=2)
    job = service.get(rec.job_id)
    assert (job["status"], job["message"], job["queue_position"]) == ("PENDING", "queued behind pxco-1", 2)
    record.set_status(state="starting", reason="starting 2 workers x 1 CPU", queue_position=None)
    assert (service.get(rec.job_id)["status"], service.get(rec.job_id)["queue_position"]) == ("PENDING", None)
    record.set_status(state="running", reason=None, step=1)
    assert service.get(rec.job_id)["status"] == "RUNNING"
    ray_job.status, ray_job.message = JobStatus.FAILED, "Job entrypoint command failed with exit code 2"
    record.set_status(state="failed", reason="distributed.start_timeout_s: the workers could not start ...")
    job = service.get(rec.job_id)
    assert (job["status"], job["message"]) == ("FAILED", "distributed.start_timeout_s: the workers could not start ...")


def test_jobs_started_with_ray_job_submit_under_the_root_are_listed_and_followed(service, prepared_sample, tmp_path):
    from fluxray.config import dump_config

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"dataset.path={prepared_sample}", "save.name=cli-run"])
    run = service.root / "runs" / "cli-run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    RunRecord(run).set_status(state="running", step=10, total=40, ray_job_id="05000000", submission_id="raysubmit_x",
                              submitted=123.0)
    service._client.jobs["raysubmit_x"] = SimpleNamespace(submission_id="raysubmit_x", job_id="05000000",
                                                          status=JobStatus.RUNNING, message="", start_time=0)
    # A --local run (no Ray job to follow) and a run being written are left out.
    RunRecord(service.root / "runs" / "local-run").set_status(state="finished", step=2, total=2)
    listed = {j["job_id"]: j for j in service.list()}
    assert set(listed) == {"cli-run"}
    job = listed["cli-run"]
    assert (job["status"], job["step"], job["progress"], job["dataset_id"], job["created"]) == \
        ("RUNNING", 10, 0.25, "pxco", 123.0)
    assert service.record("cli-run").submission_id == "raysubmit_x"  # indexed: get, logs and stop find it
    # A `fluxray train` driver is a Ray job without a submission: followed by its Ray job id.
    other = service.root / "runs" / "train-run"
    other.mkdir()
    (other / "config.yaml").write_text(dump_config(cfg))
    RunRecord(other).set_status(state="finished", step=40, total=40, ray_job_id="06000000")
    service._client.jobs["06000000"] = SimpleNamespace(submission_id=None, job_id="06000000",
                                                       status=JobStatus.SUCCEEDED, message="", start_time=0)
    assert {j["job_id"]: j["status"] for j in service.list()}["train-run"] == "SUCCEEDED"
    with pytest.raises(FluxrayError, match="runs from `fluxray train`, not as a Ray Job"):
        service.logs("train-run")
