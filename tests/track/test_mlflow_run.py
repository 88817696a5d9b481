"""MLflow tracking against real stores (sqlite, and `fluxray mlflow` over HTTP), read back with
MlflowClient: one run per job with its config, metrics, previews and LoRA; a resumed run with a
clean step axis; and training that goes on through an outage and uploads afterwards."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from fluxray.cli import main as cli
from fluxray.config import load_config
from fluxray.data.prepare import read_prepared
from fluxray.track.local import RunRecord, read_metrics
from fluxray.track.mlflow_run import (EXPERIMENT_KIND, PARAM_KEYS, PENDING_FILE, PREVIEW_PENDING_FILE, MlflowRun,
                                      end_job_run, job_params, ray_job_id, run_page, start_job_run, tracking_uri)
from fluxray.track.tracker import Tracker
from fluxray.train.job import run_job

TRAIN_METRICS = ("loss", "lr", "grad_norm", "step_time", "images_per_sec")
TWO_PROMPTS = 'sample.prompts=["[trigger], portrait photo", "[trigger] in a park"]'


def _the_run(client: MlflowClient, cfg):
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _steps(client, run_id, key) -> list[int]:
    """The metric's steps in the order they were logged."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return [m.step for m in history]


def _images(client, run_id) -> Counter:
    """(key, step) of every full-size image that `log_image(key=, step=)` stored under images/."""
    names = [a.path for a in client.list_artifacts(run_id, "images")]
    found = Counter()
    for name in names:
        m = re.fullmatch(r"images/(.+)\+step\+(\d+)\+timestamp\+\d+\+[-0-9a-f]+\.png", name)
        if m:
            found[m[1], int(m[2])] += 1
    return found


def _lost_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "tracking lost" in r.getMessage()]


# -- the run's identity -------------------------------------------------------------------

def test_one_run_per_job_with_its_settings_config_and_identity_tags(tiny_config, monkeypatch):
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    cfg = tiny_config()
    run_id = start_job_run(cfg)
    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(run_id)
    assert run.data.params == job_params(cfg)
    assert run.data.params["train.steps"] == "40" and run.data.params["lora.rank"] == "4"
    tags = run.data.tags
    assert tags["fluxray.run_name"] == tags["mlflow.runName"] == "test-run"
    assert tags["trigger_word"] == "pxco" and tags["base_model"] == cfg.model.path
    assert tags["dataset_hash"] == read_prepared(cfg.dataset.path).info.content_hash
    assert tags["fluxray.version"] == __import__("fluxray").__version__
    assert ray_job_id() is not None and tags["ray.job_id"] == ray_job_id()

    # Resuming with a changed config reuses the run; params stay those of the first start.
    resumed = tiny_config("train.steps=80")
    assert start_job_run(resumed) == run_id
    assert _the_run(client, cfg).data.params["train.steps"] == "40"

    # MLflow's UI shows the experiment as model training (runs, metrics, images), and the run's
    # page link opens that view.
    exp_id = run.info.experiment_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run_page(cfg, run_id, "http://127.0.0.1:5000") == \
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"
    # An experiment made before fluxray tagged it gets the tag with its next run.
    client.delete_experiment_tag(exp_id, "mlflow.experimentKind")
    start_job_run(tiny_config("save.name=second"))
    assert EXPERIMENT_KIND.items() <= client.get_experiment(exp_id).tags.items()

    # The params are the settings runs are compared by; the whole resolved config is an artifact.
    assert set(run.data.params) == set(PARAM_KEYS)
    got = client.download_artifacts(run_id, "config.yaml", str(cfg.storage_root / "dl"))
    assert load_config(got) == cfg


def test_start_gives_up_quickly_when_nothing_listens(free_port, tiny_config, caplog):
    cfg = tiny_config(f"tracking.uri=http://127.0.0.1:{free_port()}")
    t = time.time()
    with caplog.at_level(logging.WARNING, logger="fluxray.mlflow"):
        assert start_job_run(cfg) is None
    assert time.time() - t < 30
    assert len(_lost_lines(caplog)) == 1


def test_a_preview_saved_but_never_sent_reaches_mlflow_at_job_end_once(tiny_config, caplog):
    # A process killed between saving a preview and its (background) MLflow send leaves a PNG the
    # resumed run skips; the driver sends it at job end, and a second end sends nothing twice.
    cfg = tiny_config()
    run_id = start_job_run(cfg)
    run_dir = cfg.storage_root / "runs" / cfg.save.name
    tracker = Tracker(run_dir, MlflowRun(cfg, run_id, run_dir / PENDING_FILE))
    tracker.log_image(Image.new("RGB", (16, 16), "red"), "sample_0", 0)
    tracker.close()
    RunRecord(run_dir).save_image(Image.new("RGB", (16, 16), "blue"), "grid", 0)  # the killed process's
    client = MlflowClient(tracking_uri(cfg))
    assert _images(client, run_id) == {("sample_0", 0): 1}
    with caplog.at_level(logging.WARNING, logger="fluxray.mlflow"):
        end_job_run(cfg)
    assert any("1 preview(s) saved but never sent" in r.getMessage() for r in caplog.records)
    end_job_run(cfg)
    assert _images(client, run_id) == {("sample_0", 0): 1, ("grid", 0): 1}
    assert not (run_dir / PREVIEW_PENDING_FILE).exists()


