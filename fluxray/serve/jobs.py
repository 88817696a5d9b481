"""Training jobs of the service: Ray Jobs running `jobs/train.py`, indexed under `<root>/jobs/`.

A job's state is read on every request from Ray Jobs (status, logs), the run folder the job
writes (`status.json`, `metrics.jsonl`, `samples/`) and MLflow, never from replica memory, so a
redeployed or restarted service sees every job as it is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import fluxray
from fluxray.config import JobConfig, build_config, dump_config, load_config, parse_yaml_text
from fluxray.errors import FluxrayError
from fluxray.track.local import SAMPLE_FILE, RunRecord, read_metrics

#: The page's simple settings and the config key each one sets (the config holds the defaults).
SIMPLE_SETTINGS = {
    "steps": "train.steps",
    "learning_rate": "train.lr",
    "rank": "lora.rank",
    "batch_size": "train.batch_size",
    "ema": "train.ema",
    "sample_every": "sample.every",
    "sample_prompts": "sample.prompts",
}
FINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
_JOB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class JobNotFound(FluxrayError):
    """No job with that id in the index."""


class ClusterUnavailable(FluxrayError):
    """The Ray cluster's job API did not answer."""


class JobRecord(BaseModel):
    """`<root>/jobs/<job_id>.json`: what the service submitted (or found: a run that `ray job
    submit` or `fluxray train` started under its root); everything else is read live."""

    job_id: str
    submission_id: str | None  # None: a `fluxray train` driver, not a Ray Job
    ray_job_id: str | None = None
    run_name: str
    dataset_id: str
    created: float
    config: str  # the submitted config YAML
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None


def simple_defaults(cfg: JobConfig) -> dict[str, Any]:
    """The simple settings' values in `cfg` (the service's base config)."""
    data = cfg.model_dump(mode="json")
    out = {}
    for name, key in SIMPLE_SETTINGS.items():
        node = data
        for part in key.split("."):
            node = node[part]
        out[name] = node
    return out


def job_config(base: JobConfig, settings: dict[str, Any] | None = None, config_yaml: str | None = None) -> JobConfig:
    """The job's config: `base` with the simple settings, or the expert YAML on its own.

    Errors are ConfigErrors that name the dotted key (`train.steps: ...`).
    """
    if config_yaml is not None:
        return build_config(parse_yaml_text(config_yaml, "config_yaml"), source="config_yaml")
    data = base.model_dump(mode="json")
    for name, value in (settings or {}).items():
        if value is None:
            continue
        *sections, leaf = SIMPLE_SETTINGS[name].split(".")
        node = data
        for part in sections:
            node = node[part]
        node[leaf] = value
    return build_config(data, source="(simple settings)")


def _entrypoint(config: Path) -> tuple[str, dict]:
    """`jobs/train.py` from a source checkout, shipped as the job's working_dir so every node runs
    this code; from an installed package (no jobs/ beside it), the same command through the CLI."""
    checkout = Path(fluxray.__file__).resolve().parent.parent
    python, cfg = shlex.quote(sys.executable), shlex.quote(str(config))
    env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if (checkout / "jobs" / "train.py").is_file():
        return f"{python} jobs/train.py --config {cfg}", {**env, "working_dir": str(checkout), "excludes": [".git"]}
    return f"{python} -m fluxray.cli train --config {cfg}", env


