"""The preview actor: who renders (`sample.mode`), how its queue skips when it falls behind, and a
real Ray job whose actor logs the previews generate() makes from each step's LoRA file while the
workers train on."""

import json

import numpy as np
import pytest
from diffusers import FluxPipeline
from mlflow.tracking import MlflowClient
from PIL import Image

from fluxray.config import build_config
from fluxray.model.generate import encode_prompt, generate
from fluxray.model.lora import set_lora_scale
from fluxray.track.local import read_metrics
from fluxray.track.mlflow_run import find_run, tracking_uri
from fluxray.train.job import run_job
from fluxray.track.local import RunPaths
from fluxray.track.tracker import Tracker
from fluxray.train.preview import (PreviewQueue, PreviewRenderer, SimilarityLog, unlogged_previews,
                                    use_preview_actor)

ROOMY = {"CPU": 8.0, "GPU": 4.0}


def _cfg(*overrides: str):
    return build_config({}, ["distributed.workers=2", *overrides])


@pytest.mark.parametrize("overrides, worker_gpus, available, actor", [
    ([], 0.0, ROOMY, True),                                    # auto, CPU cluster with room
    ([], 0.0, None, False),                                    # a local run: no Ray
    ([], 0.0, {"CPU": 2.0}, False),                            # 2 workers fill the cluster
    ([], 1.0, ROOMY, False),                                   # GPU workers, CPU actor: slower than inline
    (["sample.actor_gpus=0.5"], 1.0, ROOMY, True),
    (["sample.actor_gpus=1"], 1.0, {"CPU": 8.0, "GPU": 2.0}, False),  # the workers take both GPUs
    (["sample.mode=inline"], 0.0, ROOMY, False),
    (["sample.mode=actor"], 0.0, {"CPU": 2.0}, True),          # asked for: it waits for room
    (["sample.mode=actor"], 0.0, None, False),
    (["sample.mode=actor", "sample.every=0"], 0.0, ROOMY, False),
])
def test_who_renders_the_previews(overrides, worker_gpus, available, actor):
    assert use_preview_actor(_cfg(*overrides), worker_gpus, available) is actor


def test_a_late_actor_skips_the_oldest_waiting_steps_never_the_base_or_the_last():
    q = PreviewQueue(limit=2)
    for step in (0, 2, 4, 6):  # queued while the actor starts: a backlog, all kept
        assert q.put(step, f"s{step}" if step else None) == []
    assert q.get() == (0, None)
    q.task_done()
    assert q.put(8, "s8") == [2, 4]  # now it is slower than training: the oldest LoRA steps go
    assert q.put(10, "s10") == [6]
    assert q.get() == (8, "s8")
    q.task_done()
    assert q.put(12, "s12") == []  # two wait: within the limit
    q.close()
    assert [q.get() for _ in range(3)] == [(10, "s10"), (12, "s12"), None]
    assert q.skipped == [2, 4, 6]


def test_the_base_preview_is_never_skipped():
    q = PreviewQueue(limit=1)
    q.put(2, "s2")
    q.get()
    q.task_done()
    q.put(0, None)  # a resumed job's missing base preview, behind LoRA steps
    assert q.put(4, "s4") == [] and q.put(6, "s6") == [4]
    q.close()
    assert [q.get() for _ in range(3)] == [(0, None), (6, "s6"), None]


def test_a_resumed_job_queues_the_previews_its_lost_actor_did_not_log(tmp_path):
    paths = RunPaths(tmp_path, "run")
    for step in (2, 4, 6):
        paths.step_lora(step).parent.mkdir(parents=True, exist_ok=True)
        paths.step_lora(step).write_bytes(b"")
    samples = paths.run_dir / "samples"
    samples.mkdir()
    (samples / "step000000-grid.png").write_bytes(b"")
    (samples / "step000004-grid.png").write_bytes(b"")
    # Step 8 is past the checkpoint it resumes from; step 6's grid never came.
    assert unlogged_previews(paths.run_dir, 6, 2, paths.step_lora) == [(2, str(paths.step_lora(2))),
                                                                         (6, str(paths.step_lora(6)))]


