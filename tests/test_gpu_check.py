"""``benchmarks/gpu_check.sh`` in its CPU mode (slam_tiny): every part runs and the JSON says so; and
the check's own machinery (deadline, child time limits, the largest-batch search, the peak for MFU,
the preflight) on the CPU."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import gpu_check  # noqa: E402

HEADLINE = ("bench_pretraining", "bench_compiled", "fairseq_train")
LATER = ("curves", "profile", "host_syncs", "quantizer")


def _headline_first(report: dict) -> None:
    keys = list(report)
    assert max(keys.index(key) for key in HEADLINE) < min(keys.index(key) for key in LATER), keys


def test_gpu_check_cpu_smoke_writes_its_json_and_markdown(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    process = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    # only the report: the synthetic data went to a temporary directory
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["preset"] == "slam_tiny" and "running" not in report and report["wall_s"] > 0
    _headline_first(report)
    assert report["peak_tflops"] == pytest.approx(0.08) and "nominal CPU" in report["peak_tflops_source"]
    assert list(report["fairseq_train"]) == ["fairseq-train fp32", "slam-fairseq-train --bf16"]
    for run in report["fairseq_train"].values():
        assert run["returncode"] == 0 and run["updates_per_s"] > 0 and run["peak_rss_mib"] > 0, run
        assert run["last_loss"] == run["last_loss"], run  # not NaN
    assert report["bench_pretraining"]["ratio"] > 0, report["bench_pretraining"]
    ops = re.search(r"per update \(views and detaches left out\): ours ([0-9,]+), stock ([0-9,]+)",
                    report["bench_pretraining"]["output"])
    assert ops and all(int(count.replace(",", "")) > 500 for count in ops.groups()), report["bench_pretraining"]
    figures = report["bench_pretraining"]["figures"]
    assert figures["peak_tflops"] == report["peak_tflops"]
    for side in ("ours", "stock"):  # each side's own peak: what it holds plus its update's share
        assert figures[f"{side}_held_mib"] > 0, figures
        assert figures[f"{side}_own_peak_mib"] == pytest.approx(figures[f"{side}_held_mib"] + figures[f"{side}_step_mib"])
    assert "own peak" in report["bench_pretraining"]["output"]
    for name in ("plain", "checkpoint_activations"):
        assert report["largest_batch"][name]["largest_batch"] >= 1, report["largest_batch"]
    assert "math" in report["sdpa_kernels"]["padding"] and "math" in report["sdpa_kernels"]["no_padding"]
    curves = report["curves"]
    assert curves["returncode"] == 0 and set(curves["growth_batch"]) == {"ours", "stock"}, curves
    assert curves["output"].count("\nbatch ") == 3 and curves["output"].count("\nlength ") == 3, curves["output"]
    assert len(curves["figures"]["curves"]) == 6, curves["figures"]
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


def test_a_part_that_breaks_the_cuda_context_hands_the_rest_to_a_new_process(tmp_path, monkeypatch):
    """A sticky CUDA error (an illegal memory access) in a part run in the check's own process
    fails every later CUDA call there, emptying the cache included: the check runs the remaining
    parts in a new process instead. Here (on the CPU, stood in for) the SDPA part raises and the
    cache release after it raises too; the parts after it would raise in this process. The new
    process is a real, unpatched one, which runs them into the same report."""
    broke = []

    def sdpa_breaking_the_context(*args, **kwargs):
        broke.append(True)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def release(cuda):
        if broke:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (empty_cache)")

    def not_here(*args, **kwargs):
        raise AssertionError("ran in the process whose context is broken")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(gpu_check, "sdpa_kernels", sdpa_breaking_the_context)
    monkeypatch.setattr(gpu_check, "release_memory", release)
    for name in ("largest_batch", "profile_update", "host_syncs"):
        monkeypatch.setattr(gpu_check, name, not_here)
    monkeypatch.chdir(tmp_path)
    report = gpu_check.main(["out", "--cpu-smoke", "--deadline-seconds", "280"])
    out = tmp_path / "out"
    on_disk = json.loads((out / "gpu_check.json").read_text())
    assert on_disk == report and "continuation_error" not in report, report.get("continuation_error")
    assert report["continued"] == ["sdpa_kernels left this process's CUDA context unusable (RuntimeError('CUDA "
                                   "error: an illegal memory access was encountered (empty_cache)')): the parts "
                                   "from largest_batch: plain on ran in a new process"]
    assert "illegal memory access was encountered" in report["sdpa_kernels"]["error"]
    assert report["bench_pretraining"]["ratio"] > 0 and report["fairseq_train"], "the parts before are kept"
    for name in ("plain", "checkpoint_activations"):
        assert report["largest_batch"][name]["largest_batch"] >= 1, report["largest_batch"]
    assert report["curves"]["returncode"] == 0 and "aten::" in report["profile"]["table"]
    assert "count" in report["host_syncs"] and report["quantizer"]["returncode"] == 0
    assert "running" not in report and report["wall_s"] > 0
    assert "continued: sdpa_kernels left" in (out / "gpu_check.md").read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"], "a relative OUT is the caller's"
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]


def test_gpu_check_skips_the_parts_it_has_no_time_for(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    deadline = gpu_check.DEADLINE_MARGIN_S + 1  # one second for every part
    process = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path),
                              "--cpu-smoke", "--deadline-seconds", str(deadline)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert process.returncode == 0, process.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "running" not in report and report["deadline_s"] == deadline
    _headline_first(report)
    results = [report[key] for key in ("bench_pretraining", "bench_compiled", "synthetic_data", "sdpa_kernels",
                                       "fully_sharded", *LATER)]
    results += [*report["fairseq_train"].values(), *report["largest_batch"].values()]
    assert all(result["note"].startswith("skipped: ") for result in results), results
    assert "skipped: " in (tmp_path / "gpu_check.md").read_text()


def test_parts_run_in_order_within_the_deadline_and_say_which_runs():
    report: dict = {}
    saved = []
    given = {}

    def first(seconds: float) -> dict:
        given["first"] = seconds
        return {"ok": True}

    def failing(seconds: float) -> dict:
        raise ValueError("broken part")

    parts = [gpu_check.Part("first", first, needs=1, cap=5, headline=True),
             gpu_check.Part("runs", failing, needs=1, name="second", headline=True),
             gpu_check.Part("third", lambda seconds: {"ran": True}, needs=1e9)]
    gpu_check.run_parts(parts, report, gpu_check.Deadline(100, margin=0), cuda=False,
                        save=lambda: saved.append(json.loads(json.dumps(report))))
    assert given["first"] == 5  # its cap: the time left, less the later headline part's 1 s, is more
    assert report["first"]["ok"] and report["first"]["part_s"] >= 0
    assert "ValueError('broken part')" in report["runs"]["second"]["error"]  # recorded; the rest went on
    assert report["third"]["note"].startswith("skipped: ")
    assert [snapshot.get("running") for snapshot in saved] == ["first", None, "runs: second", None, None]
    assert "first" not in saved[0] and "first" in saved[2]


def test_a_headline_part_leaves_the_later_ones_their_time():
    given = {}
    parts = [gpu_check.Part("a", lambda seconds: given.setdefault("a", seconds), needs=1, headline=True),
             gpu_check.Part("b", lambda seconds: given.setdefault("b", seconds), needs=30, headline=True)]
    deadline = gpu_check.Deadline(100, margin=10)
    deadline.remaining = lambda: 90.0  # a clock that does not move: the arithmetic alone
    gpu_check.run_parts(parts, {}, deadline, cuda=False, save=lambda: None)
    assert given == {"a": 60.0, "b": 90.0}


def test_a_child_past_its_time_is_stopped_and_keeps_what_it_printed():
    record = 'train_inner | {"ups": "2.5", "loss": "7.25"}'
    script = f"import time; print({record!r}, flush=True); time.sleep(60)"
    returncode, stdout, stderr, seconds = gpu_check.run_child([sys.executable, "-c", script], timeout=5)
    assert returncode is None and seconds < 30
    assert gpu_check.training_figures(stdout) == {"updates_per_s": 2.5, "last_loss": 7.25}


def test_largest_batch_search_counts_library_allocation_failures_as_full():
    assert gpu_check.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert gpu_check.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not gpu_check.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    released = []

    def try_batch(batch: int) -> float:
        if batch >= 4:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        return 100.0 * batch

    result = gpu_check.double_until_full(try_batch, 1, 5, lambda: released.append(1))
    assert result["largest_batch"] == 2 and "error" not in result
    assert result["tried"] == [{"batch": 1, "fits": True, "peak_mib": 100}, {"batch": 2, "fits": True, "peak_mib": 200},
                               {"batch": 4, "fits": False}]
    assert len(released) == 3


def test_largest_batch_search_keeps_what_it_tried_before_another_error():
    def try_batch(batch: int) -> float:
        if batch >= 4:
            raise ValueError("a bug, not memory")
        return 1.0

    result = gpu_check.double_until_full(try_batch, 1, 5, lambda: None)
    assert result["largest_batch"] == 2 and [t["batch"] for t in result["tried"]] == [1, 2]
    assert "a bug, not memory" in result["error"]


def test_largest_batch_search_stops_before_a_doubling_that_would_overrun():
    result = gpu_check.double_until_full(lambda batch: 1.0, 1, 5, lambda: None, seconds=0.0)
    assert result["largest_batch"] == 1 and result["stopped"].startswith("out of time")


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                          ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0)])
def test_peak_for_mfu_comes_from_the_device_name(name, tflops):
    peak, source = gpu_check.peak_tflops(None, name)
    assert peak == tflops and name in source


def test_peak_for_mfu_of_an_unknown_device_is_assumed_with_a_note():
    assert gpu_check.peak_tflops(500.0, "NVIDIA H200") == (500.0, "given (--peak-tflops)")
    peak, source = gpu_check.peak_tflops(None, "NVIDIA A100-SXM4-80GB")
    assert peak == 989.0 and "unknown device" in source and "--peak-tflops" in source


def test_report_files_are_replaced_whole(tmp_path):
    (tmp_path / "gpu_check.json").write_text("old")
    gpu_check.write_atomic(tmp_path / "gpu_check.json", "new")
    assert [path.name for path in tmp_path.iterdir()] == ["gpu_check.json"]
    assert (tmp_path / "gpu_check.json").read_text() == "new"


def test_preflight_names_a_missing_package_and_where_to_get_it(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "omegaconf.py").write_text("raise ImportError('no omegaconf on this machine')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow), GPU_CHECK_TIMEOUT="60")
    process = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"),
                              "--cpu-smoke"], capture_output=True, text=True, env=env, timeout=120)
    assert process.returncode == 3, process.stderr[-3000:]
    # fairseq and hydra import omegaconf: all three are named, with the cause
    assert "gpu_check.sh: cannot import fairseq (ImportError: no omegaconf on this machine)" in process.stderr
    assert "omegaconf (ImportError: no omegaconf on this machine)" in process.stderr and ".whl/" in process.stderr
    assert "BENCHMARKS.md" in process.stderr
    assert not (tmp_path / "out").exists()  # stopped before the check started


def test_no_deadline_leaves_every_part_its_cap():
    assert gpu_check.Deadline(None).remaining() == math.inf
    given = {}
    parts = [gpu_check.Part("capped", lambda seconds: given.setdefault("capped", seconds), needs=1, cap=5),
             gpu_check.Part("open", lambda seconds: given.setdefault("open", seconds), needs=1, headline=True)]
    gpu_check.run_parts(parts, {}, gpu_check.Deadline(None), cuda=False, save=lambda: None)
    assert given == {"capped": 5, "open": math.inf}
