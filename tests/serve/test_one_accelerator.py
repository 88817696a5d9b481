"""One accelerator for generation and training, as on a one-GPU box: a cluster of its own whose one
custom resource `accel` stands in for the GPU, asked for by the generation replica
(`generation_resources`) and by each training worker (`distributed.resources_per_worker`).

The service is deployed as docs/api.md says, `serve deploy` of configs/serve.yaml (its args pointed
at this cluster) from a shell without FLUXRAY_API_TOKEN: the token is read from `api_token_file`
where the replica runs, and /v1 is closed without it. A job submitted while generation is warm
waits, runs to the end, and a generate call while it holds the accelerator is an immediate 503 with
Retry-After. The shell that started Ray had a token exported: no training worker holds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SMALL = {"prompt": "[trigger], portrait", "steps": 2, "width": 64, "height": 64}
FILE_TOKEN, SHELL_TOKEN = "token-from-the-file", "token-of-the-shell-that-started-ray"


@pytest.fixture(scope="module")
def one_accel(tmp_path_factory):
    """`ray start --head` with the machine's CPUs and one `accel`, from a shell that exported a token."""
    from fluxray.cluster import start_head

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXRAY_API_TOKEN", SHELL_TOKEN)
        node = start_head(Path("/tmp") / f"ra{os.getpid()}", resources={"accel": 1},
                          log=tmp_path_factory.mktemp("ray-accel") / "ray-start.log")
    yield node
    node.stop()
    shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(one_accel, random_flux, quick_recipe, tmp_path_factory):
    """configs/serve.yaml with its args set for this cluster, `serve deploy`ed; (url, storage root)."""
    from fluxray.cluster import free_port

    root = tmp_path_factory.mktemp("serve-accel")
    token_file = root.parent / "api-token"
    token_file.write_text(FILE_TOKEN + "\n")
    token_file.chmod(0o600)
    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port = free_port()
    args = config["applications"][0]["args"]
    args["overrides"] = [f"storage.root={root}", f"model.path={random_flux}", *quick_recipe, "distributed.workers=1",
                         "distributed.resources_per_worker={accel: 1}"]
    args.update(api_token_file=str(token_file), generation_resources={"accel": 1}, generation_idle_s=5)
    path = root.parent / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shell = {k: v for k, v in os.environ.items() if k != "FLUXRAY_API_TOKEN"}
    r = subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "--address",
                        one_accel.dashboard_url], cwd=REPO, env=shell, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:  # `serve deploy` returns once the config is accepted; the app comes up after
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the app deployed with serve deploy never answered"
        time.sleep(1)
    return url, root


def test_without_the_token_from_the_file_v1_is_closed(deployed):
    url, _ = deployed
    assert httpx.get(f"{url}/v1/jobs").status_code == 401
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {SHELL_TOKEN}"}).status_code == 401
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {FILE_TOKEN}"}).status_code == 200
    assert httpx.get(f"{url}/healthz").status_code == 200


@pytest.fixture(scope="module")
def shared_accel(deployed, one_accel, train_workers, jobs_helpers):
    """Generation warm, then a 6-step job on the one accelerator; what each step saw."""
    upload_samples, follow_job = jobs_helpers
    url, _ = deployed
    seen: dict = {"pending": []}

    def on_view(view: dict) -> None:
        if view["status"] == "PENDING":
            seen["pending"].append(view)
        elif view["status"] == "RUNNING" and view["step"] > 0 and "generate_running" not in seen:
            start = time.monotonic()
            r = http.post("/v1/generate", json=SMALL)
            seen["generate_running"] = (r, time.monotonic() - start)
            seen["environs"] = [w.environ() for w in train_workers(one_accel)]

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {FILE_TOKEN}"}, timeout=300) as http:
        dataset = upload_samples(http)
        assert http.post("/v1/generate", json=SMALL).status_code == 200  # the replica is up: it holds the accel
        r = http.post("/v1/jobs", json={"dataset_id": dataset, "steps": 6, "sample_every": 3,
                                        "sample_prompts": ["[trigger], portrait"]})
        assert r.status_code == 200, r.text
        job = seen["job"] = r.json()["job_id"]
        seen["final"] = follow_job(http, job, on_view, timeout=900)
        seen["logs"] = http.get(f"/v1/jobs/{job}/logs").text
        seen["generate_after"] = http.post("/v1/generate", json=SMALL)
    return seen


def test_a_job_submitted_while_generation_holds_the_accelerator_waits_then_runs_to_the_end(shared_accel):
    final = shared_accel["final"]
    assert final["status"] == "SUCCEEDED", (final["message"], shared_accel["logs"][-3000:])
    assert final["step"] == final["total"] == 6 and [s["step"] for s in final["samples"]] == [0, 3, 6]
    waiting = [v for v in shared_accel["pending"] if v["queue_position"]]
    assert any("1 accel" in v["message"] and "generation replica" in v["message"] for v in waiting), \
        [v["message"] for v in shared_accel["pending"]]
    assert shared_accel["generate_after"].status_code == 200


def test_generate_while_the_job_holds_the_accelerator_is_an_immediate_503_with_retry_after(shared_accel):
    r, seconds = shared_accel["generate_running"]
    assert r.status_code == 503, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert f"training job {shared_accel['job']} holds" in detail and "1 accel" in detail, detail
    assert int(r.headers["retry-after"]) >= 1 and seconds < 30


def test_no_training_worker_holds_a_token(shared_accel):
    environs = shared_accel["environs"]
    assert len(environs) == 1, environs  # the job's one worker, looked at while it trained
    for env in environs:
        assert SHELL_TOKEN not in env.values() and FILE_TOKEN not in env.values()