def test_a_resumed_run_judges_the_similarity_trend_on_the_scores_logged_before_the_crash(tmp_path):
    before = SimilarityLog(Tracker(tmp_path))
    before.add([(0, 0.50), (50, 0.80)])
    resumed = SimilarityLog(Tracker(tmp_path))  # the process died; its run record stays
    resumed.add([(50, 0.10), (100, 0.70)])  # step 50 is scored again after the resume: the logged score stays
    assert resumed.points == {0: 0.50, 50: 0.80, 100: 0.70}
    assert [(r["step"], r["sample_similarity"]) for r in read_metrics(tmp_path)] == [(0, 0.5), (50, 0.8), (100, 0.7)]
    # How much closer than the base model's previews (step 0's), also for the steps after the resume.
    gains = [(r["step"], round(r["sample_similarity_gain"], 6)) for r in read_metrics(tmp_path)
             if "sample_similarity_gain" in r]
    assert gains == [(50, 0.3), (100, 0.2)]
    status = (tmp_path / "status.json").read_text()
    assert "0.70 at step 100, +0.20 on the base model (best 0.80 at step 50)" in status


def test_each_likeness_score_reaches_the_convergence_watch(tmp_path):
    from fluxray.advise.convergence import ConvergenceWatch

    watch = ConvergenceWatch(patience=2, min_delta=0.05)
    log = SimilarityLog(Tracker(tmp_path), watch)
    scores = [(0, 0.3), (10, 0.8), (20, 0.8), (30, 0.8), (40, 0.8), (50, 0.8)]
    log.add(scores)
    assert watch.likeness == scores
    assert watch.converged  # the likeness alone says it is done: no validation loss was given
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["converged_step"] == watch.result.converged_step and "likely converged" in status["convergence"]


def test_a_failed_render_fails_finish(tiny_config):
    cfg = tiny_config()
    renderer = PreviewRenderer(cfg.model_dump(mode="json"), None)
    renderer.start(cfg.sample_prompts("pxco"), {})  # no embeddings: the render raises
    renderer.submit(0, None)
    with pytest.raises(KeyError):
        renderer.finish()


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_job_logs_previews_from_its_actor_while_the_workers_train(tiny_config, ray_driver, random_flux):
    # 512², 8 sampling steps: a render takes ~10 training steps, so blocking would show. One worker
    # and the actor take the machine's 2 CPUs (two workers beside it are refused: test_admission).
    cfg = tiny_config("distributed.workers=1", "train.steps=4", "sample.every=2", "save.every=4",
                      "validation.every=4", "sample.mode=actor",
                      "sample.width=512", "sample.height=512", "sample.steps=8", "distributed.max_failures=0",
                      'sample.prompts=["[trigger], portrait", "[trigger], smile"]', "validation.embedding_model=tiny")
    summary = run_job(cfg)
    run_dir = cfg.storage_root / "runs" / "test-run"
    samples = run_dir / "samples"

    # Every preview step (0, every N, the last), rendered by the actor alone and logged to MLflow too.
    keys = {"sample_0", "sample_1", "grid"}
    assert {p.name for p in samples.glob("*.png")} == {f"step{s:06d}-{k}.png" for s in (0, 2, 4) for k in keys}
    client = MlflowClient(tracking_uri(cfg))
    logged = {a.path.split("+timestamp")[0] for a in client.list_artifacts(find_run(client, cfg), "images")}
    assert {f"images/{k}+step+{s}" for s in (0, 2, 4) for k in keys} <= logged
    assert summary["previews_skipped"] == []
    # The actor scored each step against the training images; rank 0 logged the metric.
    scores = {m["step"]: m["sample_similarity"] for m in read_metrics(run_dir) if "sample_similarity" in m}
    assert sorted(scores) == [0, 2, 4] and all(-1 <= v <= 1 for v in scores.values())

    # The loop only handed the steps over; step 3 trained while step 2 was still being rendered.
    assert summary["sample_seconds"] < 0.1 * summary["preview_render_seconds"]
    trained = {m["step"]: m["time"] for m in read_metrics(run_dir) if "loss" in m}
    assert trained[3] < (samples / "step000002-grid.png").stat().st_mtime

    # Pixel for pixel what generate() makes from each step's LoRA file (step 0: the base model).
    pipe = FluxPipeline.from_pretrained(random_flux)
    pipe.set_progress_bar_config(disable=True)
    paths = RunPaths(cfg.storage_root, "test-run")
    for step in (0, 2, 4):
        if step:
            pipe.load_lora_weights(str(paths.step_lora(step)), adapter_name=f"s{step}")
            set_lora_scale(pipe.transformer, 1.0, adapter=f"s{step}")
        for k, p in enumerate(cfg.sample_prompts("pxco")):
            image = generate(pipe, encode_prompt(pipe, p.prompt, cfg.model.max_sequence_length), seed=p.seed,
                             width=p.width, height=p.height, steps=p.steps, guidance=p.guidance)
            preview = Image.open(samples / f"step{step:06d}-sample_{k}.png")
            assert np.array_equal(np.asarray(image), np.asarray(preview)), (step, k)
        if step:
            pipe.delete_adapters(f"s{step}")