# -- `fluxray mlflow` -----------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    """Live processes by parent pid, from /proc (zombies, already dead, left out)."""
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                state, ppid = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if state != "Z":
                out.setdefault(int(ppid), []).append(int(d))
    return out


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_stopping_fluxray_mlflow_stops_its_server_and_frees_the_port(free_port, tmp_path, sig, code):
    import socket

    port = free_port()
    # Not in a process group of its own, as a user starts it: it must stop its children itself.
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fluxray"), "mlflow", "--set", f"storage.root={tmp_path}",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "fluxray mlflow did not come up"
                time.sleep(0.5)
        # mlflow server and its uvicorn (which may answer /health before every child is up)
        while len(server := _descendants(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(server) >= 2, server
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code
        assert "workflowType=machine_learning" in proc.stdout.read()  # the address it printed
        deadline = time.time() + 60  # liveness, not speed: a loaded 2-core machine is slow to reap
        while server & set().union(*_children().values()) and time.time() < deadline:
            time.sleep(0.2)
        assert not server & set().union(*_children().values()), "a child of fluxray mlflow outlived it"
        with socket.socket() as s:
            # Free for a new server, as uvicorn binds (SO_REUSEADDR): the /health probe's closed
            # connection may sit in TIME_WAIT, which only a listener would conflict with.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if proc.poll() is None:
            proc.kill()


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.slow
def test_the_run_page_opens_as_model_training_with_each_preview_in_view(free_port, tiny_config):
    """A real run's store under `fluxray mlflow`, in Chromium at the link a job prints: the
    model-training view, and the step-0 preview drawn in its image card, not hidden by text."""
    import io

    from mlflow.tracking.multimedia import compress_image_size
    from playwright.sync_api import expect, sync_playwright

    cfg = tiny_config("train.steps=2", "save.every=2", "sample.every=2", "sample.steps=2",
                      'sample.prompts=["[trigger], portrait photo"]', "distributed.workers=1")
    run_id = run_job(cfg, local=True)["mlflow_run_id"]
    with Image.open(cfg.storage_root / "runs" / "test-run" / "samples" / "step000000-sample_0.png") as im:
        preview = im.convert("RGB")
    port = free_port()
    server = _start_server(cfg.storage_root, port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(300_000)  # a loaded 2-core machine renders MLflow's UI slowly
            page.goto(run_page(cfg, run_id, f"http://127.0.0.1:{port}"))  # a fresh browser: no saved view
            page.get_by_role("tab", name="Model metrics").click()
            expect(page.get_by_role("link", name="Models")).to_be_visible()  # the model-training sidebar,
            expect(page.get_by_text("Evaluation runs")).to_have_count(0)   # not GenAI's
            card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
                has=page.locator('h4[title="sample_0"]'))
            img = card.locator("img.rc-image-img")
            expect(img).to_be_visible()
            card.scroll_into_view_if_needed()  # below the metric charts (loss, lr, grad_norm, ...) on a short window
            img.evaluate("i => i.complete || new Promise(done => { i.onload = done; i.onerror = done; })")
            # The card shows the preview as MLflow renders it for cards (resized to 256 px).
            assert img.evaluate("i => i.naturalWidth") == compress_image_size(preview).width
            page.wait_for_timeout(2000)  # the layout settles once the image's size is known
            box, frame = img.bounding_box(), card.bounding_box()
            assert frame["x"] <= box["x"] and box["x"] + box["width"] <= frame["x"] + frame["width"], (box, frame)
            # Visible inside its card and on top there: where the image is, the page shows the image
            # (MLflow's square frame may clip its bottom edge; the run's params must not push it out).
            visible = img.evaluate("""i => { const r = i.getBoundingClientRect(), rows = [];
                for (let y = 0; y < 20; y++) { let row = 0;
                  for (let x = 0; x < 20; x++)
                    row += document.elementFromPoint(r.x + (x + .5) * r.width / 20, r.y + (y + .5) * r.height / 20) === i;
                  rows.push(row); }
                return rows; }""")
            assert all(row in (0, 20) for row in visible), visible  # nothing over part of a row
            shown_rows = sum(row == 20 for row in visible)
            assert shown_rows >= 15 and visible[:shown_rows] == [20] * shown_rows, visible
            # The preview's pixels are there in the screenshot of the card.
            height = box["height"] * shown_rows / 20
            with Image.open(io.BytesIO(card.screenshot())) as shot:
                left, top = round(box["x"] - frame["x"]), round(box["y"] - frame["y"])
                shown = shot.convert("RGB").crop((left, top, left + round(box["width"]), top + round(height)))
            expected = preview.resize((round(box["width"]), round(box["height"])), Image.BILINEAR).crop(
                (0, 0) + shown.size)
            diff = _mean_abs_diff(shown, expected)
            flat = _mean_abs_diff(shown, Image.new("RGB", shown.size, shown.getpixel((0, 0))))
            assert diff < 20 and flat > 2 * diff, (diff, flat)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    pixels = list(zip(a.getdata(), b.getdata()))
    return sum(abs(x - y) for pa, pb in pixels for x, y in zip(pa, pb)) / (3 * len(pixels))


# -- outages --------------------------------------------------------------------------------

def _start_server(root, port: int) -> subprocess.Popen:
    """`fluxray mlflow` on the storage root, in its own process group."""
    proc = subprocess.Popen([sys.executable, "-m", "fluxray.cli", "mlflow", "--set", f"storage.root={root}",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise RuntimeError("fluxray mlflow did not come up")
            time.sleep(0.5)


def test_calls_wait_on_disk_through_an_outage_and_go_out_when_the_server_is_back(free_port, tiny_config, tmp_path,
                                                                                 caplog):
    port = free_port()
    cfg = tiny_config(f"tracking.uri=http://127.0.0.1:{port}", "tracking.register_model=pxco-lora")
    run_dir = cfg.storage_root / "runs" / cfg.save.name
    pending = run_dir / PENDING_FILE
    tracker = Tracker(run_dir, MlflowRun(cfg, None, pending, retry_seconds=0.0))
    lora = tmp_path / "pxco.safetensors"
    lora.write_bytes(b"not really a LoRA")
    with caplog.at_level(logging.INFO, logger="fluxray.mlflow"):
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_image(Image.new("RGB", (32, 32), "red"), "sample_0", 1)
        tracker.log_artifact(tmp_path / "deleted-meanwhile.safetensors", "checkpoints")
        tracker.log_lora(lora)
        tracker.flush()  # MLflow calls go out on the tracker's background thread
        assert len(_lost_lines(caplog)) == 1  # one line for the outage, not one per call
        assert [json.loads(line)["op"] for line in pending.read_text().splitlines()] == \
            ["metrics", "image", "artifact", "artifact", "register"]

        server = _start_server(cfg.storage_root, port)
        try:
            tracker.log_metrics({"loss": 0.5}, 2)
            tracker.flush()
            assert not pending.exists()
            assert any("tracking restored" in r.getMessage() for r in caplog.records)
            # A call that can never succeed is dropped with a warning, not retried forever.
            assert any("rejected a pending artifact call" in r.getMessage() for r in caplog.records)

            client = MlflowClient(f"http://127.0.0.1:{port}")
            run = _the_run(client, cfg)
            run_id = run.info.run_id
            assert run.data.params == job_params(cfg)
            assert _steps(client, run_id, "loss") == [1, 2]
            assert _images(client, run_id) == {("sample_0", 1): 1}
            assert client.list_artifacts(run_id, "checkpoints") == []
            version, = client.search_model_versions("name='pxco-lora'")
            assert version.source == f"runs:/{run_id}/lora/pxco.safetensors" and version.run_id == run_id
            got = client.download_artifacts(run_id, "lora/pxco.safetensors", str(tmp_path / "dl"))
            assert open(got, "rb").read() == lora.read_bytes()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


@pytest.mark.slow
def test_training_goes_on_when_mlflow_is_down_and_sync_uploads_it_later(free_port, tiny_config, caplog):
    cfg = tiny_config(f"tracking.uri=http://127.0.0.1:{free_port()}", "train.steps=2", "save.every=2",
                      "sample.every=2", "sample.steps=2", 'sample.prompts=["[trigger], portrait photo"]',
                      "distributed.workers=1")
    with caplog.at_level(logging.WARNING, logger="fluxray.mlflow"):
        summary = run_job(cfg, local=True)
    assert summary["steps"] == 2
    assert len(_lost_lines(caplog)) == 1
    assert any("fluxray mlflow sync --run test-run" in r.getMessage() for r in caplog.records)

    # The local copies: metrics, previews, LoRA files, and the spool that points at them.
    run_dir = cfg.storage_root / "runs" / "test-run"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2]
    for step in (0, 2):
        for key in ("sample_0", "grid"):
            assert (run_dir / "samples" / f"step{step:06d}-{key}.png").exists()
    assert (cfg.storage_root / "loras" / "test-run.safetensors").exists()
    ops = [json.loads(line) for line in (run_dir / PENDING_FILE).read_text().splitlines()]
    assert all(os.path.exists(op["path"]) for op in ops if "path" in op)
    # A preview actor's image in the same outage waits in the actor's own spool.
    from fluxray.track import make_tracker

    actor = make_tracker(cfg, None, previews=True)
    actor.log_image(Image.new("RGB", (16, 16), "red"), "sample_0", 4)
    actor.close()
    assert (run_dir / PREVIEW_PENDING_FILE).exists()

    # Later, into a store that answers: the whole run arrives.
    uri = f"sqlite:///{cfg.storage_root / 'mlflow' / 'mlflow.db'}"
    assert cli(["mlflow", "sync", "--run", "test-run", "--set", f"storage.root={cfg.storage_root}",
                "--set", f"tracking.uri={uri}"]) == 0
    assert not (run_dir / PENDING_FILE).exists() and not (run_dir / PREVIEW_PENDING_FILE).exists()
    client = MlflowClient(uri)
    run = _the_run(client, cfg)
    assert run.data.params["train.steps"] == "2"
    for key in TRAIN_METRICS:
        assert _steps(client, run.info.run_id, key) == [1, 2]
    assert _steps(client, run.info.run_id, "val_loss") == [0, 2]
    assert _images(client, run.info.run_id) == {**{(k, s): 1 for k in ("sample_0", "grid") for s in (0, 2)},
                                                ("sample_0", 4): 1}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "lora")] == ["lora/test-run.safetensors"]


# -- a real 2-worker Ray run, with a worker killed mid-run ------------------------------------

@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory):
    return {"root": tmp_path_factory.mktemp("tracked"), "runs": {}}


