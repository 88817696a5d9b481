"""The Serve application: a FastAPI ingress (datasets, jobs, LoRAs, generate, the web page) and
the generation deployment behind it.

    fluxray serve --config configs/tiny.yaml          # or: serve run configs/serve.yaml
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal

import yaml
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from fluxray.advise.memory import memory_advice, target_gpu
from fluxray.advise.rules import advise as advise_config
from fluxray.advise.rules import dataset_facts
from fluxray.config import JobConfig, load_config
from fluxray.data.captions import TRIGGER_PLACEHOLDER
from fluxray.data.prepare import PrepareError, read_prepared
from fluxray.errors import ConfigError, DatasetError, FluxrayError
from fluxray.model.lora import read_lora_metadata
from fluxray.serve.generation import Generator
from fluxray.serve.jobs import ClusterUnavailable, JobNotFound, JobService, job_config, simple_defaults
from fluxray.serve.loras import LoraNotFound, list_loras, lora_path
from fluxray.serve.uploads import Limits, UploadError, dataset_dir, save_upload

STATIC = Path(__file__).resolve().parent / "static"
_API = "/v1/"


class GenerationUnavailable(FluxrayError):
    """The generation deployment cannot take the request now (queue full, replica lost, training
    holds or waits for its resources); retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 5):
        super().__init__(message)
        self.retry_after = retry_after


