"""The HTTP API on a real Serve app and a real Ray cluster: upload the sample set, train one tiny
job through Ray Jobs (shared by the tests), follow it, and generate with its LoRAs."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "pxco"
TOKEN = "test-token"
STEPS, EVERY = 20, 10
PROMPT = "[trigger], professional portrait photo, high quality, detailed"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.fixture(scope="module")
def service(deploy_service, tmp_path_factory):
    from ray import serve

    # A LoRA file at every preview step, so the step-10 LoRA is there to compare with.
    svc = deploy_service(tmp_path_factory.mktemp("serve-api"), overrides=(f"save.every={EVERY}",),
                         api_token=TOKEN, generation_queue=2)
    yield svc
    serve.delete("fluxray")


@pytest.fixture(scope="module")
def job_id(http, dataset):
    """The shared tiny job: 20 steps, previews every 10 with one prompt, 64 px (tiny.yaml)."""
    r = http.post("/v1/jobs", json={"dataset_id": dataset, "steps": STEPS, "sample_every": EVERY,
                                    "sample_prompts": [PROMPT]})
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


@pytest.fixture(scope="module")
def finished(http, job_id, wait):
    def done():
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    job = wait(done, 400, every=2, what=f"job {job_id}")
    assert job["status"] == "SUCCEEDED", http.get(f"/v1/jobs/{job_id}/logs", params={"tail": 60}).text
    return job


def test_redeploy_mid_job_keeps_the_job_and_its_status(service, http, job_id, deploy_service, ray_cluster, wait):
    from ray.job_submission import JobSubmissionClient

    ray_jobs = JobSubmissionClient(ray_cluster.dashboard_url)
    # RUNNING once its worker is placed (PENDING before): the driver's start, the queue and the
    # worker's start take minutes on a busy 2-core machine.
    status = wait(lambda: (s := http.get(f"/v1/jobs/{job_id}").json()["status"]) != "PENDING" and s, 400,
                  every=0.5, what="the job to leave PENDING")
    assert status == "RUNNING", status
    # Changed args give the ingress new replicas: nothing of the old replica's memory survives.
    deploy_service(service.root, **{**service.given, "max_upload_mb": 256})
    with service.client() as fresh:
        assert fresh.get("/v1/defaults").json()["limits"]["max_upload_mb"] == 256  # the new replica answers
        listed = {j["job_id"]: j for j in fresh.get("/v1/jobs").json()}
    assert job_id in listed
    truth = ray_jobs.get_job_status(f"fluxray-{job_id}").value
    assert truth != "SUCCEEDED", "the job ended before the redeploy: the test did not redeploy mid-job"
    assert listed[job_id]["status"] == truth


def test_every_api_route_needs_the_token(service):
    with service.client() as c:
        c.headers.pop("Authorization")
        assert c.get("/healthz").status_code == 200
        for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/defaults"), ("GET", "/v1/loras"),
                             ("POST", "/v1/generate"), ("POST", "/v1/datasets")]:
            r = c.request(method, path)
            assert r.status_code == 401, (path, r.status_code)
        c.headers["Authorization"] = "Bearer wrong"
        assert c.get("/v1/jobs").status_code == 401


def test_zip_slip_is_refused_and_nothing_is_written(service, http):
    outside = service.root.parent

    def outside_root():  # the training job writes inside the root meanwhile
        return sorted(p for p in outside.rglob("*") if service.root not in p.parents and p != service.root)

    before, uploads = outside_root(), sorted((service.root / "uploads").iterdir())
    for evil in ("../evil.png", "../../../evil.png", "/tmp/evil.png"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("0001.png", (SAMPLES / "0001.png").read_bytes())
            z.writestr(evil, (SAMPLES / "0002.png").read_bytes())
            z.writestr("captions.json", '{"0001.png": "a man", "evil.png": "x"}')
        r = http.post("/v1/datasets", files=[("images", ("set.zip", buf.getvalue(), "application/zip"))],
                      data={"trigger_word": "pxco"})
        assert r.status_code == 400 and evil in r.json()["detail"], r.text
    r = http.post("/v1/datasets", files=[("images", ("../evil.png", b"x", "image/png"))], data={"trigger_word": "pxco"})
    assert r.status_code == 400 and "../evil.png" in r.json()["detail"]
    assert outside_root() == before
    assert not list(outside.rglob("evil.png"))
    assert sorted((service.root / "uploads").iterdir()) == uploads


def test_a_zip_of_a_folder_is_prepared(http):
    captions = json.loads((SAMPLES / "captions.json").read_text())
    names = sorted(captions)[:4]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            z.writestr(f"pxco/{name}", (SAMPLES / name).read_bytes())
        z.writestr("pxco/captions.json", json.dumps({n: captions[n] for n in names}))
        z.writestr("__MACOSX/pxco/._0001.png", b"resource fork")
    r = http.post("/v1/datasets", files=[("images", ("pxco.zip", buf.getvalue(), "application/zip"))],
                  data={"trigger_word": "pxco"})
    assert r.status_code == 200, r.text
    assert [i["source"] for i in r.json()["report"]["images"]] == names


def test_bad_job_settings_name_the_key(http, dataset):
    r = http.post("/v1/jobs", json={"dataset_id": dataset, "steps": 0})
    assert r.status_code == 422 and "train.steps" in r.json()["detail"]
    r = http.post("/v1/jobs", json={"dataset_id": dataset, "config_yaml": "train:\n  stepz: 10\n"})
    assert r.status_code == 422 and "train.stepz" in r.json()["detail"] and "train.steps" in r.json()["detail"]
    r = http.post("/v1/jobs", json={"dataset_id": "no-such-set", "steps": 5})
    assert r.status_code == 422 and "no-such-set" in r.json()["detail"]
    # A job this 2-CPU cluster can never schedule: refused now, with the fix, and nothing submitted.
    def job_ids():  # an earlier test's job may still be training: its progress moves, its id does not
        return sorted(j["job_id"] for j in http.get("/v1/jobs").json())

    jobs_before = job_ids()
    r = http.post("/v1/jobs", json={"dataset_id": dataset, "config_yaml": "distributed:\n  workers: 3\n"})
    assert r.status_code == 422 and r.json()["detail"] == (
        "distributed: the job needs 3 workers x 1 CPU; the cluster has 2 CPU: set distributed.workers=2"), r.text
    assert job_ids() == jobs_before
    assert http.get("/v1/jobs/no-such-job").status_code == 404
    assert http.post("/v1/generate", json={"prompt": "x", "lora": "no-such-lora"}).status_code == 404
    assert http.post("/v1/generate", json={"prompt": "x", "width": 70}).status_code == 422


def test_defaults_come_from_the_base_config(http):
    d = http.get("/v1/defaults").json()
    assert d["simple"] == {"steps": 40, "learning_rate": 0.001, "rank": 4, "batch_size": 1, "ema": True,
                           "sample_every": 20, "sample_prompts": d["simple"]["sample_prompts"]}
    assert len(d["simple"]["sample_prompts"]) == 3
    assert d["generate"]["width"] == 64 and "storage" not in d["config_yaml"]


def test_serve_yaml_opens_with_its_command_and_builds_the_app():
    from ray.serve.deployment import Application

    from fluxray.serve.app import build_app

    path = REPO / "configs" / "serve.yaml"
    assert "serve run configs/serve.yaml" in path.read_text().splitlines()[1]
    app = yaml.safe_load(path.read_text())["applications"][0]
    assert app["import_path"] == "fluxray.serve.app:build_app"
    assert isinstance(build_app(app["args"]), Application)


def test_cli_serve_reports_a_bad_config_in_one_line(ray_cluster):
    r = subprocess.run([str(Path(sys.executable).parent / "fluxray"), "serve", "--config", "no-such.yaml",
                        "--address", ray_cluster.address], capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "fluxray serve: error: config file not found: no-such.yaml"
    assert "Traceback" not in r.stderr


def test_cli_serve_refuses_to_listen_beyond_this_machine_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "FLUXRAY_API_TOKEN"}
    r = subprocess.run([str(Path(sys.executable).parent / "fluxray"), "serve", "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "fluxray serve: error: --host 0.0.0.0: refusing to serve the API beyond this machine without a token; "
        "set FLUXRAY_API_TOKEN"), r.stderr


def test_the_token_is_read_where_the_replica_runs_from_an_owner_only_file(tmp_path, monkeypatch):
    from fluxray.errors import ConfigError
    from fluxray.serve.app import ServiceConfig, read_api_token

    monkeypatch.setenv("FLUXRAY_API_TOKEN", "from-the-environment")
    path = tmp_path / "api-token"
    path.write_text("from-the-file\n")
    path.chmod(0o600)
    assert read_api_token(ServiceConfig(api_token_file=str(path))) == "from-the-file"
    assert read_api_token(ServiceConfig(api_token="given", api_token_file=str(path))) == "given"
    assert read_api_token(ServiceConfig()) == "from-the-environment"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"api_token_file: {path} may be read by others \(mode 644\); chmod 600"):
        read_api_token(ServiceConfig(api_token_file=str(path)))
    path.write_text("")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_api_token(ServiceConfig(api_token_file=str(path)))
    with pytest.raises(ConfigError, match="cannot read .*/missing on the node the API replica runs on"):
        read_api_token(ServiceConfig(api_token_file=str(tmp_path / "missing")))


def test_advise_names_the_guides_step_minimum(http, dataset):
    r = http.post("/v1/advise", json={"dataset_id": dataset, "steps": 20})
    assert r.status_code == 200, r.text
    few = [a for a in r.json() if a["id"] == "steps.too_few"]
    assert few and few[0]["key"] == "train.steps" and few[0]["severity"] == "warning"
    assert not [a for a in http.post("/v1/advise", json={"steps": 1000}).json() if a["id"] == "steps.too_few"]


def test_advise_shows_the_memory_plan_for_the_named_card(http):
    r = http.post("/v1/advise", json={"gpu": "RTX 4090"})
    assert r.status_code == 200, r.text
    plan = [a for a in r.json() if a["id"] == "memory.peak"]
    assert plan and re.fullmatch(r"peak GPU memory per worker: \d+\.\d GiB \(fits RTX 4090 24 GB\)",
                                 plan[0]["message"]), plan
    assert "ZeRO-0" in plan[0]["fix"]  # what auto took, with its numbers
    r = http.post("/v1/advise", json={"gpu": "Z80"})
    assert r.status_code == 422 and "unknown GPU 'Z80'" in r.json()["detail"]


def test_job_succeeds_with_samples_for_every_sample_step(http, finished, job_id):
    assert finished["step"] == finished["total"] == STEPS and finished["progress"] == 1.0
    assert [s["step"] for s in finished["samples"]] == [0, 10, 20]
    for s in finished["samples"]:
        assert len(s["images"]) == 1 and s["grid"]
        r = http.get(s["images"][0])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert len(finished["losses"]) == STEPS and finished["val_losses"]
    assert finished["step_loras"] == [f"{job_id}@10", f"{job_id}@20"]
    assert finished["mlflow"]["run_id"]
    listed = http.get("/v1/jobs").json()
    assert [j["status"] for j in listed if j["job_id"] == job_id] == ["SUCCEEDED"]
    assert "LoRA written to" in http.get(f"/v1/jobs/{job_id}/logs").text


def test_loras_lists_the_trained_lora_with_trigger_and_job(http, finished, job_id):
    loras = {l["id"]: l for l in http.get("/v1/loras").json()}
    assert loras[job_id]["trigger_word"] == "pxco"
    assert loras[job_id]["job_id"] == job_id
    assert loras[job_id]["steps"] == STEPS


def test_generate_with_the_lora_differs_from_the_base_model(http, finished, job_id):
    body = {"prompt": "pxco, portrait photo", "seed": 3, "steps": 4, "width": 64, "height": 64}
    with_lora = http.post("/v1/generate", json={**body, "lora": job_id})
    base = http.post("/v1/generate", json={**body, "lora": None})
    assert with_lora.status_code == base.status_code == 200
    assert with_lora.headers["content-type"] == "image/png"
    assert pixels(with_lora.content).shape == (64, 64, 3)
    assert not np.array_equal(pixels(with_lora.content), pixels(base.content))
    # The same request twice is the same image (seeded, no state left behind by the LoRA).
    assert np.array_equal(pixels(http.post("/v1/generate", json={**body, "lora": None}).content),
                          pixels(base.content))


def test_generate_reproduces_the_final_preview_exactly(http, finished, job_id):
    p = finished["sample_prompts"][0]
    r = http.post("/v1/generate", json={"prompt": p["prompt"], "lora": job_id, "seed": p["seed"],
                                        "steps": p["steps"], "guidance": p["guidance"], "width": p["width"],
                                        "height": p["height"], "lora_scale": p["lora_scale"]})
    assert r.status_code == 200, r.text
    final = finished["samples"][-1]
    assert final["step"] == STEPS
    preview = http.get(final["images"][0]).content
    assert np.array_equal(pixels(r.content), pixels(preview))


def test_concurrent_generates_with_two_loras_match_sequential_ones(http, finished, job_id):
    p = finished["sample_prompts"][0]
    body = {"prompt": p["prompt"], "seed": p["seed"], "steps": p["steps"], "width": 64, "height": 64}
    loras = [f"{job_id}@10", job_id]
    sequential = [pixels(http.post("/v1/generate", json={**body, "lora": l}).content) for l in loras]
    assert not np.array_equal(*sequential)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            results = list(pool.map(lambda l: http.post("/v1/generate", json={**body, "lora": l}), loras))
            assert [r.status_code for r in results] == [200, 200]
            for r, expected in zip(results, sequential):
                assert np.array_equal(pixels(r.content), expected)
    # The step-10 LoRA is also the job's step-10 preview.
    step10 = next(s for s in finished["samples"] if s["step"] == 10)
    assert np.array_equal(sequential[0], pixels(http.get(step10["images"][0]).content))


def test_overload_sheds_with_503_never_500(http, finished, job_id):
    body = {"prompt": "pxco", "seed": 1, "steps": 4, "width": 64, "height": 64, "lora": job_id}
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: http.post("/v1/generate", json=body).status_code, range(12)))
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes


def test_expert_job_can_be_stopped(http, dataset, finished, wait):
    # After the shared job, so the two never compete for the 2 cores.
    config = yaml.safe_load(http.get("/v1/defaults").json()["config_yaml"])
    config["train"]["steps"] = 500
    r = http.post("/v1/jobs", json={"dataset_id": dataset, "config_yaml": yaml.safe_dump(config)})
    assert r.status_code == 200, r.text
    job = r.json()["job_id"]
    assert http.post(f"/v1/jobs/{job}/stop").status_code == 200
    wait(lambda: http.get(f"/v1/jobs/{job}").json()["status"] == "STOPPED", 60, what="the job to stop")

