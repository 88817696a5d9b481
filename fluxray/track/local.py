"""The run's own record on disk: metrics.jsonl, preview PNGs and status, under the run folder.

Always written by rank 0, whatever MLflow does: the HTTP API reads job progress from
here, and it is the copy that survives a tracking outage.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

#: A preview file's name: `step000050-sample_0.png`, `step000050-grid.png`.
SAMPLE_FILE = re.compile(r"^step(\d{6,})-([A-Za-z0-9_]+)\.png$")


@dataclass
class RunPaths:
    """Where a run's files live under the storage root: the trainer writes them, the service and the
    tests read them (so the layout is here, below both)."""

    root: Path
    name: str

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.name

    @property
    def final_lora(self) -> Path:
        return self.root / "loras" / f"{self.name}.safetensors"

    def step_lora(self, step: int) -> Path:
        return self.run_dir / "loras" / f"{self.name}-step{step:06d}.safetensors"


class RunRecord:
    """Append-only files in `<storage>/runs/<name>/`: `metrics.jsonl`, `samples/`, `status.json`."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        (self.dir / "samples").mkdir(parents=True, exist_ok=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def sample_path(self, key: str, step: int) -> Path:
        return self.dir / "samples" / f"step{step:06d}-{key}.png"

    def samples(self) -> list[tuple[int, str, Path]]:
        """(step, key, file) of every complete preview image, by step then key."""
        out = []
        for path in sorted((self.dir / "samples").glob("step*.png")):
            m = SAMPLE_FILE.match(path.name)
            if m:
                out.append((int(m.group(1)), m.group(2), path))
        return out

    def save_image(self, image, key: str, step: int) -> Path:
        path = self.sample_path(key, step)
        # Renamed into place: a file at this path is a complete image (resume skips it).
        tmp = path.with_suffix(".tmp")
        image.save(tmp, format="PNG")
        tmp.replace(path)
        return path

    def set_status(self, **fields) -> None:
        path = self.dir / "status.json"
        cur = json.loads(path.read_text()) if path.exists() else {}
        cur.update(fields, updated=time.time())
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cur, indent=1))
        tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every metrics line of a run."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    """Every line of an append-only JSON-lines file; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