#: Hosts that only this machine reaches: the one place /v1 may be served without a token.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServiceConfig(BaseModel):
    """How the service runs: the Serve app's `args` (configs/serve.yaml) and `fluxray serve` flags."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="Base job config YAML: the defaults of every job and of generation.")
    overrides: list[str] = Field([], description="`dotted.key=value` overrides of the base config.")
    api_token: str | None = Field(None, description="Bearer token required on /v1/*; None takes `api_token_file`, else $FLUXRAY_API_TOKEN; none of them means no auth (loopback only).")
    api_token_file: str | None = Field(None, description="File holding the bearer token, readable by its owner only, read where the API replica runs (how `serve run`/`serve deploy` configs set it).")
    max_upload_files: int = Field(500, ge=1, description="Files per dataset upload (images, or entries of the zip).")
    max_upload_mb: int = Field(512, ge=1, description="Bytes per dataset upload, uncompressed, in MiB.")
    max_file_mb: int = Field(100, ge=1, description="Bytes per uploaded file (or zip entry), uncompressed, in MiB.")
    ray_address: str | None = Field(None, description="Ray dashboard address jobs are submitted to; None: the cluster the service runs on.")
    mlflow_ui: str | None = Field(None, description="Base URL of an MLflow UI over the tracking store, for run links (an http tracking URI links by itself).")
    max_loras: int = Field(4, ge=1, description="LoRAs kept loaded per generation replica (least recently used go first).")
    generation_replicas: int = Field(1, ge=1, description="Most replicas of the generation deployment; it scales between 0 and this with the requests.")
    generation_idle_s: float = Field(60.0, ge=0, description="Seconds without a generate request before a generation replica is let go, its GPU (or CPU) back to training; the next request starts one.")
    generation_gpus: float | Literal["auto"] = Field("auto", description="GPUs per generation replica; `auto` is 1 when the cluster has GPUs.")
    generation_resources: dict[str, float] = Field({}, description="Other Ray resources per generation replica, e.g. the custom accelerator resource the training workers ask for too.")
    generation_queue: int = Field(8, ge=1, description="Generate requests queued per caller before the API answers 503.")
    generation_timeout_s: float = Field(600.0, gt=0, description="Seconds a generate request may wait and render before the API cancels it and answers 503.")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb << 20


def resolve_base_config(settings: ServiceConfig) -> JobConfig:
    """The base job config with an absolute storage root (replicas and jobs run elsewhere).

    A relative `config` is looked up from the working directory, then from the source checkout,
    so `configs/tiny.yaml` works for `serve run` and `serve deploy` from the repo.
    """
    path = settings.config
    if path and not Path(path).is_absolute() and not Path(path).exists():
        checkout = Path(__file__).resolve().parents[2] / path
        path = str(checkout) if checkout.exists() else path
    cfg = load_config(path, settings.overrides)
    data = cfg.model_dump(mode="json")
    data["storage"]["root"] = str(cfg.storage_root)
    return JobConfig.model_validate(data)


# ---------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------

def _cluster_gpu_type() -> str | None:
    """The GPU model Ray found on the cluster's nodes (its `accelerator_type:<name>` resource), if any."""
    import ray

    from fluxray.track.flops import find_gpu

    types = [k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:")]
    return next((t for t in types if find_gpu(t)), None)


class JobRequest(BaseModel):
    """A training job: a dataset plus simple settings, or one whole YAML config (expert mode)."""

    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(..., description="From POST /v1/datasets.")
    steps: int | None = Field(None, description="train.steps")
    learning_rate: float | None = Field(None, description="train.lr")
    rank: int | None = Field(None, description="lora.rank")
    batch_size: int | None = Field(None, description="train.batch_size")
    ema: bool | None = Field(None, description="train.ema")
    sample_every: int | None = Field(None, description="sample.every")
    sample_prompts: list[str] | None = Field(None, description="sample.prompts; `[trigger]` becomes the trigger word.")
    config_yaml: str | None = Field(None, description="Expert mode: a whole job config; dataset, storage and run name are set by the service.")

    def job_config(self, base: JobConfig) -> JobConfig:
        simple = self.model_dump(exclude={"dataset_id", "config_yaml", "gpu"}, exclude_none=True)
        if self.config_yaml is not None and simple:
            raise ConfigError(f"give either simple settings or config_yaml, not both (got {', '.join(simple)})")
        return job_config(base, simple, self.config_yaml)


class AdviseRequest(JobRequest):
    """The settings of a job to be, with or without its dataset yet."""

    dataset_id: str | None = Field(None, description="From POST /v1/datasets; without it the advice cannot count images.")
    gpu: str | None = Field(None, description="The card the memory plan is for (`RTX 4090`, `A100 40GB`, ...); default: the cluster's GPU type, else H100.")


class GenerateRequest(BaseModel):
    """One image; unset sampling settings take the base config's `sample` values."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=4000, description="`[trigger]` becomes the LoRA's trigger word.")
    lora: str | None = Field(None, description="A LoRA id from GET /v1/loras, `<job>@<step>` for a step's LoRA, or null.")
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1, le=100)
    guidance: float | None = Field(None, ge=0, le=30)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=16)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=16)
    lora_scale: float = Field(1.0, ge=-4, le=4)


# ---------------------------------------------------------------------------------------
# The FastAPI app
# ---------------------------------------------------------------------------------------

Render = Callable[[str | None, dict], Awaitable[bytes]]


def make_api(base: JobConfig, settings: ServiceConfig, render: Render) -> FastAPI:
    """The HTTP API over the storage root of `base`; `render(lora_id, params)` makes a PNG."""
    root, token = base.storage_root, settings.api_token
    jobs = JobService(root, settings.ray_address, settings.mlflow_ui, operator=base)
    limits = Limits(settings.max_upload_files, settings.max_upload_bytes, settings.max_file_mb << 20)
    app = FastAPI(title="fluxray", version="1", description="Train FLUX.1 LoRAs on Ray and generate with them.")

    # -- access and size bounds, before a body is read ------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.scope["path"].removeprefix(request.scope.get("root_path", ""))
        if path.startswith(_API):
            if token and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
                return JSONResponse({"detail": "missing or wrong bearer token"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
            if path == "/v1/datasets" and request.method == "POST":
                size = request.headers.get("content-length", "")
                if not size.isdigit():
                    return JSONResponse({"detail": "uploads need a Content-Length"}, 411)
                if int(size) > limits.max_bytes + (1 << 20):  # multipart framing on top of the files
                    return JSONResponse({"detail": f"upload of {size} bytes is over the limit of "
                                                   f"{settings.max_upload_mb} MiB (max_upload_mb)"}, 413)
        return await call_next(request)

    # -- errors: the message names the file, key or value -----------------------------------
    def error(status: int):
        return lambda request, e: JSONResponse({"detail": str(e)}, status)

    app.add_exception_handler(UploadError, lambda request, e: JSONResponse({"detail": str(e)}, e.status))
    app.add_exception_handler(GenerationUnavailable, lambda request, e: JSONResponse(
        {"detail": str(e)}, 503, headers={"Retry-After": str(max(1, round(e.retry_after)))}))
    app.add_exception_handler(PrepareError, lambda request, e: JSONResponse(
        {"detail": str(e), "report": e.report.model_dump(mode="json")}, 422))
    for exc, status in ((JobNotFound, 404), (LoraNotFound, 404), (ClusterUnavailable, 503), (ConfigError, 422),
                        (DatasetError, 422), (FluxrayError, 400)):
        app.add_exception_handler(exc, error(status))

    def sample_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}/v1/jobs/"

    # -- page -------------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"ok": True}

    @app.get("/v1/defaults", tags=["service"])
    def defaults() -> dict:
        """The base config's simple settings and sampling values (what the page prefills), its YAML
        for expert mode (without the keys the service sets per job), and the upload limits."""
        expert = base.model_dump(mode="json")
        expert.pop("storage")
        expert["dataset"].pop("path")
        expert["save"].pop("name")
        s = base.sample
        return {"simple": simple_defaults(base),
                "generate": {"seed": s.seed, "steps": s.steps, "guidance": s.guidance, "width": s.width,
                             "height": s.height, "lora_scale": 1.0},
                "config_yaml": yaml.safe_dump(expert, sort_keys=False),
                "model": base.model.path,
                "limits": {"max_upload_files": limits.max_files, "max_upload_mb": settings.max_upload_mb,
                           "max_file_mb": settings.max_file_mb}}

    # -- datasets ---------------------------------------------------------------------------
    @app.post("/v1/datasets", tags=["datasets"])
    def create_dataset(images: list[UploadFile] = File(..., description="Images, or one zip of images (and captions)."),
                       trigger_word: str = Form(..., description="One token, e.g. pxco."),
                       captions: UploadFile | None = File(None, description="Captions JSON {file: caption}, JSON list or metadata.jsonl.")) -> dict:
        """Upload and prepare a dataset; returns its id and the prepare report."""
        dataset_id, report = save_upload(root, [(f.filename, f.file) for f in images],
                                         (captions.filename, captions.file) if captions else None,
                                         trigger_word, limits)
        return {"dataset_id": dataset_id, "report": report.model_dump(mode="json")}

    # -- jobs -------------------------------------------------------------------------------
    @app.post("/v1/jobs", tags=["jobs"])
    def create_job(req: JobRequest) -> dict:
        """Submit a training job (a Ray Job running jobs/train.py); returns its id."""
        folder = dataset_dir(root, req.dataset_id)
        rec = jobs.submit(req.job_config(base), req.dataset_id, folder, read_prepared(folder).info.trigger_word)
        return {"job_id": rec.job_id}

    @app.post("/v1/advise", tags=["jobs"])
    def advise(req: AdviseRequest) -> list[dict]:
        """What the user's guide would change in these settings (never blocks a job), and the memory plan."""
        cfg = req.job_config(base)
        cfg.dataset.path = str(dataset_dir(root, req.dataset_id)) if req.dataset_id else None
        gpu, _ = target_gpu(cfg, req.gpu or _cluster_gpu_type())
        memory = memory_advice(cfg, gpu, sizes=dataset_facts(cfg)[1])
        return [a.model_dump() for a in [*advise_config(cfg), memory]]

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(request: Request) -> list[dict]:
        """Every job this service submitted, newest first, with status and progress."""
        return jobs.list(sample_url(request))

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, request: Request) -> dict:
        """Status, step and total, ETA, loss history, samples by step, LoRAs and the MLflow run."""
        return jobs.get(job_id, sample_url(request))

    @app.post("/v1/jobs/{job_id}/stop", tags=["jobs"])
    def stop_job(job_id: str, request: Request) -> dict:
        jobs.stop(job_id)
        return jobs.get(job_id, sample_url(request))

    @app.get("/v1/jobs/{job_id}/logs", tags=["jobs"], response_class=PlainTextResponse)
    def job_logs(job_id: str, tail: int | None = Query(None, ge=1)) -> str:
        """The Ray job's driver log (the last `tail` lines if given)."""
        text = jobs.logs(job_id)
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    @app.get("/v1/jobs/{job_id}/samples/{name}", tags=["jobs"], response_class=FileResponse)
    def job_sample(job_id: str, name: str):
        return FileResponse(jobs.sample_file(job_id, name), media_type="image/png")

    # -- LoRAs and generation -----------------------------------------------------------------
    @app.get("/v1/loras", tags=["generate"])
    def loras() -> list[dict]:
        """Each trained LoRA with its trigger word and its job (from the safetensors headers)."""
        return list_loras(root)

    @app.post("/v1/generate", tags=["generate"], response_class=Response,
              responses={200: {"content": {"image/png": {}}}})
    async def generate(req: GenerateRequest) -> Response:
        """A PNG from the base model, or with a LoRA (`<job>` or `<job>@<step>`) at `lora_scale`."""
        prompt = req.prompt
        if req.lora:
            meta = read_lora_metadata(lora_path(root, req.lora))
            trained_on = meta.get("base_model")
            if trained_on and trained_on != base.model.path:
                raise ConfigError(f"lora: {req.lora!r} was trained on {trained_on!r}; this service generates "
                                  f"with {base.model.path!r}")
            if meta.get("trigger_word"):
                prompt = prompt.replace(TRIGGER_PLACEHOLDER, meta["trigger_word"])
        s = base.sample
        params = {"prompt": prompt, "seed": s.seed if req.seed is None else req.seed,
                  "steps": req.steps or s.steps, "guidance": s.guidance if req.guidance is None else req.guidance,
                  "width": req.width or s.width, "height": req.height or s.height, "lora_scale": req.lora_scale}
        return Response(await render(req.lora, params), media_type="image/png")

    return app


