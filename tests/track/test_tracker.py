"""Tracker: a resumed run never logs a step twice, locally or to MLflow."""

from PIL import Image

from fluxray.track.local import read_metrics
from fluxray.track.tracker import Tracker, last_steps


class RecordingRun:
    """Stands in for MlflowRun: records what the tracker forwards."""

    def __init__(self):
        self.metrics, self.images = [], []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def close(self):
        pass

    def log_image(self, path, key, step):
        self.images.append((key, step, path))


def test_a_resumed_tracker_skips_steps_it_logged_before_the_crash(tmp_path):
    first = Tracker(tmp_path, RecordingRun())
    first.log_metrics({"val_loss": 2.0}, 0)
    for step in range(1, 8):  # crashed after logging step 7; the last checkpoint is step 5
        first.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
    first.log_metrics({"val_loss": 1.5}, 5)

    mlflow = RecordingRun()
    resumed = Tracker(tmp_path, mlflow)
    for step in range(6, 11):
        resumed.log_metrics({"loss": 2.0 / step, "lr": 1e-3}, step)
        if step == 10:
            resumed.log_metrics({"val_loss": 1.0}, step)

    resumed.flush()
    assert [s for s, _ in mlflow.metrics] == [8, 9, 10, 10]
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
        def log_metrics(self, metrics, step):
            time.sleep(0.05)
            self.thread = threading.current_thread().name
            super().log_metrics(metrics, step)

    run = SlowRun()
    t = Tracker(tmp_path, run)
    start = time.perf_counter()
    for step in range(1, 11):
        t.log_metrics({"loss": 1.0}, step)
    assert time.perf_counter() - start < 0.25  # ten 50 ms calls did not block the caller
    t.close()
    assert [s for s, _ in run.metrics] == list(range(1, 11)) and run.thread.startswith("mlflow")
