"""``benchmarks/gpu_check.sh`` in its CPU mode (slam_tiny): every part runs and the JSON says so."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_writes_its_json_and_markdown(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    process = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["preset"] == "slam_tiny"
    run = report["fairseq_train"]["fp32"]
    assert run["returncode"] == 0 and run["updates_per_s"] > 0 and run["peak_rss_mib"] > 0, run
    assert report["bench_pretraining"]["ratio"] > 0, report["bench_pretraining"]
    for name in ("plain", "checkpoint_activations"):
        assert report["largest_batch"][name]["largest_batch"] >= 1, report["largest_batch"]
    assert "math" in report["sdpa_kernels"]["padding"] and "math" in report["sdpa_kernels"]["no_padding"]
    assert report["fully_sharded"].startswith("skipped")
    assert "## SDPA kernels" in (tmp_path / "gpu_check.md").read_text()