# ---------------------------------------------------------------------------------------
# Generation gives way to training
# ---------------------------------------------------------------------------------------

def generation_need(settings: ServiceConfig) -> dict[str, float]:
    """The Ray resources of one generation replica (`generation_gpus` resolved)."""
    need = {"CPU": 1.0, "GPU": float(settings.generation_gpus), **settings.generation_resources}
    return {k: float(v) for k, v in need.items() if v}


def generation_blocked(need: dict[str, float], jobs: list[dict], replicas: int,
                       free: list[dict[str, float]]) -> GenerationUnavailable | None:
    """Why a generate request is answered 503 at once rather than queued behind training (the
    policy of docs/api.md), or None. `jobs`: the cluster's fluxray job queue; `replicas`: running
    generation replicas; `free`: each node's free resources.

    Training comes first: while a job that needs what generation uses waits or starts, no new
    generation work keeps a replica busy (it is let go after `generation_idle_s`). With no replica
    up, one that does not fit the free resources would hold the request until training ends.
    """
    from fluxray.cluster.admission import fmt, pack, seconds_left

    def overlap(job: dict) -> dict[str, float]:
        return {k: v for k, v in need.items() if k in job["demand"]}

    waiting = [j for j in jobs if j["state"] in ("queued", "starting") and overlap(j)]
    if waiting:
        return GenerationUnavailable(
            f"generate: training comes first: job {waiting[0]['run_name']} is waiting for the "
            f"{fmt(overlap(waiting[0]))} a generation replica uses; generation resumes once it runs "
            f"(if the cluster has room) or ends", retry_after=30)
    if replicas == 0 and not pack([need], free):
        holders = [j for j in jobs if j["state"] == "running" and overlap(j)]
        left = max((seconds_left(j) or 0.0 for j in holders), default=0.0)
        who = (f"training job {', '.join(j['run_name'] for j in holders)} holds" if holders
               else "other Ray work holds")
        when = f" (~{max(1, round(left / 60))} min)" if left else ""
        return GenerationUnavailable(f"generate: {who} the {fmt(need)} a generation replica needs; "
                                     f"retry when it ends{when}", retry_after=min(max(left, 10.0), 600.0))
    return None


