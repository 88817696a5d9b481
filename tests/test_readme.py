"""The README's two commands: CI runs the test one verbatim, and the demo one trains a LoRA."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text(), flags=re.S)[:2]


def test_readme_opens_with_the_demo_and_the_test_command():
    demo, tests = _commands()
    assert "pip install torch==2.13.0" in demo and "jobs/train.py --config configs/tiny.yaml" in demo
    assert "pip install -e \".[dev]\"" in tests and tests.rstrip().endswith("python -m pytest")


def test_ci_runs_exactly_the_readme_test_command_with_an_empty_home():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    steps = [l for l in ci if l.strip() and not l.startswith("#") and not l.startswith(("set ", "cd "))]
    # The one line CI adds: a new empty HOME (short: Ray's socket paths stay under ~107 bytes).
    home, *rest = steps
    assert re.fullmatch(r'export HOME="\$\(mktemp -d /tmp/[\w.]+\)"', home), home
    assert rest == [_commands()[1]]


#: Ray's prefix of a line from one of its processes: `(RayTrainWorker pid=123)`, `(... pid=1, ip=...)`.
RAY_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\) ?")
#: fluxray's own lines, from the driver or a worker: what it does, the progress, advice, the result.
FLUXRAY_LINE = re.compile(
    r"Prepared \d+ images|  (from|to) +/|  content hash |\d+ note\(s\) and problem\(s\):|advice( \(\d+\))?:|"
    r"  (info|warning|error) +\S|  +fix: |run \S+: \d+ steps |previews: |ZeRO stage |precision: |step \d+/\d+ loss |"
    r"LoRA written to |likely converged|still improving|no improvement|done: \d+ steps|admitted: |"
    r"rank \d+/\d+ on node |memory plan: |"
    r"  (LoRA file|previews|MLflow|web page) |(INFO|WARNING|ERROR) fluxray")


@pytest.mark.ray
@pytest.mark.slow
def test_demo_command_trains_quietly_gains_likeness_and_ends_with_what_to_open_next(tmp_path):
    """The demo's job step, as written, on a local Ray cluster it starts itself, in an empty HOME:
    fluxray's own lines and at most 5 others, no traceback, a likeness that rose above the base
    model's, and last the LoRA file, the previews and the MLflow run (finished, with its previews
    and its likeness curve) with the command that opens it."""
    demo = _commands()[0]
    job = demo.split("&&")[-1].strip().replace(".venv/bin/python", sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FLUXRAY_", "MLFLOW_"))}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    r = subprocess.run(job, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
    assert r.returncode == 0, out[-6000:]
    assert "Traceback" not in out, out
    lines = [line for line in (RAY_PREFIX.sub("", line) for line in out.splitlines()) if line.strip()]
    others = [line for line in lines if not FLUXRAY_LINE.match(line)]
    assert len(others) <= 5, "\n".join(others)
    assert any(line.startswith(f"step {STEPS}/{STEPS} loss ") for line in lines)

    # The last lines: what the run made, and how to open it.
    done = max(i for i, line in enumerate(lines) if line.startswith(f"done: {STEPS} steps"))
    end = dict(re.match(r"  (LoRA file|previews|MLflow|web page) +(.+)", line).groups() for line in lines[done + 1:])
    lora = Path(end["LoRA file"])
    assert lora.is_file() and lora.parent == tmp_path / "fluxray" / "loras" and lora.name.startswith("pxco-")
    previews = Path(end["previews"])
    assert sorted(p.name for p in previews.glob("*-grid.png")) == [f"step{s:06d}-grid.png" for s in PREVIEWED]
    assert "fluxray mlflow --config configs/tiny.yaml`" in end["MLflow"]
    assert "fluxray serve --config configs/tiny.yaml`" in end["web page"]
    run_id = re.match(r"run ([0-9a-f]{32}): ", end["MLflow"])[1]
    assert f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}?workflowType=machine_learning" in end["MLflow"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'fluxray' / 'mlflow' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    images = {a.path.split("+")[0] + "@" + a.path.split("+")[2] for a in client.list_artifacts(run_id, "images")}
    assert {f"images/{k}@{s}" for k in ("sample_0", "grid") for s in PREVIEWED} <= images

    # The demo's LoRA moves the previews towards the pxco man: the likeness of some preview step is
    # clearly above the base model's (step 0), as MLflow has it.
    likeness = {m.step: m.value for m in client.get_metric_history(run_id, "sample_similarity")}
    assert sorted(likeness) == list(PREVIEWED)
    assert max(likeness.values()) >= likeness[0] + 0.05, likeness


def test_the_cluster_lines_make_the_ray_token_before_ray_start(tmp_path):
    """Ray 2.60's `ray start --head` refuses to start without a token: on a fresh machine (an
    empty HOME) the documented line before it makes one, and never replaces it."""
    for doc in (REPO / "README.md", REPO / "docs" / "cluster.md"):
        lines = [ln for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S) for ln in block.splitlines()]
        made = next(i for i, ln in enumerate(lines) if ln.startswith("ray get-auth-token --generate"))
        start = next(i for i, ln in enumerate(lines) if "ray start --head" in ln)
        assert made < start, doc
    line = lines[made].split(" #")[0]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(line, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    token = tmp_path / ".ray" / "auth_token"
    assert r.returncode == 0 and r.stdout == "" and token.read_text().strip(), r.stderr
    first = token.read_text()
    assert subprocess.run(line, shell=True, cwd=REPO, env=env, timeout=300).returncode == 0
    assert token.read_text() == first


#: configs/tiny.yaml's train.steps and the steps it previews (sample.every).
STEPS, PREVIEWED = 400, range(0, 401, 25)

