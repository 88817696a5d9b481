"""MLflow: one run per job, created by the driver; rank 0 logs into it by id.

The store defaults to sqlite under the storage root (MLflow 3 rejects a bare `file:`
store for tracking) with artifacts beside it; a cluster points `tracking.uri` (or
$MLFLOW_TRACKING_URI) at an `http://` server. An unreachable server never stops
training: calls wait in `<run>/mlflow-pending.jsonl` and are sent when it is back.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from fluxray.config import JobConfig, dump_config
from fluxray.errors import FluxrayError
from fluxray.track.local import read_jsonl

log = logging.getLogger("fluxray.mlflow")

RUN_NAME_TAG = "fluxray.run_name"
#: The experiment tag MLflow 3's UI reads to show an experiment as model training (runs,
#: metrics, images), not as GenAI evaluation runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Where MLflow 3's UI shows model training: its "Model training" workflow (the default is GenAI).
UI_QUERY = "workflowType=machine_learning"
PENDING_FILE = "mlflow-pending.jsonl"
#: The preview actor's own spool: two processes never append to (or replay) one file.
PREVIEW_PENDING_FILE = "mlflow-pending-previews.jsonl"
#: The previews MLflow has been given (sent or spooled): a process killed between saving a
#: preview and sending it leaves a PNG that is not here, and the driver sends it at job end.
IMAGES_SENT_FILE = "mlflow-images.jsonl"
#: While MLflow is unreachable, calls go straight to the spool; it is retried after this
#: long, then twice as long each failure up to the cap (a black-holed host costs ~35 s a try).
RETRY_SECONDS = 60.0
MAX_RETRY_SECONDS = 600.0
#: MLflow's limit on the metrics of one `log_batch` call.
MAX_BATCH_METRICS = 1000
#: MLflow's HTTP defaults retry for minutes (a warning line per retry); a step must not
#: stall that long, and the spool already retries later. Set the variables to override.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: MLflow refuses longer param values.
MAX_PARAM_CHARS = 6000
#: The settings runs are compared by, as MLflow params (the base model and the trigger word are
#: tags). MLflow's UI prints every param of a run above each of its preview images: the whole
#: config there pushed the image out of its card, and more than a line of them clips it. The
#: whole resolved config is the run's `config.yaml` artifact.
PARAM_KEYS = ("train.steps", "train.lr", "lora.rank")
#: The run's artifact with the whole resolved config (what `fluxray config` prints).
CONFIG_ARTIFACT = "config.yaml"
#: MLflow error codes that reject one call (bad value, duplicate) rather than signal an outage.
_REJECTED = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
             "INVALID_STATE"}


def tracking_uri(cfg: JobConfig) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then `sqlite:///<root>/mlflow/mlflow.db`."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{local_store(cfg) / 'mlflow.db'}"


def local_store(cfg: JobConfig) -> Path:
    return cfg.storage_root / "mlflow"


def artifact_root(cfg: JobConfig) -> str:
    return (local_store(cfg) / "artifacts").as_uri()


def serve(cfg: JobConfig, host: str = "127.0.0.1", port: int = 5000) -> int:
    """`fluxray mlflow`: run `mlflow server` over the local store until it exits or this process
    is stopped (Ctrl-C, SIGTERM), which stops the server's whole process group with it."""
    import signal
    import subprocess

    store = local_store(cfg)
    (store / "artifacts").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--default-artifact-root", str(store / "artifacts"), "--host", host, "--port", str(port),
           "--workers", "1"]
    # For browsing runs: one worker, and no GenAI job runner (a dozen more processes).
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}

    def terminated(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    # Its own process group: mlflow server starts uvicorn, which starts its workers, and a signal
    # to this process alone would leave them holding the port.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(proc)


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that `serve`'s cleanup runs."""


def _stop_group(proc, grace: float = 10.0) -> None:
    """SIGTERM to the process group of `proc`, SIGKILL to what is left after `grace` seconds."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline:
            proc.poll()  # reap the leader: a zombie still counts as a member of its group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_page(cfg: JobConfig, run_id: str, ui: str | None = None) -> str | None:
    """The run's page in the MLflow UI (`ui`: where `fluxray mlflow` serves the local store), in
    its model-training view; None when MLflow cannot say."""
    uri = tracking_uri(cfg)
    base = uri if uri.startswith(("http://", "https://")) else ui
    if base is None:
        return None
    try:
        exp_id = _client(cfg).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a courtesy, never a failure
        return None
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?{UI_QUERY}"


def ray_job_id() -> str | None:
    """The Ray job this process belongs to; None outside Ray."""
    ray = sys.modules.get("ray")  # never import Ray only to ask
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_job_id()
    return os.environ.get("RAY_JOB_ID")


def job_params(cfg: JobConfig) -> dict[str, str]:
    """The settings runs are compared by (`PARAM_KEYS`), from the resolved config: `train.lr` -> `0.0005`."""
    return {k: (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM_CHARS] for k, v in cfg.flat().items()
            if k in PARAM_KEYS}


def job_tags(cfg: JobConfig) -> dict[str, str]:
    import fluxray
    from fluxray.data.prepare import read_prepared

    info = read_prepared(Path(cfg.dataset.path)).info
    tags = {RUN_NAME_TAG: cfg.save.name, "fluxray.version": fluxray.__version__,
            "trigger_word": cfg.dataset.trigger_word or info.trigger_word, "base_model": cfg.model.path,
            "dataset_hash": info.content_hash}
    job = ray_job_id()
    if job:
        tags["ray.job_id"] = job
    return tags


def _client(cfg: JobConfig):
    from mlflow.tracking import MlflowClient

    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def find_run(client, cfg: JobConfig) -> str | None:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.save.name}'",
                               max_results=1)
    return found[0].info.run_id if found else None


def open_run(client, cfg: JobConfig) -> str:
    """The job's run: found by its `fluxray.run_name` tag, else created with params and tags.

    Params and the config are logged once, at creation: MLflow params are immutable, and a
    resumed job may legitimately differ (more steps). A found run is marked running again.
    """
    from mlflow.entities import Param

    run_id = find_run(client, cfg)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    local = tracking_uri(cfg).startswith("sqlite")
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.tracking.experiment, artifact_location=artifact_root(cfg) if local else None, tags=EXPERIMENT_KIND)
    if exp is not None and not EXPERIMENT_KIND.items() <= exp.tags.items():
        for key, value in EXPERIMENT_KIND.items():  # an experiment made before fluxray set it, or by hand
            client.set_experiment_tag(exp_id, key, value)
    tags = job_tags(cfg)
    run_id = client.create_run(exp_id, run_name=cfg.save.name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in job_params(cfg).items()])
    client.log_text(run_id, dump_config(cfg), CONFIG_ARTIFACT)
    return run_id


def start_job_run(cfg: JobConfig) -> str | None:
    """Create (or, resuming, find) the job's MLflow run in the driver; returns its id.

    None when MLflow cannot be reached: the job trains anyway, and rank 0 opens the
    run later when MLflow answers (see `MlflowRun`).
    """
    try:
        return open_run(_client(cfg), cfg)
    except Exception as e:  # noqa: BLE001 - no tracking failure may stop a job
        log.warning("MLflow tracking lost at %s (%s): training goes on without it; rank 0 retries and keeps "
                    "what it could not send in %s", tracking_uri(cfg), _short(e),
                    cfg.storage_root / "runs" / cfg.save.name / PENDING_FILE)
        return None


def spool_unsent_images(run_dir: Path) -> int:
    """Put each preview PNG that MLflow was never given into the preview spool; returns how many.

    A worker (or preview actor) killed after saving a preview and before sending it leaves
    such a file: its resumed run sees the PNG and skips the step. Only for a run no process
    writes to any more (the driver at job end, `fluxray mlflow sync`).
    """
    from fluxray.track.local import RunRecord

    given = {(r["key"], r["step"]) for r in read_jsonl(run_dir / IMAGES_SENT_FILE)}
    missing = [(step, key, path) for step, key, path in RunRecord(run_dir).samples() if (key, step) not in given]
    for step, key, path in missing:
        _append_op(run_dir / PREVIEW_PENDING_FILE, {"op": "image", "path": str(path), "key": key, "step": step,
                                                    "time": int(path.stat().st_mtime * 1000)})
        _append_op(run_dir / IMAGES_SENT_FILE, {"key": key, "step": step})
    if missing:
        log.warning("MLflow: %d preview(s) saved but never sent (a process died before sending them): sending "
                    "them now", len(missing))
    return len(missing)


def _waiting_spools(cfg: JobConfig) -> list[tuple[Path, int]]:
    """(spool, calls in it) of a run no process writes to any more: the run's own spool, always (its
    flush opens the run), and the preview spool when it holds anything, saved-but-unsent previews included."""
    run_dir = cfg.storage_root / "runs" / cfg.save.name
    spool_unsent_images(run_dir)
    spools = [(run_dir / name, len(read_jsonl(run_dir / name))) for name in (PENDING_FILE, PREVIEW_PENDING_FILE)]
    return [(path, n) for path, n in spools if n or path.name == PENDING_FILE]


def end_job_run(cfg: JobConfig, status: str = "FINISHED") -> None:
    """Driver, at job end: send what rank 0 could not, then mark the run finished or failed."""
    for pending, waiting in _waiting_spools(cfg):
        # A spool means the outage was reported already: only say where it waits.
        run = MlflowRun(cfg, None, pending, down=waiting > 0)
        if not run.flush():
            if waiting:
                run.warn_pending()
            return
        if waiting:
            run.warn_restored(waiting)
    try:
        run.client.set_terminated(run.run_id, status)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: could not mark run %s %s: %s", run.run_id, status, _short(e))


def sync_run(cfg: JobConfig) -> tuple[str, int]:
    """`fluxray mlflow sync`: send a run's pending calls (opening its run if it never was).

    `cfg` is the run's own resolved config; returns (run id, calls sent).
    """
    sent = 0
    for pending, n in _waiting_spools(cfg):
        run = MlflowRun(cfg, None, pending, down=True)
        if not run.flush():
            raise TrackingError(f"MLflow unreachable at {tracking_uri(cfg)}: {n} call(s) still wait in {pending}")
        sent += n
    return run.run_id, sent


class TrackingError(FluxrayError):
    """MLflow could not be reached for a command that needs it."""


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


class MlflowRun:
    """Rank 0's handle on the job's run, with a spool for when MLflow is unreachable.

    Every call is one JSON op. Sent at once while MLflow answers; otherwise appended to
    `pending` (files referenced by path, already on disk in the run folder) and replayed
    in order, with their original steps and timestamps, by the first call that reaches
    MLflow again, by `close` or by `fluxray mlflow sync`. One warning line per outage.
    """

    def __init__(self, cfg: JobConfig, run_id: str | None, pending: Path, down: bool = False,
                 retry_seconds: float = RETRY_SECONDS):
        self.cfg, self.run_id, self.pending = cfg, run_id, Path(pending)
        self.client = _client(cfg)
        #: MLflow is unreachable; `down=True` at start: the outage was reported already (by the
        #: driver), so stay quiet until it ends.
        self.down = down
        self.retry_seconds = self._wait = retry_seconds
        self._retry_at = 0.0

    # -- the calls the tracker makes --------------------------------------------------------
    def log_metrics(self, rows: list[tuple[dict[str, float], int, int]]) -> None:
        """Metrics of one or more steps: (metrics, step, time in ms) rows, sent in one call."""
        self._send({"op": "metrics", "rows": [[m, step, ms] for m, step, ms in rows]})

    def log_image(self, path: Path, key: str, step: int) -> None:
        self._send({"op": "image", "path": str(path), "key": key, "step": step, "time": _now_ms()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"op": "tags", "tags": tags})

    def register_model(self, name: str, artifact: str) -> None:
        """A new version of registered model `name` whose source is the run's `artifact`."""
        self._send({"op": "register", "name": name, "artifact": artifact})

    def close(self) -> None:
        """A last try at sending what is pending (the driver's `end_job_run` says where it is)."""
        if self.pending.exists() or self.run_id is None:
            self.flush()

    def warn_restored(self, sent: int) -> None:
        log.warning("MLflow tracking restored at %s: %d pending call(s) sent", tracking_uri(self.cfg), sent)

    def warn_pending(self) -> None:
        log.warning("MLflow unreachable at %s: %d call(s) wait in %s; send them with `fluxray mlflow sync "
                    "--run %s`", tracking_uri(self.cfg), len(read_jsonl(self.pending)), self.pending,
                    self.cfg.save.name)

    # -- sending, spooling, replaying ---------------------------------------------------------
    def flush(self) -> bool:
        """Open the run if needed and replay the spool; True when nothing is left pending."""
        try:
            if self.run_id is None:
                self.run_id = open_run(self.client, self.cfg)
            ops = read_jsonl(self.pending)
            for i, op in enumerate(ops):
                try:
                    self._apply(op)
                except Exception as e:  # noqa: BLE001
                    if not _rejected(e):
                        _write_ops(self.pending, ops[i:])
                        raise
                    log.warning("MLflow rejected a pending %s call, dropped: %s", op["op"], _short(e))
            self.pending.unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001
            self._lose(e)
            return False
        self.down = False
        self._wait = self.retry_seconds
        return True

    def _send(self, op: dict) -> None:
        self._deliver(op)
        if op["op"] == "image":  # sent, spooled or rejected: either way, not to be sent again
            _append_op(self.pending.parent / IMAGES_SENT_FILE, {"key": op["key"], "step": op["step"]})

    def _deliver(self, op: dict) -> None:
        if (self.down or self.run_id is None or self.pending.exists()) and not self._reconnect():
            _append_op(self.pending, op)
            return
        try:
            self._apply(op)
        except Exception as e:  # noqa: BLE001 - no tracking failure may stop training
            if _rejected(e):
                log.warning("MLflow rejected a %s call: %s", op["op"], _short(e))
                return
            self._lose(e)
            _append_op(self.pending, op)

    def _reconnect(self) -> bool:
        if time.time() < self._retry_at:
            return False
        down, waiting = self.down, len(read_jsonl(self.pending))
        if not self.flush():
            return False
        if down:
            self.warn_restored(waiting)
        return True

    def _lose(self, e: Exception) -> None:
        self._retry_at = time.time() + self._wait
        self._wait = min(2 * self._wait, MAX_RETRY_SECONDS)
        if not self.down:
            log.warning("MLflow tracking lost at %s (%s): training goes on; what could not be sent is kept in %s "
                        "and sent when MLflow is back", tracking_uri(self.cfg), _short(e), self.pending)
        self.down = True

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric

        kind = op["op"]
        if kind == "metrics":
            metrics = [Metric(k, float(v), ms, step) for m, step, ms in op["rows"] for k, v in m.items()]
            for i in range(0, len(metrics), MAX_BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_BATCH_METRICS])
        elif kind == "image":
            from PIL import Image

            with Image.open(op["path"]) as image:
                self.client.log_image(self.run_id, image.convert("RGB"), key=op["key"], step=op["step"],
                                      timestamp=op["time"], synchronous=True)
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, op["path"], op["artifact_path"])
        elif kind == "tags":
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()])
        elif kind == "register":
            self._register(op["name"], op["artifact"])
        else:
            raise ValueError(f"unknown MLflow op {kind!r}")

    def _register(self, name: str, artifact: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(name, f"runs:/{self.run_id}/{artifact}", run_id=self.run_id)
        log.info("registered %s version %s (%s)", name, version.version, version.source)


def _rejected(e: Exception) -> bool:
    """A call that can never succeed (bad value, file since deleted): drop it rather than retry."""
    return isinstance(e, (ValueError, FileNotFoundError)) or getattr(e, "error_code", None) in _REJECTED


def _now_ms() -> int:
    return int(time.time() * 1000)


def _append_op(path: Path, op: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(op) + "\n")


def _write_ops(path: Path, ops: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(op) + "\n" for op in ops), encoding="utf-8")
    tmp.replace(path)