# ---------------------------------------------------------------------------------------
# Serve deployments
# ---------------------------------------------------------------------------------------

def read_api_token(settings: ServiceConfig) -> str | None:
    """The bearer token: `api_token`, else the `api_token_file` (owner-only), else
    $FLUXRAY_API_TOKEN of this process. Runs where the replica runs."""
    if settings.api_token:
        return settings.api_token
    if settings.api_token_file:
        path = Path(settings.api_token_file).expanduser()
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise ConfigError(f"api_token_file: cannot read {path} on the node the API replica runs on: "
                              f"{e.strerror}") from None
        if mode & 0o077:
            raise ConfigError(f"api_token_file: {path} may be read by others (mode {mode & 0o777:o}); "
                              f"chmod 600 {path}")
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise ConfigError(f"api_token_file: {path} is empty")
        return token
    return os.environ.get("FLUXRAY_API_TOKEN") or None


def _http_host() -> str | None:
    """The host Serve's HTTP proxy listens on (its `http_options`)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - unknown: treated as beyond loopback
        return None


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32, max_queued_requests=64)
@serve.ingress()
class Api:
    """The ingress: the FastAPI app, with the generation deployment behind `render`."""

    def __init__(self, base_config: dict, settings: dict, generator):
        self.base = JobConfig.model_validate(base_config)
        self.settings = ServiceConfig.model_validate(settings)
        # Read here, where the replica runs: `serve run`/`serve deploy` build the app in a task
        # that never sees the operator's shell.
        self.settings.api_token = read_api_token(self.settings)
        host = _http_host()
        if not self.settings.api_token and host not in LOOPBACK:
            raise ConfigError(f"refusing to serve /v1 on {host or 'an unknown host'} without a token: set "
                              "api_token_file in the Serve config's args (or FLUXRAY_API_TOKEN for fluxray serve)")
        self.generator = generator
        self.need = generation_need(self.settings)

    def _generation_state(self) -> tuple[list[dict], int, list[dict[str, float]]]:
        from fluxray.cluster import node_free
        from fluxray.cluster.admission import queue_snapshot

        app = serve.get_replica_context().app_name
        replicas = serve.status().applications[app].deployments["Generator"].replica_states.get("RUNNING", 0)
        return queue_snapshot(), replicas, ([] if replicas else node_free())

    async def make_way(self) -> None:
        """503 at once (GenerationUnavailable) when training holds or waits for what generation needs."""
        blocked = generation_blocked(self.need, *await asyncio.to_thread(self._generation_state))
        if blocked is not None:
            raise blocked

    async def render(self, lora_id: str | None, params: dict) -> bytes:
        await self.make_way()
        response = self.generator.options(multiplexed_model_id=lora_id or "").render.remote(params)
        timeout = self.settings.generation_timeout_s
        try:
            # A hung or overloaded replica must not hold the caller (and an ingress slot) forever.
            return await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            response.cancel()  # frees the replica's slot (or the queue place) for the next request
            raise GenerationUnavailable(f"generate: no image after {timeout:g} s (generation_timeout_s); retry, or "
                                        "ask for fewer steps or a smaller size") from None
        except BackPressureError:
            raise GenerationUnavailable("generate: the generation queue is full; retry later") from None
        except RayActorError:
            # Killed or crashed mid-render; Serve starts a new replica, so the same call can be retried.
            raise GenerationUnavailable("generate: the generation replica was lost during this request; "
                                        "retry (Serve is restarting it)") from None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.base, self.settings, self.render)


def build_app(args: dict[str, Any] | None = None):
    """The Serve application builder (`import_path: fluxray.serve.app:build_app`, `args:` = ServiceConfig)."""
    try:
        settings = ServiceConfig.model_validate(args or {})
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"serve args: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    base = resolve_base_config(settings)
    if settings.generation_gpus == "auto":
        import ray

        settings.generation_gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    idle = settings.generation_idle_s
    need = generation_need(settings)
    generator = Generator.options(
        # From zero replicas, and back to zero once idle: an idle replica never holds the GPU (or
        # CPU) a training job waits for. A request to zero replicas starts one at once.
        autoscaling_config={"min_replicas": 0, "initial_replicas": 0, "max_replicas": settings.generation_replicas,
                            "downscale_delay_s": idle, "downscale_to_zero_delay_s": idle},
        max_queued_requests=settings.generation_queue,
        ray_actor_options={"num_cpus": need.pop("CPU"), "num_gpus": need.pop("GPU", 0.0), "resources": need},
    ).bind(base.model_dump(mode="json"), settings.max_loras)
    if not settings.api_token and not settings.api_token_file:
        # `serve run <import path>` builds here, in the operator's shell; a file comes first.
        settings.api_token = os.environ.get("FLUXRAY_API_TOKEN") or None
    return Api.bind(base.model_dump(mode="json"), settings.model_dump(mode="json"), generator)
