"""Is it done? The plateau on synthetic curves, the best saved step, the loop's watch, and a real
tiny run trained until its validation loss flattens: it stops early, marks the best checkpoint
and logs both to MLflow and the job's status."""

import json
import math
import random

import pytest

from fluxray.advise.convergence import (ConvergenceWatch, best_checkpoint, convergence, likeness_plateau_step,
                                        plateau_step, read_val_points, smooth)
from fluxray.advise.estimate import eta
from fluxray.model.kohya import kohya_path
from fluxray.track.local import read_metrics
from fluxray.train.job import run_job


def curve(steps, floor=1.0, height=0.5, tau=200.0, noise=0.003, seed=0):
    """A validation curve that decays to a floor, with a little noise."""
    rng = random.Random(seed)
    return [(s, floor + height * math.exp(-s / tau) + rng.gauss(0, noise)) for s in steps]


def test_plateau_of_a_decaying_curve_is_where_it_flattens():
    points = curve(range(0, 2001, 50))
    step = plateau_step(points, patience=5, min_delta=0.01)
    # 0.5·e^(-s/200) is within 1% of the floor from s ≈ 780; the last drop of 1% below the
    # previous best lands before s ≈ 920 (0.5·e^(-s/200) < 0.005).
    assert 700 <= step <= 950, step
    c = convergence(points, saved_steps=range(0, 2001, 250), patience=5, min_delta=0.01)
    assert c.converged_step == step and f"likely converged at step {step}" in c.message
    assert c.best_step in range(1000, 2001, 250) and "best checkpoint" in c.message


def test_no_plateau_while_it_still_improves_and_none_when_too_short():
    assert plateau_step(curve(range(0, 501, 50)), patience=5) is None
    assert plateau_step([(0, 1.0), (50, 1.0)], patience=5) is None
    assert "still improving" in convergence(curve(range(0, 501, 50))).message


