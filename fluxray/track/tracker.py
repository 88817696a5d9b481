"""What the training loop calls to record a run; MLflow sits behind it on rank 0.

`Tracker` writes the local run record and forwards to MLflow; other ranks get `None`
and record nothing. It also keeps a resumed run's step axis clean (see `log_metrics`).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fluxray.track.local import RunRecord, read_metrics

log = logging.getLogger(__name__)

#: Metrics go to MLflow in one batch at most this often. One call per step costs a sqlite
#: transaction (or an HTTP round trip) whose CPU time competes with the step itself.
METRICS_BATCH_SECONDS = 2.0
#: How many metrics.jsonl rows MLflow has been given (sent or spooled), in the run folder.
SENT_FILE = "mlflow_sent"


class Tracker:
    """Local record first, then MLflow (if configured)."""

    def __init__(self, run_dir: Path, mlflow_run=None, metrics: bool = True):
        """`metrics=False`: a second writer of the run (the preview actor) that logs no metrics and
        leaves their MLflow catch-up to rank 0's tracker."""
        self.record = RunRecord(run_dir)
        self.mlflow = mlflow_run  # a `MlflowRun`, or None
        logged = read_metrics(run_dir)
        self._last_step = last_steps(logged)
        # MLflow calls leave the training step on one background thread (in order): a remote
        # tracking server costs tens of ms a call, which the step must not wait for.
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="mlflow") if mlflow_run else None
        self._rows: list[tuple[dict[str, float], int, int]] = []  # (metrics, step, ms) not yet sent
        self._rows_sent_at = time.monotonic()
        self._sent_file = Path(run_dir) / SENT_FILE
        self._count = len(logged)  # metrics.jsonl rows so far; MLflow has the first `sent` of them
        self._metrics = metrics
        if mlflow_run and metrics:
            # Rows a crashed process logged locally but still held in its batch: MLflow gets
            # them now (the resumed steps that redo them are skipped, see `log_metrics`).
            sent = int(self._sent_file.read_text()) if self._sent_file.exists() else 0
            self._rows = [({k: v for k, v in r.items() if k not in ("step", "time")}, r["step"],
                           int(r["time"] * 1000)) for r in logged[sent:]]

    def _send(self, fn, *args) -> None:
        self._send_rows()  # metrics logged before this call go out before it
        self._sender.submit(_logged, fn, *args)

    def _send_rows(self) -> None:
        if self._rows:
            rows, self._rows = self._rows, []
            self._sender.submit(self._send_metrics, rows, self._count)
        self._rows_sent_at = time.monotonic()

    def _send_metrics(self, rows, count: int) -> None:
        # Sent or spooled, they are MLflow's now. A crash between the call and this write
        # sends the batch twice; never losing it is the better side to err on.
        _logged(self.mlflow.log_metrics, rows)
        tmp = self._sent_file.with_suffix(".tmp")
        tmp.write_text(str(count))
        tmp.replace(self._sent_file)

    def flush(self) -> None:
        """Wait until every MLflow call made so far has been sent (or spooled)."""
        if self._sender:
            self._send_rows()
            self._sender.submit(lambda: None).result()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log the metrics at `step`, except those already logged at `step` or later.

        A resumed job restarts from its last checkpoint, so it redoes (identically: the
        randomness is derived from the step) the steps it had logged before the crash.
        Skipping them keeps one point per step and a monotonic step axis, in
        metrics.jsonl and in MLflow alike; `metrics.jsonl` is written first, so it is
        the record of what was logged.
        """
        if not self._metrics:
            raise RuntimeError("this tracker logs no metrics (made with metrics=False)")
        new = {k: v for k, v in metrics.items() if step > self._last_step.get(k, -1)}
        if not new:
            return
        self._last_step.update(dict.fromkeys(new, step))
        self.record.log_metrics(new, step)
        self._count += 1
        if self.mlflow:
            self._rows.append((new, step, int(time.time() * 1000)))
            if time.monotonic() - self._rows_sent_at >= METRICS_BATCH_SECONDS:
                self._send_rows()

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
            self._send_rows()
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
