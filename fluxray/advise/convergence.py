"""Is it done? The plateau of the fixed-noise validation loss, the best saved step, early stop.

The guide: "when quality stops improving, it's done". `plateau_step` and `best_checkpoint`
are pure functions of `(step, val_loss)` points; `ConvergenceWatch` is the little state the
training loop keeps to log them and to stop early.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Convergence:
    """What the validation curve says so far."""

    converged_step: int | None  # the last real improvement, once `patience` validations passed without one
    best_step: int | None  # the saved step with the lowest validation loss
    best_val_loss: float | None
    message: str


def smooth(values: list[float], window: int = 3) -> list[float]:
    """Trailing mean over `window` points: one lucky validation does not count as progress."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plateau_step(points: list[tuple[int, float]], patience: int = 5, min_delta: float = 0.01,
                 window: int = 3) -> int | None:
    """Step of the smoothed loss's last relative drop of at least `min_delta`, when `patience`
    validations have followed it without one; None while the loss still improves."""
    if len(points) <= patience:
        return None
    s = smooth([v for _, v in points], window)
    best = 0
    for i in range(1, len(s)):
        if s[i] < s[best] * (1 - min_delta):
            best = i
    return points[best][0] if len(s) - 1 - best >= patience else None


def best_checkpoint(points: list[tuple[int, float]], saved_steps) -> tuple[int, float] | None:
    """(step, val_loss) of the saved step with the lowest validation loss."""
    saved = set(saved_steps)
    candidates = [(v, s) for s, v in points if s in saved]
    if not candidates:
        return None
    v, s = min(candidates)
    return s, v


def convergence(points: list[tuple[int, float]], saved_steps=(), patience: int = 5,
                min_delta: float = 0.01) -> Convergence:
    """The plateau and the best checkpoint, with the sentence the job page shows."""
    converged = plateau_step(points, patience, min_delta)
    best = best_checkpoint(points, saved_steps)
    if not points:
        text = "no validation loss yet"
    elif converged is None:
        text = f"still improving at step {points[-1][0]}"
    elif converged == points[0][0]:
        text = (f"no improvement of the validation loss since step {converged}: the LoRA is not learning "
                "(is train.lr too low?)")
    else:
        text = (f"likely converged at step {converged}: the validation loss has improved less than "
                f"{min_delta:.0%} over the {patience} validations since")
    if best:
        text += f"; best checkpoint: step {best[0]} (val loss {best[1]:.4f})"
    return Convergence(converged, best[0] if best else None, best[1] if best else None, text)


def read_val_points(records: list[dict]) -> list[tuple[int, float]]:
    """(step, val_loss) from metrics.jsonl records; a step logged twice keeps its last value."""
    by_step = {int(r["step"]): float(r["val_loss"]) for r in records if "val_loss" in r}
    return sorted(by_step.items())


class ConvergenceWatch:
    """The loop's view of the curve: fed every validation (on every rank, so all ranks agree to
    stop) and every saved file; logs changes to the tracker on rank 0."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.points: list[tuple[int, float]] = []
        self.files: dict[int, str] = {}
        self._status: dict | None = None
        self._tags: dict | None = None

    @property
    def result(self) -> Convergence:
        return convergence(self.points, self.files, self.patience, self.min_delta)

    @property
    def converged(self) -> bool:
        return self.result.converged_step is not None

    def add(self, step: int, val_loss: float, tracker=None) -> None:
        self.points = [p for p in self.points if p[0] != step] + [(step, val_loss)]
        self._log(tracker)

    def saved(self, step: int, path: Path, tracker=None) -> None:
        self.files[step] = str(path)
        self._log(tracker)

    def _log(self, tracker) -> None:
        if tracker is None:
            return
        r = self.result
        status = {"converged_step": r.converged_step, "best_step": r.best_step,
                  "best_lora": self.files.get(r.best_step), "convergence": r.message}
        if status != self._status:
            self._status = status
            tracker.status(**status)
        tags = {f"fluxray.{k}": str(v) for k, v in status.items() if k != "convergence" and v is not None}
        if tags and tags != self._tags:  # MLflow gets a call only when a step changes
            self._tags = tags
            tracker.set_tags(tags)

    def summary(self) -> dict:
        return asdict(self.result)

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run stops early and marks its best file as if
        it had never stopped."""
        return {"points": [list(p) for p in self.points], "files": {str(s): f for s, f in self.files.items()}}

    def restore(self, state: dict | None, upto: int) -> None:
        """Back to `state` (from `state()`), keeping what happened up to step `upto`."""
        state = state or {}
        self.points = [(int(s), float(v)) for s, v in state.get("points", []) if int(s) <= upto]
        self.files = {int(s): f for s, f in state.get("files", {}).items() if int(s) <= upto}