def test_a_flat_curve_means_the_lora_is_not_learning():
    flat = [(s, 1.0 + 0.001 * (-1) ** (s // 50)) for s in range(0, 501, 50)]
    c = convergence(flat, patience=5)
    assert c.converged_step == 0 and "not learning" in c.message


def test_one_lucky_validation_does_not_reset_the_plateau():
    points = [(s, 1.0) for s in range(0, 400, 50)]
    points[5] = (250, 0.96)  # a single dip: the trailing mean moves ~1.3%, then drifts back
    raw = plateau_step(points, patience=5, min_delta=0.01, window=1)
    assert raw is None  # without smoothing the dip looks like progress: no plateau yet
    assert plateau_step(points, patience=5, min_delta=0.02) == 0
    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_best_checkpoint_is_the_lowest_loss_among_saved_steps():
    points = [(0, 2.0), (50, 1.2), (100, 0.9), (150, 1.0), (200, 0.95)]
    assert best_checkpoint(points, [100, 200]) == (100, 0.9)
    assert best_checkpoint(points, [150, 200]) == (200, 0.95)  # 100 was not saved
    assert best_checkpoint(points, [75]) is None
    assert read_val_points([{"step": 5, "val_loss": 2.0}, {"step": 5, "val_loss": 1.0}, {"step": 6, "loss": 3}]) == [(5, 1.0)]


class _Recorder:
    """Stands in for the Tracker: records what the watch sends."""

    def __init__(self):
        self.statuses, self.tags = [], []

    def status(self, **fields):
        self.statuses.append(fields)

    def set_tags(self, tags):
        self.tags.append(tags)


def test_watch_logs_changes_only_and_says_when_to_stop():
    rec = _Recorder()
    w = ConvergenceWatch(patience=3, min_delta=0.01)
    for step, loss in [(0, 2.0), (10, 1.5), (20, 1.2), (30, 1.2), (40, 1.2), (50, 1.2), (60, 1.2), (70, 1.2)]:
        assert not w.converged
        w.add(step, loss, rec)
        if step in (20, 40):
            w.saved(step, f"/runs/x-step{step:06d}.safetensors", rec)
    # The mean of the last 3 reaches 1.2 at step 40 (the last drop of 1%); 3 validations later it is flat.
    assert w.converged and w.result.converged_step == 40
    assert rec.statuses[-1]["best_lora"] == "/runs/x-step000020.safetensors"  # the first saved step at 1.2
    assert rec.tags[-1] == {"fluxray.converged_step": "40", "fluxray.best_step": "20",
                            "fluxray.best_lora": "/runs/x-step000020.safetensors"}
    assert len(rec.tags) == len({json.dumps(t, sort_keys=True) for t in rec.tags})  # no repeated MLflow calls
    w.add(50, 1.2)  # no tracker (ranks > 0): nothing is logged
    assert ConvergenceWatch(3, 0.01).summary()["message"] == "no validation loss yet"


def rising(steps, top=0.9, base=0.3, tau=100.0, noise=0.003, seed=0):
    """A likeness curve that rises from the base model's score towards `top`, with a little noise."""
    rng = random.Random(seed)
    return [(s, top - (top - base) * math.exp(-s / tau) + rng.gauss(0, noise)) for s in steps]


def test_with_a_likeness_score_the_likeness_decides_when_it_is_done_and_which_file_is_best():
    val = [(s, 2.0 - s / 1000) for s in range(0, 1001, 25)]  # still falling at the end: the LoRA keeps fitting
    likeness = rising(range(0, 1001, 25))
    saved = range(0, 1001, 25)
    c = convergence(val, saved, patience=5, min_delta=0.05, likeness=likeness)
    assert c.val_plateau_step is None and c.likeness_plateau_step == likeness_plateau_step(likeness, 5, 0.05)
    # The rise is over (the last 5% of the way left to a perfect match) well before the end.
    assert c.converged_step == c.likeness_plateau_step and 150 <= c.converged_step <= 700, c
    after = [v for s, v in likeness if s >= c.converged_step]
    assert max(after) - min(after) < 0.03
    best_step, best = max(likeness, key=lambda p: (p[1], -p[0]))
    assert (c.best_step, c.best_likeness) == (best_step, best) and c.best_val_loss == dict(val)[best_step]
    assert f"likely converged at step {c.converged_step}" in c.message
    assert "the validation loss still improves" in c.message and f"best checkpoint: step {best_step}" in c.message
    early = convergence(val[:5], saved, patience=5, min_delta=0.05, likeness=likeness[:5])
    assert early.converged_step is None and "the likeness still rises at step 100" in early.message
    flat = convergence(val, saved, patience=5, min_delta=0.05, likeness=[(s, 0.3) for s, _ in likeness])
    assert flat.converged_step == 0 and "not learning the subject" in flat.message


def test_the_watch_stops_on_the_likeness_and_keeps_it_across_a_resume():
    rec = _Recorder()
    w = ConvergenceWatch(patience=3, min_delta=0.05)
    for step, loss, like in [(0, 2.0, 0.3), (10, 1.5, 0.6), (20, 1.2, 0.8), (30, 1.1, 0.8), (40, 1.0, 0.8),
                             (50, 0.9, 0.8), (60, 0.8, 0.8), (70, 0.7, 0.8)]:
        assert not w.converged
        w.add(step, loss, rec)
        w.saved(step, f"/runs/x-step{step:06d}.safetensors", rec)
        w.add_likeness(step, like, rec)
    # The validation loss still falls; the likeness (smoothed over 3) last rose at step 40: done.
    assert w.converged and w.result.converged_step == w.result.likeness_plateau_step == 40
    assert w.result.val_plateau_step is None and w.result.best_step == 20  # the first step at 0.8
    assert rec.statuses[-1]["best_lora"] == "/runs/x-step000020.safetensors"
    assert rec.tags[-1]["fluxray.likeness_plateau_step"] == str(w.result.likeness_plateau_step)
    resumed = ConvergenceWatch(3, 0.05)
    resumed.restore(json.loads(json.dumps(w.state())), upto=40)
    assert resumed.likeness == [(s, v) for s, v in w.likeness if s <= 40] and resumed.points == w.points[:5]


@pytest.mark.slow
def test_real_tiny_run_flattens_stops_early_and_marks_the_best_checkpoint(tiny_config):
    """A high learning rate flattens the tiny model's fixed-noise validation loss in well under
    200 steps; with early stop the run ends there, saved and previewed as a last step would be."""
    from mlflow.tracking import MlflowClient

    from fluxray.track.mlflow_run import tracking_uri

    cfg = tiny_config("distributed.workers=1", "sample.every=0", "train.steps=200", "train.lr=0.02",
                      "validation.every=5", "validation.images=2", "save.every=10", "train.ema=false",
                      "train.early_stop=true", "train.early_stop_patience=3")
    summary = run_job(cfg, local=True)
    run = cfg.storage_root / "runs" / cfg.save.name
    records = read_metrics(run)
    points = read_val_points(records)
    stopped = summary["steps"]
    assert stopped < 200 and points[-1][0] == stopped

    # The curve really fell, then flattened: the offline detection agrees with the loop's.
    first, low = points[0][1], min(v for _, v in points)
    assert low < 0.9 * first
    saved = [s for s, _ in points if (s % 10 == 0 and s > 0) or s == stopped]
    c = convergence(points, saved, patience=3, min_delta=0.01)
    assert c.converged_step is not None and c.converged_step == summary["convergence"]["converged_step"]
    after = [v for s, v in points if s >= c.converged_step]
    assert max(after) - min(after) < 0.03 * first

    # The best checkpoint is marked in status.json and MLflow, and its file exists.
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == stopped
    assert status["converged_step"] == c.converged_step and status["best_step"] == c.best_step
    assert status["best_lora"].endswith(f"step{c.best_step:06d}.safetensors")
    best_file = run / "loras" / f"{cfg.save.name}-step{c.best_step:06d}.safetensors"
    assert best_file.exists() and kohya_path(best_file).exists()
    final = cfg.storage_root / "loras" / f"{cfg.save.name}.safetensors"
    assert final.read_bytes() == (run / "loras" / f"{cfg.save.name}-step{stopped:06d}.safetensors").read_bytes()
    assert kohya_path(final).exists()
    client = MlflowClient(tracking_uri(cfg))
    mlrun = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                               filter_string=f"tags.`fluxray.run_name` = '{cfg.save.name}'")[0]
    assert mlrun.data.tags["fluxray.converged_step"] == str(c.converged_step)
    assert mlrun.data.tags["fluxray.best_step"] == str(c.best_step)

    # The ETA from the same records, halfway: the median measured step time times the steps left.
    half = [r for r in records if r["step"] <= stopped // 2]
    times = sorted(r["step_time"] for r in half if "step_time" in r)[-20:]
    e = eta(half, 200)
    assert e.step == stopped // 2 and 0 < e.sec_per_step <= max(times)
    assert e.seconds_left == pytest.approx(e.sec_per_step * (200 - stopped // 2))


def test_watch_state_round_trips_up_to_the_resumed_step():
    w = ConvergenceWatch(3, 0.01)
    for step, loss in [(0, 2.0), (5, 1.5), (10, 1.2), (15, 1.2)]:
        w.add(step, loss)
        w.saved(step, f"/runs/x-step{step:06d}.safetensors")
    state = json.loads(json.dumps(w.state()))  # as the checkpoint's state file keeps it
    resumed = ConvergenceWatch(3, 0.01)
    resumed.restore(state, upto=10)
    assert resumed.points == [(0, 2.0), (5, 1.5), (10, 1.2)]
    assert resumed.files == {s: f"/runs/x-step{s:06d}.safetensors" for s in (0, 5, 10)}
    resumed.restore(None, upto=10)  # a checkpoint from before the watch was kept: start empty
    assert resumed.points == [] and resumed.files == {}


@pytest.mark.slow
def test_early_stop_and_the_best_checkpoint_survive_a_crash_and_resume(tiny_config, tmp_path):
    """The same early-stopping run twice: once straight through, once killed after the plateau
    began and resumed with `--resume`. Both stop at the same step and mark the same best file."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fluxray.config import dump_config

    sets = ("distributed.workers=1", "sample.every=0", "train.steps=200", "train.lr=0.02", "validation.every=5",
            "validation.images=2", "save.every=5", "train.ema=false", "train.early_stop=true",
            "train.early_stop_patience=3", "save.kohya=false")
    straight = run_job(tiny_config(*sets, root=tmp_path / "a"), local=True)
    c = straight["convergence"]
    assert straight["steps"] < 200 and c["converged_step"] is not None

    cfg = tiny_config(*sets, root=tmp_path / "b")
    path = tmp_path / "job.yaml"
    path.write_text(dump_config(cfg))
    crash = c["converged_step"] + 6  # one step after the first save past the plateau's start
    assert crash < straight["steps"]
    cli = [str(Path(sys.executable).parent / "fluxray"), "train", "--config", str(path), "--local"]
    r = subprocess.run(cli, env={**os.environ, "FLUXRAY_CRASH_AT": f"{crash}:0"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and f"exits at step {crash}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run(cli + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"at step {crash - 1}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]

    status = json.loads((cfg.storage_root / "runs" / cfg.save.name / "status.json").read_text())
    assert status["step"] == straight["steps"]
    assert (status["converged_step"], status["best_step"]) == (c["converged_step"], c["best_step"])
    assert status["best_lora"].endswith(f"step{c['best_step']:06d}.safetensors")
