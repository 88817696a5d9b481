"""What the training loop calls to record a run; MLflow sits behind it on rank 0.

`Tracker` writes the local run record and forwards to MLflow; other ranks get `None`
and record nothing. It also keeps a resumed run's step axis clean (see `log_metrics`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fluxray.track.local import RunRecord, read_metrics

log = logging.getLogger(__name__)


class Tracker:
    """Local record first, then MLflow (if configured)."""

    def __init__(self, run_dir: Path, mlflow_run=None):
        self.record = RunRecord(run_dir)
        self.mlflow = mlflow_run  # a `MlflowRun`, or None
        self._last_step = last_steps(read_metrics(run_dir))
        # MLflow calls leave the training step on one background thread (in order): a remote
        # tracking server costs tens of ms a call, which the step must not wait for.
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="mlflow") if mlflow_run else None

    def _send(self, fn, *args) -> None:
        self._sender.submit(_logged, fn, *args)

    def flush(self) -> None:
        """Wait until every MLflow call made so far has been sent (or spooled)."""
        if self._sender:
            self._sender.submit(lambda: None).result()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log the metrics at `step`, except those already logged at `step` or later.

        A resumed job restarts from its last checkpoint, so it redoes (identically: the
        randomness is derived from the step) the steps it had logged before the crash.
        Skipping them keeps one point per step and a monotonic step axis, in
        metrics.jsonl and in MLflow alike; `metrics.jsonl` is written first, so it is
        the record of what was logged.
        """
        new = {k: v for k, v in metrics.items() if step > self._last_step.get(k, -1)}
        if not new:
            return
        self._last_step.update(dict.fromkeys(new, step))
        self.record.log_metrics(new, step)
        if self.mlflow:
            self._send(self.mlflow.log_metrics, new, step)

    def log_image(self, image, key: str, step: int) -> None:
        if self.record.sample_path(key, step).exists():
            return  # logged before a crash; see log_metrics
        path = self.record.save_image(image, key, step)
        if self.mlflow:
            self._send(self.mlflow.log_image, path, key, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.mlflow:
            self._send(self.mlflow.log_artifact, path, artifact_path)

    def log_lora(self, path: Path) -> None:
        """The final LoRA, under the stable artifact path `lora/<name>.safetensors`; registered
        as a new model version when `tracking.register_model` names a model."""
        if self.mlflow:
            self._send(self.mlflow.log_artifact, path, "lora")
            name = self.mlflow.cfg.tracking.register_model
            if name:
                self._send(self.mlflow.register_model, name, f"lora/{Path(path).name}")

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.mlflow:
            self._send(self.mlflow.set_tags, dict(tags))

    def status(self, **fields) -> None:
        self.record.set_status(**fields)

    def close(self) -> None:
        if self._sender:
            self._sender.shutdown(wait=True)
        if self.mlflow:
            self.mlflow.close()


def _logged(fn, *args) -> None:
    # MlflowRun spools what it cannot send; anything else is a bug worth a log line, not a dead thread.
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        log.exception("MLflow call %s failed", getattr(fn, "__name__", fn))


def last_steps(rows: list[dict]) -> dict[str, int]:
    """The last step logged for each metric key of a run's metrics.jsonl rows."""
    last: dict[str, int] = {}
    for row in rows:
        for k in row.keys() - {"step", "time"}:
            last[k] = max(last.get(k, -1), row["step"])
    return last
