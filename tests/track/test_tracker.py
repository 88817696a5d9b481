"""Tracker: a resumed run never logs a step twice, locally or to MLflow."""

from PIL import Image

from fluxray.track.local import read_metrics
from fluxray.track.tracker import Tracker, last_steps


class RecordingRun:
    """Stands in for MlflowRun: records what the tracker forwards."""

    def __init__(self):
        self.metrics, self.images = [], []

    def log_metrics(self, rows):
        self.calls = getattr(self, "calls", 0) + 1
        self.metrics += [(step, dict(metrics)) for metrics, step, _ in rows]

    def close(self):
        pass

    def log_image(self, path, key, step):
        self.images.append((key, step, path))


def test_a_resumed_tracker_skips_steps_it_logged_before_the_crash(tmp_path):
    sent = RecordingRun()
    first = Tracker(tmp_path, sent)
    first.log_metrics({"val_loss": 2.0}, 0)
    for step in range(1, 4):
        first.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
    first.flush()
    # Crashed after logging step 7, with steps 4-7 still in the MLflow batch; the last checkpoint is step 5.
    for step in range(4, 8):
        first.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
        if step == 5:
            first.log_metrics({"val_loss": 1.5}, 5)

    mlflow = RecordingRun()
    resumed = Tracker(tmp_path, mlflow)
    for step in range(6, 11):
        resumed.log_metrics({"loss": 2.0 / step, "lr": 1e-3}, step)
        if step == 10:
            resumed.log_metrics({"val_loss": 1.0}, step)

    resumed.flush()
    assert [s for s, _ in sent.metrics] == [0, 1, 2, 3]
    # The crashed batch (4-7, from metrics.jsonl), then the new steps: each step once in MLflow.
    assert [s for s, _ in mlflow.metrics] == [4, 5, 5, 6, 7, 8, 9, 10, 10]
    assert mlflow.metrics[3] == (6, {"loss": 1.0 / 6, "lr": 1e-3})  # the value logged before the crash
    rows = read_metrics(tmp_path)
    for key in ("loss", "lr", "val_loss"):
        steps = [r["step"] for r in rows if key in r]
        assert steps == sorted(set(steps)), f"{key}: {steps}"
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 5, 10]
    assert last_steps(rows) == {"loss": 10, "lr": 10, "val_loss": 10}


def test_only_the_new_keys_of_a_step_are_logged(tmp_path):
    t = Tracker(tmp_path, RecordingRun())
    t.log_metrics({"loss": 1.0}, 4)
    t.log_metrics({"loss": 9.0, "val_loss": 2.0}, 4)
    t.flush()
    assert t.mlflow.metrics == [(4, {"loss": 1.0}), (4, {"val_loss": 2.0})]


def test_a_preview_already_on_disk_is_not_logged_again(tmp_path):
    image = Image.new("RGB", (16, 16), "red")
    Tracker(tmp_path, RecordingRun()).log_image(image, "sample_0", 10)
    mlflow = RecordingRun()
    resumed = Tracker(tmp_path, mlflow)
    resumed.log_image(Image.new("RGB", (16, 16), "blue"), "sample_0", 10)
    resumed.log_image(image, "sample_0", 20)
    resumed.close()
    assert [(k, s) for k, s, _ in mlflow.images] == [("sample_0", 20)]
    assert Image.open(tmp_path / "samples" / "step000010-sample_0.png").getpixel((0, 0)) == (255, 0, 0)
    assert mlflow.images[0][2] == tmp_path / "samples" / "step000020-sample_0.png"


def test_mlflow_calls_leave_the_step_and_keep_their_order(tmp_path):
    import threading
    import time

    class SlowRun(RecordingRun):
        def log_metrics(self, rows):
            time.sleep(0.05)
            self.thread = threading.current_thread().name
            super().log_metrics(rows)

        def log_image(self, path, key, step):
            time.sleep(0.05)
            self.images.append((key, step, len(self.metrics)))

    run = SlowRun()
    t = Tracker(tmp_path, run)
    start = time.perf_counter()
    for step in range(1, 11):
        t.log_metrics({"loss": 1.0}, step)
        if step % 5 == 0:
            t.log_image(Image.new("RGB", (8, 8)), "sample_0", step)
    assert time.perf_counter() - start < 0.25  # slow MLflow calls did not block the caller
    t.close()
    assert [s for s, _ in run.metrics] == list(range(1, 11)) and run.thread.startswith("mlflow")
    # Each image went out after the metrics of its step and before those of later steps.
    assert [(s, sent) for _, s, sent in run.images] == [(5, 5), (10, 10)]


def test_metrics_of_many_steps_go_to_mlflow_in_one_call(tmp_path, monkeypatch):
    import fluxray.track.tracker as tracker_mod

    run = RecordingRun()
    t = Tracker(tmp_path, run)
    for step in range(1, 51):
        t.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
    t.flush()
    assert run.calls == 1 and [s for s, _ in run.metrics] == list(range(1, 51))

    monkeypatch.setattr(tracker_mod, "METRICS_BATCH_SECONDS", 0.0)  # every call sends
    for step in range(51, 54):
        t.log_metrics({"loss": 0.1}, step)
    t.flush()
    assert run.calls == 4
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 54))  # the local record: every step


def test_the_preview_actors_tracker_leaves_the_metrics_to_rank_0(tmp_path):
    import pytest

    rank0 = Tracker(tmp_path, RecordingRun())
    for step in range(1, 4):
        rank0.log_metrics({"loss": 1.0}, step)  # still in rank 0's batch
    previews = RecordingRun()
    actor = Tracker(tmp_path, previews, metrics=False)
    actor.log_image(Image.new("RGB", (8, 8)), "sample_0", 2)
    actor.close()
    assert previews.metrics == [] and [(k, s) for k, s, _ in previews.images] == [("sample_0", 2)]
    with pytest.raises(RuntimeError):
        actor.log_metrics({"loss": 1.0}, 4)
    rank0.close()
    assert [s for s, _ in rank0.mlflow.metrics] == [1, 2, 3]
