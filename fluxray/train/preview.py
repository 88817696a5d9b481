"""Training previews on their own Ray actor, off the training critical path.

Rank 0 hands the actor each previewed step's LoRA file and trains on; the actor renders every
prompt through the serving path (`LoraPipeline`: the file loaded as a named adapter) and logs
the images into the job's run record and MLflow run, as rank 0 would.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

from fluxray.config import JobConfig, SamplePrompt
from fluxray.model.generate import LoraPipeline, PromptEmbeds, image_grid

#: LoRA steps that may wait for the actor; a newer one pushes the oldest out (see `PreviewQueue`).
MAX_WAITING = 2


def use_preview_actor(cfg: JobConfig, worker_gpus: float, available: dict[str, float] | None) -> bool:
    """Whether a Ray job renders its previews on a preview actor (`sample.mode`).

    `available` is the Ray cluster's free resources before the workers start, None for a local
    run (no Ray: always inline).
    """
    s, d = cfg.sample, cfg.distributed
    if not s.every or s.mode == "inline" or available is None:
        return False
    if s.mode == "actor":
        return True
    if worker_gpus > 0 and not s.actor_gpus:
        return False  # a CPU actor renders a GPU job's previews far slower than the workers would
    # An actor that never finds room would hold the job's end forever: only where it fits now.
    need = {"CPU": d.workers * d.cpus_per_worker + s.actor_cpus, "GPU": d.workers * worker_gpus + s.actor_gpus}
    return all(available.get(k, 0.0) >= v for k, v in need.items() if v)


def log_previews(tracker, images: list, step: int) -> None:
    """Each prompt's image as `sample_<k>` and their grid, at `step` (rank 0 inline, or the actor)."""
    if tracker is None:
        return
    for k, image in enumerate(images):
        tracker.log_image(image, f"sample_{k}", step)
    tracker.log_image(image_grid(images), "grid", step)


def unlogged_previews(run_dir: Path, start: int, every: int, step_lora) -> list[tuple[int, str | None]]:
    """(step, LoRA file) of the preview steps up to `start` that the run record has no grid of.

    A failed worker group takes its preview actor, and what it had not rendered yet, along;
    the resumed job hands those steps to the new actor (`step_lora(step)`: the step's file).
    """
    from fluxray.track.local import RunRecord

    record, out = RunRecord(run_dir), []
    for step in range(0, start + 1, every):
        lora = step_lora(step) if step else None
        if not record.sample_path("grid", step).exists() and (lora is None or lora.exists()):
            out.append((step, None if lora is None else str(lora)))
    return out


class SimilarityLog:
    """Rank 0's record of `sample_similarity` (the likeness): the metric at each scored preview step,
    `sample_similarity_gain` over the base model's (step 0's) score, the trend's sentence in the run
    status (the job page shows it), and each score handed to the loop's `ConvergenceWatch`."""

    def __init__(self, tracker, watch=None):
        from fluxray.track.local import read_metrics

        self.tracker, self.watch = tracker, watch
        # A resumed run's trend starts from the scores logged before the crash, not from nothing.
        self.points: dict[int, float] = {} if tracker is None else {
            r["step"]: r["sample_similarity"] for r in read_metrics(tracker.record.dir) if "sample_similarity" in r}
        self._pending = None  # an unanswered `take_scores` call to the preview actor

    def add(self, scores: list[tuple[int, float]]) -> None:
        from fluxray.advise.similarity import similarity_trend

        if not scores or self.tracker is None:
            return
        for step, value in scores:
            value = self.points.setdefault(step, value)  # a step scored again after a resume keeps its logged score
            metrics = {"sample_similarity": value}
            if step and 0 in self.points:
                metrics["sample_similarity_gain"] = value - self.points[0]
            self.tracker.log_metrics(metrics, step)
            if self.watch is not None:
                self.watch.add_likeness(step, value, self.tracker)
        self.tracker.status(similarity=similarity_trend(sorted(self.points.items())).message)

    def poll(self, renderer) -> None:
        """Take the actor's new scores without waiting for it."""
        import ray

        if self._pending is None:
            self._pending = renderer.take_scores.remote()
        elif ray.wait([self._pending], timeout=0)[0]:
            self.add(ray.get(self._pending))
            self._pending = None

    def drain(self, renderer) -> None:
        """Every score the actor has left (call after its `finish`)."""
        import ray

        if self._pending is not None:
            self.add(ray.get(self._pending))
            self._pending = None
        self.add(ray.get(renderer.take_scores.remote()))


