"""Serve fixtures: Ray Serve on the session's cluster (HTTP proxy on 127.0.0.1, a free port),
`deploy_service(**args)` that runs the fluxray app there with the random model, and `http` / `dataset`
(a client of a module's `service`, the sample set uploaded to it)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
APP = "fluxray"


@dataclass
class Service:
    url: str
    root: Path
    given: dict  # what the test passed to deploy_service, to redeploy with a change
    token: str | None = None

    def client(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kw)


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def deploy_service(serve_url, random_flux, quick_recipe):
    """`deploy_service(root, **args)` -> Service: (re)deploys the app on the tiny config, cut to the
    quick recipe unless `quick=False` (a test of the demo's own settings), and waits until it
    answers; the module that deployed it calls `serve.delete` when done."""
    from ray import serve

    from fluxray.serve.app import build_app

    def deploy(root: Path, overrides: tuple[str, ...] = (), quick: bool = True, **given) -> Service:
        # The session's random model (built once) and a per-module storage root; one Ray Train
        # worker, as 2 cores gain nothing from two.
        args = {"config": str(REPO / "configs" / "tiny.yaml"),
                "overrides": [f"storage.root={root}", f"model.path={random_flux}", *(quick_recipe if quick else ()),
                              "distributed.workers=1", *overrides],
                **given}
        serve.run(build_app(args), name=APP, route_prefix="/")
        svc = Service(serve_url, Path(root), {"overrides": overrides, "quick": quick, **given}, given.get("api_token"))
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{serve_url}/healthz", timeout=5).status_code == 200:
                    return svc
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the fluxray Serve app did not come up")
            time.sleep(0.5)

    yield deploy


@pytest.fixture(scope="module")
def http(service):
    """A client of the module's own `service` fixture (each module deploys its app), with its token."""
    with service.client() as c:
        yield c


def upload_samples(client: httpx.Client) -> str:
    """The bundled sample set uploaded through `client` (18 images, trigger pxco); its dataset id."""
    samples = REPO / "samples" / "pxco"
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(samples.glob("*.png"))]
    files.append(("captions", ("captions.json", (samples / "captions.json").read_bytes(), "application/json")))
    r = client.post("/v1/datasets", files=files, data={"trigger_word": "pxco"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["report"]["images"]) == 18
    return body["dataset_id"]


@pytest.fixture(scope="module")
def dataset(http):
    """The bundled sample set uploaded to the module's service; its id."""
    return upload_samples(http)


def follow_job(client: httpx.Client, job_id: str, on_view, timeout: float) -> dict:
    """Poll GET /v1/jobs/{job_id} every 0.5 s, handing each view to `on_view`, until the job ends;
    returns its last view (the job's log tail on timeout)."""
    deadline = time.time() + timeout
    while True:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return view
        on_view(view)
        if time.time() > deadline:
            raise AssertionError(client.get(f"/v1/jobs/{job_id}/logs", params={"tail": 80}).text)
        time.sleep(0.5)


@pytest.fixture(scope="session")
def jobs_helpers():
    """(`upload_samples(client)`, `follow_job(client, job_id, on_view, timeout)`) for modules that
    run their own service."""
    return upload_samples, follow_job


def wait_for(predicate, timeout: float, every: float = 1.0, what: str = "condition"):
    """Poll `predicate()` until it returns a truthy value; returns it."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def wait():
    return wait_for