class JobService:
    """Submit, list, inspect and stop the service's training jobs."""

    def __init__(self, root: Path, ray_address: str | None = None, mlflow_ui: str | None = None,
                 operator: JobConfig | None = None):
        self.root = Path(root)
        #: The service's own config: where jobs may write (storage, tracking) is the operator's call.
        self.operator = operator
        self.index = self.root / "jobs"
        self.ray_address = ray_address
        self.mlflow_ui = mlflow_ui.rstrip("/") if mlflow_ui else None
        self._client = None

    # -- Ray Jobs -------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            import ray
            from ray.job_submission import JobSubmissionClient

            try:
                # By default the cluster this replica runs on, named by its GCS address: Ray's own
                # auto-detection gives up when one machine runs several clusters.
                address = self.ray_address or ray.get_runtime_context().gcs_address
                self._client = JobSubmissionClient(address)
            except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError by Ray version
                raise ClusterUnavailable(f"Ray job API at {self.ray_address or '(this cluster)'} is unreachable: {e}") from None
        return self._client

    def check_fits(self, cfg: JobConfig) -> None:
        """Refuse now (ConfigError, a 422) a job the cluster can never schedule; its driver
        would refuse it too, after the submit."""
        import ray

        if self.ray_address is None and ray.is_initialized():  # the cluster this replica runs on
            from fluxray.cluster.admission import check_admissible

            check_admissible(cfg)

    def submit(self, cfg: JobConfig, dataset_id: str, dataset_dir: Path, trigger: str) -> JobRecord:
        """Write the job's config under `<root>/jobs/` and submit it; returns the index record."""
        self.check_fits(cfg)
        slug = re.sub(r"[^A-Za-z0-9_-]", "_", trigger)[:40]
        job_id = f"{slug}-{uuid.uuid4().hex[:8]}"
        data = cfg.model_dump(mode="json")
        # The run folder must be known now (save.name) and live where this service reads it.
        data["dataset"].update(path=str(dataset_dir), trigger_word=trigger)
        data["save"]["name"] = job_id
        data["storage"]["root"] = str(self.root)
        if self.operator is not None:  # an expert YAML must not point checkpoints or tracking elsewhere
            data["storage"]["checkpoints"] = self.operator.storage.checkpoints
            data["tracking"]["uri"] = self.operator.tracking.uri
        cfg = JobConfig.model_validate(data)
        self.index.mkdir(parents=True, exist_ok=True)
        config = self.index / f"{job_id}.yaml"
        config.write_text(dump_config(cfg), encoding="utf-8")
        entrypoint, runtime_env = _entrypoint(config)
        try:
            submission_id = self.client().submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=f"fluxray-{job_id}",
                metadata={"fluxray.job_id": job_id, "fluxray.dataset_id": dataset_id})
        except ClusterUnavailable:
            config.unlink(missing_ok=True)
            raise
        except Exception as e:  # noqa: BLE001 - the job API's errors are RuntimeErrors with its message
            config.unlink(missing_ok=True)
            raise ClusterUnavailable(f"Ray did not accept the job: {e}") from None
        rec = JobRecord(job_id=job_id, submission_id=submission_id, run_name=job_id, dataset_id=dataset_id,
                        created=time.time(), config=str(config))
        self._write(rec)
        return rec

    def stop(self, job_id: str) -> None:
        rec = self._submitted(job_id)
        try:
            self.client().stop_job(rec.submission_id)
        except ClusterUnavailable:
            raise
        except Exception as e:  # noqa: BLE001
            raise ClusterUnavailable(f"could not stop job {job_id}: {e}") from None

    def logs(self, job_id: str) -> str:
        rec = self._submitted(job_id)
        try:
            return self.client().get_job_logs(rec.submission_id)
        except ClusterUnavailable:
            raise
        except Exception as e:  # noqa: BLE001
            raise ClusterUnavailable(f"could not read the logs of job {job_id}: {e}") from None

    def _submitted(self, job_id: str) -> JobRecord:
        rec = self.record(job_id)
        if rec.submission_id is None:
            raise FluxrayError(f"job {job_id!r} runs from `fluxray train`, not as a Ray Job: its logs and its "
                               "stop are where it was started")
        return rec

    def _ray_jobs(self) -> tuple[dict[str, Any], str | None]:
        """Ray's job details by submission id and by Ray job id, or ({}, why) when the job API
        does not answer."""
        try:
            jobs = self.client().list_jobs()
        except Exception as e:  # noqa: BLE001 - the page still shows what the run folders say
            self._client = None
            return {}, str(e)
        out = {j.job_id: j for j in jobs if j.job_id}
        out.update({j.submission_id: j for j in jobs if j.submission_id})
        return out, None

    def adopt(self) -> None:
        """Index the runs that Ray jobs started under this root without the service (`ray job
        submit`, `fluxray train`), so the service lists one queue. Their drivers write their Ray
        ids into the run status; a `--local` run has none and is left out."""
        known = {p.stem for p in self.index.glob("*.json")}
        for status in (self.root / "runs").glob("*/status.json"):
            run = status.parent
            if run.name in known or not _JOB_ID.match(run.name) or not (run / "config.yaml").is_file():
                continue
            try:
                st = json.loads(status.read_text())
                dataset = Path(load_config(run / "config.yaml").dataset.path or "").name
            except (OSError, ValueError, FluxrayError):
                continue  # being written, or not a run of this fluxray
            if st.get("ray_job_id"):
                self.index.mkdir(parents=True, exist_ok=True)
                self._write(JobRecord(job_id=run.name, submission_id=st.get("submission_id"),
                                      ray_job_id=st["ray_job_id"], run_name=run.name, dataset_id=dataset,
                                      created=st.get("submitted") or status.stat().st_mtime,
                                      config=str(run / "config.yaml")))

    # -- the index ------------------------------------------------------------------------
    def records(self) -> list[JobRecord]:
        out = []
        for path in self.index.glob("*.json"):
            try:
                out.append(JobRecord.model_validate_json(path.read_bytes()))
            except ValueError:
                continue  # a torn write; the record is rewritten whole, never appended
        return sorted(out, key=lambda r: r.created, reverse=True)

    def record(self, job_id: str) -> JobRecord:
        path = self.index / f"{job_id}.json"
        if not _JOB_ID.match(job_id) or not path.is_file():
            raise JobNotFound(f"job {job_id!r} not found")
        return JobRecord.model_validate_json(path.read_bytes())

    def _write(self, rec: JobRecord) -> None:
        path = self.index / f"{rec.job_id}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(rec.model_dump_json(indent=1), encoding="utf-8")
        tmp.replace(path)

    # -- views ----------------------------------------------------------------------------
    def list(self, sample_url: str = "") -> list[dict]:
        self.adopt()
        ray_jobs, why = self._ray_jobs()
        out = []
        for r in self.records():
            try:
                out.append(self.view(r, ray_jobs, why, sample_url, detail=False))
            except FluxrayError as e:  # e.g. its config file was deleted: list it, don't fail the list
                out.append({"job_id": r.job_id, "status": "UNKNOWN", "message": str(e), "step": 0, "total": 0,
                            "progress": 0.0, "created": r.created})
        return out

    def get(self, job_id: str, sample_url: str = "") -> dict:
        rec = self.record(job_id)
        ray_jobs, why = self._ray_jobs()
        return self.view(rec, ray_jobs, why, sample_url, detail=True)

    def view(self, rec: JobRecord, ray_jobs: dict[str, Any], ray_error: str | None, sample_url: str,
             detail: bool) -> dict:
        """Status, progress, ETA and loss (and with `detail`: loss history, samples, LoRAs, MLflow).

        A job whose driver runs but has not started its workers is `PENDING`, with the reason
        and its place in the cluster's queue (`fluxray.cluster.admission`), never `RUNNING`.
        """
        from fluxray.serve.loras import step_lora_ids

        cfg = load_config(rec.config)
        run = self.root / "runs" / rec.run_name
        status_file = run / "status.json"
        st = json.loads(status_file.read_text()) if status_file.exists() else {}
        finished = st.get("state") == "finished"
        ray_job = ray_jobs.get(rec.submission_id) or ray_jobs.get(st.get("ray_job_id") or rec.ray_job_id)
        position = None
        if ray_job is not None:
            status, message = str(ray_job.status.value), ray_job.message
            # The status file of this driver, not of an earlier run of the same name.
            state = st.get("state") if st.get("updated", 0) >= (ray_job.start_time or 0) / 1000 else None
            if status == "RUNNING" and state in (None, "queued", "starting"):
                status = "PENDING"
                message = st.get("reason") if state else "the job driver is starting (preparing the dataset)"
                position = st.get("queue_position") if state == "queued" else None
            elif status == "FAILED" and state == "failed" and st.get("reason"):
                message = st["reason"]
        else:
            # Ray no longer knows the job (a new cluster) or did not answer: trust the run folder.
            status = "SUCCEEDED" if finished else "UNKNOWN"
            message = f"Ray job API: {ray_error}" if ray_error else "Ray has no record of this job"
        total = int(st.get("total") or cfg.train.steps)
        step = int(st.get("step") or 0)
        samples = self._samples(run, f"{sample_url}{rec.job_id}/samples/")
        view = {
            "job_id": rec.job_id, "run_name": rec.run_name, "dataset_id": rec.dataset_id,
            "submission_id": rec.submission_id, "created": rec.created,
            "status": status, "message": message, "queue_position": position, "step": step, "total": total,
            "progress": step / total if total else 0.0, "loss": st.get("loss"),
            "sec_per_step": st.get("sec_per_step"),
            "eta_seconds": self._eta(st, step, total, len(samples), cfg) if status == "RUNNING" else None,
            "lora": rec.run_name if (self.root / "loras" / f"{rec.run_name}.safetensors").is_file() else None,
            # "Is it done?" from the fixed-noise validation loss, and the preview time shown apart.
            "convergence": st.get("convergence"), "converged_step": st.get("converged_step"),
            "best_step": st.get("best_step"), "sample_seconds": st.get("sample_seconds"),
            "similarity": st.get("similarity"),  # with validation.embedding_model
        }
        if not detail:
            return view
        metrics = read_metrics(run)
        prompts = cfg.sample_prompts(cfg.dataset.trigger_word or "")
        view.update(
            losses=[[m["step"], m["loss"]] for m in metrics if m.get("loss") is not None],
            val_losses=[[m["step"], m["val_loss"]] for m in metrics if m.get("val_loss") is not None],
            likeness=[[m["step"], m["sample_similarity"]] for m in metrics if m.get("sample_similarity") is not None],
            samples=samples,
            sample_prompts=[p.model_dump() for p in prompts],
            step_loras=step_lora_ids(self.root, rec.run_name),
            mlflow=self._mlflow(rec, cfg, started=status_file.exists()),
        )
        return view

    @staticmethod
    def _eta(st: dict, step: int, total: int, previews_done: int, cfg: JobConfig) -> float | None:
        """Remaining steps at the measured pace, plus the previews still to render."""
        sec = st.get("sec_per_step")
        if not sec:
            return None
        every = cfg.sample.every
        previews_left = (total // every - step // every + (total % every != 0)) if every else 0
        per_preview = (st.get("sample_seconds") or 0.0) / max(previews_done, 1)
        return round((total - step) * sec + previews_left * per_preview, 1)

    @staticmethod
    def _samples(run: Path, url: str) -> list[dict]:
        """Preview files by step: `[{step, images: [url per prompt], grid: url}]`."""
        by_step: dict[int, dict] = {}
        for step, key, path in RunRecord(run).samples() if (run / "samples").is_dir() else []:
            entry = by_step.setdefault(step, {"step": step, "images": [], "grid": None})
            if key == "grid":
                entry["grid"] = url + path.name
            else:
                entry["images"].append(url + path.name)
        return [by_step[s] for s in sorted(by_step)]

    def sample_file(self, job_id: str, name: str) -> Path:
        rec = self.record(job_id)
        path = self.root / "runs" / rec.run_name / "samples" / name
        if not SAMPLE_FILE.match(name) or not path.is_file():
            raise JobNotFound(f"job {job_id!r} has no sample {name!r}")
        return path

    def _mlflow(self, rec: JobRecord, cfg: JobConfig, started: bool) -> dict | None:
        """The job's MLflow run (found once by its `fluxray.run_name` tag, then kept in the record)."""
        from fluxray.track.mlflow_run import UI_QUERY, tracking_uri

        uri = tracking_uri(cfg)
        if rec.mlflow_run_id is None:
            # Only once the job has made its run: opening a sqlite store that does not exist yet
            # would create it beside the job's own first connection.
            db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
            if not started or (db is not None and not db.exists()):
                return None
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(uri)
                exp = client.get_experiment_by_name(cfg.tracking.experiment)
                found = exp and client.search_runs(
                    [exp.experiment_id], filter_string=f"tags.`fluxray.run_name` = '{rec.run_name}'", max_results=1)
            except Exception:  # noqa: BLE001 - tracking being down must not hide the job
                return {"tracking_uri": uri, "run_id": None, "url": None}
            if not found:
                return None
            rec.mlflow_run_id, rec.mlflow_experiment_id = found[0].info.run_id, exp.experiment_id
            self._write(rec)
        base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else self.mlflow_ui
        url = (f"{base}/#/experiments/{rec.mlflow_experiment_id}/runs/{rec.mlflow_run_id}?{UI_QUERY}"
               if base else None)
        return {"tracking_uri": uri, "run_id": rec.mlflow_run_id, "experiment_id": rec.mlflow_experiment_id,
                "url": url}
