"""Is it done? The plateaus of the fixed-noise validation loss and of the likeness score, the best
saved step, early stop.

The guide: "when quality stops improving, it's done". Where the previews are scored for likeness
(`validation.embedding_model`), quality is the likeness: the run is done once it stops rising, and
its best file is the one whose previews look most like the subject; the validation loss is watched
beside it. Without a likeness score the validation loss decides. `plateau_step`, `best_checkpoint`
and `convergence` are pure functions of `(step, value)` points; `ConvergenceWatch` is the little
state the training loop keeps to log them and to stop early.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Convergence:
    """What the validation curve (and the likeness curve, where scored) says so far."""

    converged_step: int | None  # the deciding curve's last real improvement, once `patience` points passed without one
    best_step: int | None  # the saved step with the highest likeness, or else the lowest validation loss
    best_val_loss: float | None
    message: str
    val_plateau_step: int | None = None  # the validation loss's own plateau
    likeness_plateau_step: int | None = None  # the likeness score's own plateau
    best_likeness: float | None = None


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


def likeness_plateau_step(points: list[tuple[int, float]], patience: int = 5, min_delta: float = 0.01) -> int | None:
    """`plateau_step` of a likeness curve (higher is better), on the cosine distance 1 - likeness: on
    the negated score a relative drop would count a fall as progress. `min_delta` is relative to that
    distance, the way left to a perfect match."""
    return plateau_step([(s, 1.0 - v) for s, v in points], patience, min_delta)


def best_checkpoint(points: list[tuple[int, float]], saved_steps,
                    higher_is_better: bool = False) -> tuple[int, float] | None:
    """(step, value) of the saved step with the lowest value (validation loss), or the highest
    (likeness); the earliest of a tie."""
    saved = set(saved_steps)
    candidates = [(-v if higher_is_better else v, s) for s, v in points if s in saved]
    if not candidates:
        return None
    v, s = min(candidates)
    return s, -v if higher_is_better else v


def convergence(points: list[tuple[int, float]], saved_steps=(), patience: int = 5,
                min_delta: float = 0.01, likeness: list[tuple[int, float]] = ()) -> Convergence:
    """The plateaus and the best checkpoint, with the sentence the job page shows.

    `points` are (step, validation loss), `likeness` (step, likeness score) where previews are scored:
    then the likeness decides when the run is done and which file is best.
    """
    val_plateau = plateau_step(points, patience, min_delta)
    best_val = best_checkpoint(points, saved_steps)
    if not likeness:
        if not points:
            text = "no validation loss yet"
        elif val_plateau is None:
            text = f"still improving at step {points[-1][0]}"
        elif val_plateau == points[0][0]:
            text = (f"no improvement of the validation loss since step {val_plateau}: the LoRA is not learning "
                    "(is train.lr too low?)")
        else:
            text = (f"likely converged at step {val_plateau}: the validation loss has improved less than "
                    f"{min_delta:.0%} over the {patience} validations since")
        if best_val:
            text += f"; best checkpoint: step {best_val[0]} (val loss {best_val[1]:.4f})"
        return Convergence(val_plateau, best_val[0] if best_val else None, best_val[1] if best_val else None, text,
                           val_plateau_step=val_plateau)
    plateau = likeness_plateau_step(likeness, patience, min_delta)
    best = best_checkpoint(likeness, saved_steps, higher_is_better=True)
    if plateau is None:
        text = f"the likeness still rises at step {likeness[-1][0]}"
    elif plateau == likeness[0][0]:
        text = (f"no likeness gained since step {plateau}: the LoRA is not learning the subject "
                "(is train.lr too low?)")
    else:
        text = (f"likely converged at step {plateau}: the likeness has not risen by {min_delta:.0%} of the way "
                f"left to a perfect match over the {patience} previews since")
    if points:
        text += "; the validation loss " + ("still improves" if val_plateau is None else
                                            f"flattened at step {val_plateau}")
    if best:
        text += f"; best checkpoint: step {best[0]} (likeness {best[1]:.2f})"
    best_loss = dict(points).get(best[0]) if best else None
    return Convergence(plateau, best[0] if best else None, best_loss, text, val_plateau_step=val_plateau,
                       likeness_plateau_step=plateau, best_likeness=best[1] if best else None)


def read_val_points(records: list[dict]) -> list[tuple[int, float]]:
    """(step, val_loss) from metrics.jsonl records; a step logged twice keeps its last value."""
    by_step = {int(r["step"]): float(r["val_loss"]) for r in records if "val_loss" in r}
    return sorted(by_step.items())


class ConvergenceWatch:
    """The loop's view of the curves: fed every validation (on every rank), every likeness score
    (rank 0, which renders or receives the previews) and every saved file; logs changes to the
    tracker on rank 0. Rank 0's `converged` is what every rank stops on."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.points: list[tuple[int, float]] = []
        self.likeness: list[tuple[int, float]] = []
        self.files: dict[int, str] = {}
        self._status: dict | None = None
        self._tags: dict | None = None

    @property
    def result(self) -> Convergence:
        return convergence(self.points, self.files, self.patience, self.min_delta, self.likeness)

    @property
    def converged(self) -> bool:
        return self.result.converged_step is not None

    def add(self, step: int, val_loss: float, tracker=None) -> None:
        self.points = _put(self.points, step, val_loss)
        self._log(tracker)

    def add_likeness(self, step: int, value: float, tracker=None) -> None:
        self.likeness = _put(self.likeness, step, value)
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
        if self.likeness:
            status.update(val_plateau_step=r.val_plateau_step, likeness_plateau_step=r.likeness_plateau_step)
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
        return {"points": [list(p) for p in self.points], "likeness": [list(p) for p in self.likeness],
                "files": {str(s): f for s, f in self.files.items()}}

    def restore(self, state: dict | None, upto: int) -> None:
        """Back to `state` (from `state()`), keeping what happened up to step `upto`."""
        state = state or {}
        self.points = [(int(s), float(v)) for s, v in state.get("points", []) if int(s) <= upto]
        self.likeness = [(int(s), float(v)) for s, v in state.get("likeness", []) if int(s) <= upto]
        self.files = {int(s): f for s, f in state.get("files", {}).items() if int(s) <= upto}


def _put(points: list[tuple[int, float]], step: int, value: float) -> list[tuple[int, float]]:
    """`points` with step's value replaced (a step validated again after a resume), in step order."""
    return sorted([p for p in points if p[0] != step] + [(step, value)])
