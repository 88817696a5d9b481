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


@pytest.mark.ray
@pytest.mark.slow
def test_demo_command_trains_the_tiny_model_and_writes_a_lora(tmp_path):
    """The demo's job step, as written, on a local Ray cluster it starts itself (HOME is a temp dir)."""
    demo = _commands()[0]
    job = demo.split("&&")[-1].strip().replace(".venv/bin/python", sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    r = subprocess.run(job, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    loras = [p for p in (tmp_path / "fluxray" / "loras").glob("pxco-*.safetensors") if ".kohya." not in p.name]
    assert len(loras) == 1
    assert "step 40/40" in r.stdout + r.stderr
