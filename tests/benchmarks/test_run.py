"""The benchmark script runs to the end in its reduced mode (it asserts no speed, only that it works)."""

import json
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
    # Without a GPU, (f)'s measurement runs on the tiny transformer on CPU instead.
    f = res["f"]["cpu_dry_run"] if "skipped" in res["f"] else res["f"]
    assert all(f[r]["s_per_step"] > 0 and f[r]["tflop_per_step"] > 0 for r in f if r.isdigit()), f
    assert any(r.isdigit() for r in f), f