class PreviewQueue:
    """The steps waiting for the actor: `(step, LoRA file)`, the file None for the base model.

    Once the actor has rendered a step, more than `limit` LoRA steps waiting means it is slower
    than training: the oldest is skipped (its file stays, so `<run>@<step>` still renders it).
    Previews never hold training back, and the latest weights are shown soonest. What queues
    before the first render is done is the actor's start-up backlog: all of it is rendered.
    The final step is never skipped (no step comes after it), nor the base-model preview
    (every later one is compared with it).
    """

    def __init__(self, limit: int = MAX_WAITING):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.waiting: deque[tuple[int, str | None]] = deque()
        self.skipped: list[int] = []
        self.rendered = 0
        self.closed = False
        self._cond = threading.Condition()

    def put(self, step: int, lora: str | None) -> list[int]:
        """Queue a step; returns the steps skipped to make room."""
        with self._cond:
            self.waiting.append((step, lora))
            steps = [w for w in self.waiting if w[1] is not None]
            skipped = steps[:len(steps) - self.limit] if self.rendered else []
            for w in skipped:
                self.waiting.remove(w)
            self.skipped += [w[0] for w in skipped]
            self._cond.notify()
            return [w[0] for w in skipped]

    def get(self) -> tuple[int, str | None] | None:
        """The oldest waiting step; blocks until there is one, None once closed and empty."""
        with self._cond:
            while not self.waiting and not self.closed:
                self._cond.wait()
            return self.waiting.popleft() if self.waiting else None

    def task_done(self) -> None:
        """One step taken by `get` is rendered."""
        with self._cond:
            self.rendered += 1

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class PreviewRenderer:
    """The preview actor (create it with `start_renderer`): loads the base pipeline once, without
    text encoders, and renders queued steps on a thread while `submit` calls keep arriving."""

    def __init__(self, config: dict, mlflow_run_id: str | None, limit: int = MAX_WAITING):
        from fluxray.logs import setup_worker
        from fluxray.model.pipeline import load_pipeline, resolve_device, resolve_dtype, resolve_model_path
        from fluxray.track import make_tracker

        setup_worker()  # the job's logging policy, in this actor's process too
        cfg = JobConfig.model_validate(config)
        device = resolve_device()
        # As the Serve deployment loads it: a preview is what `POST /v1/generate` gives for the step.
        pipe = load_pipeline(resolve_model_path(cfg), resolve_dtype(cfg.model.dtype, device), cfg.model.revision,
                             device, text_encoders=False)
        self.pipeline = LoraPipeline(pipe, cfg.model.max_sequence_length)
        self.tracker = make_tracker(cfg, mlflow_run_id, previews=True)
        self.queue = PreviewQueue(limit)
        self.prompts: list[SamplePrompt] = []
        self.texts: dict[str, PromptEmbeds] = {}
        self.render_seconds = 0.0
        self.cfg, self.judge = cfg, None
        self.scores: list[tuple[int, float]] = []  # (step, similarity) not yet taken by rank 0
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="previews", daemon=True)

    def start(self, prompts: list[SamplePrompt], texts: dict[str, PromptEmbeds]) -> None:
        """The resolved prompts and their embeddings (rank 0's text cache); rendering starts."""
        self.prompts, self.texts = prompts, texts
        if self.cfg.validation.embedding_model:
            from fluxray.advise.similarity import SubjectJudge
            from fluxray.data.prepare import read_prepared

            dataset = read_prepared(Path(self.cfg.dataset.path))
            self.judge = SubjectJudge.for_job(self.cfg, [path for path, _ in dataset.items], prompts,
                                              self.cfg.dataset.trigger_word or dataset.info.trigger_word)
        self._thread.start()

    def submit(self, step: int, lora_path: str | None) -> None:
        """Queue a step's previews (`lora_path` None: the base model) and return at once."""
        skipped = self.queue.put(step, lora_path)
        if skipped:
            print(f"previews: the preview actor is behind training; skipped step(s) {skipped}", flush=True)

    def render(self, step: int, lora_path: str | None) -> None:
        """Render every prompt with the step's LoRA file (None: the base model) and log them."""
        lora = None if lora_path is None else (f"step{step}", Path(lora_path))
        try:
            images = [self.pipeline.render(self.texts[p.prompt], lora=lora, lora_scale=p.lora_scale, seed=p.seed,
                                           width=p.width, height=p.height, steps=p.steps, guidance=p.guidance)
                      for p in self.prompts]
        finally:
            if lora is not None:
                self.pipeline.unload(lora[0])
        log_previews(self.tracker, images, step)
        if self.judge is not None:
            # Rank 0 logs the metric (`take_scores`): one writer of the run's metrics.
            self.scores.append((step, self.judge.score(images)))

    def take_scores(self) -> list[tuple[int, float]]:
        """The (step, similarity) scores since the last call."""
        scores, self.scores = self.scores, []
        return scores

    def finish(self) -> dict:
        """Render what still waits, send it, and return the totals; raises a render's error."""
        self.queue.close()
        if self._thread.ident is not None:
            self._thread.join()
        self.tracker.close()
        if self._failed is not None:
            raise self._failed
        return {"render_seconds": self.render_seconds, "skipped": self.queue.skipped}

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            t = time.time()
            try:
                self.render(*item)
            except BaseException as e:  # noqa: BLE001 - handed to rank 0 by `finish`
                self._failed = e
                return
            self.render_seconds += time.time() - t
            self.queue.task_done()


def start_renderer(cfg: JobConfig, mlflow_run_id: str | None):
    """The preview actor, owned by the calling process (rank 0's worker): it dies with it."""
    import ray

    return ray.remote(PreviewRenderer).options(num_cpus=cfg.sample.actor_cpus, num_gpus=cfg.sample.actor_gpus) \
        .remote(cfg.model_dump(mode="json"), mlflow_run_id)