def _tracked_run(ray_runs, tiny_config):
    """6 steps on 2 workers, previews and checkpoints every 2; rank 1 dies at step 4, after rank 0
    logged step 3 and before the step-4 checkpoint, so the resumed run redoes step 3."""
    if "tracked" not in ray_runs["runs"]:
        cfg = tiny_config("distributed.workers=2", "distributed.max_failures=1", "train.steps=6", "save.every=2",
                          "sample.every=2", "sample.steps=2", TWO_PROMPTS, "tracking.register_model=pxco-tiny",
                          "save.name=tracked", root=ray_runs["root"])
        os.environ["FLUXRAY_CRASH_AT"] = "4:1"
        try:
            run_job(cfg)
        finally:
            del os.environ["FLUXRAY_CRASH_AT"]
        run_dir = cfg.storage_root / "runs" / "tracked"
        resolved = load_config(run_dir / "config.yaml")
        client = MlflowClient(tracking_uri(resolved))
        ray_runs["runs"]["tracked"] = (resolved, run_dir, client, _the_run(client, resolved))
    return ray_runs["runs"]["tracked"]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_run_is_one_complete_mlflow_run_after_a_worker_failure(ray_runs, tiny_config, ray_driver):
    import ray

    cfg, run_dir, client, run = _tracked_run(ray_runs, tiny_config)
    assert (run_dir / ".crashed-4-1").exists(), "the injected failure never fired"
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params == job_params(cfg)
    assert run.data.tags["ray.job_id"] == ray.get_runtime_context().get_job_id()
    # Every step once, in order, although steps 3 ran twice (before the crash and after it).
    for key in TRAIN_METRICS:
        assert _steps(client, run_id, key) == [1, 2, 3, 4, 5, 6], key
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert _steps(client, run_id, "val_loss") == [0, 2, 4, 6]
    assert _images(client, run_id) == {(k, s): 1 for k in ("sample_0", "sample_1", "grid") for s in (0, 2, 4, 6)}
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == \
        {f"checkpoints/tracked-step{s:06d}.safetensors" for s in (2, 4, 6)}


@pytest.mark.ray
@pytest.mark.slow
def test_ray_runs_final_lora_artifact_loads_in_diffusers_and_is_registered(ray_runs, tiny_config, ray_driver,
                                                                         random_flux, tmp_path):
    from diffusers import FluxPipeline

    cfg, _, client, run = _tracked_run(ray_runs, tiny_config)
    path = client.download_artifacts(run.info.run_id, "lora/tracked.safetensors", str(tmp_path))
    assert open(path, "rb").read() == (cfg.storage_root / "loras" / "tracked.safetensors").read_bytes()
    pipe = FluxPipeline.from_pretrained(random_flux)
    pipe.load_lora_weights(path, adapter_name="tracked")
    assert pipe.get_list_adapters() == {"transformer": ["tracked"]}
    version, = client.search_model_versions("name='pxco-tiny'")
    assert version.source == f"runs:/{run.info.run_id}/lora/tracked.safetensors"
