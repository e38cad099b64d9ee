"""``benchmarks/gpu_check.sh`` in its CPU mode (slam_tiny): every part runs and the JSON says so."""
from __future__ import annotations

import json
import os
import re
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
    assert list(report["fairseq_train"]) == ["fairseq-train fp32", "slam-fairseq-train --bf16"]
    for run in report["fairseq_train"].values():
        assert run["returncode"] == 0 and run["updates_per_s"] > 0 and run["peak_rss_mib"] > 0, run
        assert run["last_loss"] == run["last_loss"], run  # not NaN
    assert report["bench_pretraining"]["ratio"] > 0, report["bench_pretraining"]
    ops = re.search(r"per update \(views and detaches left out\): ours ([0-9,]+), stock ([0-9,]+)",
                    report["bench_pretraining"]["output"])
    assert ops and all(int(count.replace(",", "")) > 500 for count in ops.groups()), report["bench_pretraining"]
    for name in ("plain", "checkpoint_activations"):
        assert report["largest_batch"][name]["largest_batch"] >= 1, report["largest_batch"]
    assert "math" in report["sdpa_kernels"]["padding"] and "math" in report["sdpa_kernels"]["no_padding"]
    curves = report["curves"]
    assert curves["returncode"] == 0 and set(curves["growth_batch"]) == {"ours", "stock"}, curves
    assert curves["output"].count("\nbatch ") == 3 and curves["output"].count("\nlength ") == 3, curves["output"]
    profile = report["profile"]
    assert profile["sorted_by"] == "self_cpu_time_total" and "aten::" in profile["table"], profile
    assert "one update of ours under torch.profiler" in (tmp_path / "gpu_check.md").read_text()
    assert report["fully_sharded"].startswith("skipped")
    assert report["bench_compiled"]["note"].startswith("skipped on CPU"), report["bench_compiled"]
    assert "## SDPA kernels" in (tmp_path / "gpu_check.md").read_text()
    syncs = report["host_syncs"]  # the accelerator paths, counted at the dispatcher on the CPU
    assert syncs["calls"] == {"_ctc_loss": 1, "tolist": 1, "host_data": 1}, syncs
    assert "## host syncs of one update" in (tmp_path / "gpu_check.md").read_text()
    quantizer = report["quantizer"]
    assert quantizer["returncode"] == 0 and quantizer["ratio"] > 0, quantizer
    assert "## the MSM quantizer" in (tmp_path / "gpu_check.md").read_text()
