"""The benchmark script runs to the end in its reduced mode (it asserts no speed, only that it works)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
@pytest.mark.slow
def test_benchmarks_run_to_the_end_in_quick_mode(ray_cluster, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--out", str(out),
                        "--address", ray_cluster.address, "--dashboard", ray_cluster.dashboard_url],
                       cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out.read_text())
    assert res["a"]["overhead_ratio"] > 0 and res["b"]["speedup"] > 0
    assert len(res["c"]["zero3_fraction"]) == 2
    assert res["d"]["submit_to_first_step_s"] > 0
    assert 0 < res["e"]["sample_share"] < 1
    _check_f(res["f"])


def _check_f(f: dict) -> None:
    # Without a GPU, (f)'s measurement runs on the tiny transformer on CPU instead: every base, every setting.
    f = f["cpu_dry_run"] if "skipped" in f else f
    for base in ("none", "int8", "nf4"):
        runs = {k: v for k, v in f[base].items() if k[0].isdigit()}
        assert runs and all(r["s_per_step"] > 0 and r["tflop_per_step"] > 0 and r["plan_gib"] > 0
                            for r in runs.values()), f
        assert any(k.endswith("+ckpt") for k in runs), f


@pytest.mark.slow
def test_the_gpu_benchmark_needs_neither_ray_nor_deepspeed(tmp_path):
    """(f) is for a bare GPU box: run it where importing Ray or DeepSpeed fails, as if not installed."""
    hide = 'import sys\nsys.modules["ray"] = None\nsys.modules["deepspeed"] = None\n'
    (tmp_path / "sitecustomize.py").write_text(hide)
    out = tmp_path / "f.json"
    bench = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "f", "--out", str(out)]
    r = subprocess.run(bench, cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    _check_f(json.loads(out.read_text())["f"])
