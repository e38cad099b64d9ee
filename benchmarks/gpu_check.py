"""The prepared GPU check (run by ``benchmarks/gpu_check.sh``): JSON + markdown into an output dir.

Parts, each timed and each allowed to fail on its own (the failure is recorded, the rest runs):

1. pre-training of the preset on synthetic data (``make_synthetic_data.py``), stage 2 from the
   first update: ``slam-fairseq-train --bf16`` (fairseq 0.12's own ``fairseq-train --bf16`` looks
   for a TPU; the launcher trains in bf16 on the GPU or CPU) and ``fairseq-train --fp16`` (on CPU:
   ``fairseq-train`` in fp32, as ``--fp16`` asserts CUDA, and the launcher's bf16): updates/s from
   the last ``train_inner`` record, peak memory (``peak_rss.py``: VmHWM, CUDA max allocated);
2. ours against stock fairseq at equal size (``bench_pretraining.py``): updates/s, MFU, peak memory;
3. the largest batch that fits, with and without ``--checkpoint-activations``: the real
   ``train_step`` on in-memory batches, doubling the batch until out of memory (bounded);
4. which SDPA kernel our attention can use, with and without padding: each backend alone under
   ``torch.nn.attention.sdpa_kernel``, the ones that run are listed;
5. the cost curves over batch size (x1, x2, x4) and utterance length (x0.5, x1, x2) from a batch
   of 4 utterances, 16 sentences and 4 pairs (``bench_pretraining.py --curves``), ours and stock;
6. a ``torch.profiler`` table of one update of ours (the operators with the most self time on the
   device, or on the CPU without one) and the number of kernels it launches;
7. a 1-GPU ``slam-fairseq-train --ddp-backend fully_sharded --fp16`` run (fairseq's FSDP refuses
   bf16; the launcher gives the one process the process group fairscale needs); skipped, with a
   note, without fairscale or CUDA;
8. on CUDA, ``bench_pretraining.py`` again with ``--compile-layers`` (``torch.compile`` of each
   Conformer layer), in a subprocess under its own time limit;
9. the MSM quantizer alone, ours against fairseq's ``GumbelVectorQuantizer`` at ``slam_paper``'s
   size (``bench_quantizer.py``, bf16 autocast on CUDA): time and peak memory;
10. the host syncs of one update of ours with pair CTC (``host_syncs.py``): on CUDA the calls that
   ``torch.cuda.set_sync_debug_mode("warn")`` reports, on the CPU the dispatcher count on the
   paths an accelerator takes (``sync_free_paths``).

The JSON and the markdown are rewritten after every part, so a run stopped by the time limit still
leaves what it measured.

    GPU_CHECK_PRESET=slam_paper bash benchmarks/gpu_check.sh OUT_DIR      # on one H100/H200
    bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke                        # slam_tiny on CPU (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))


def _child_env() -> Dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the plugin and its packages)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))


def _fairseq_train(data_dir: Path, preset: str, precision: Optional[str], updates: int, max_tokens: int,
                   device: str, extra: List[str], timeout: int, program: str = "train") -> Dict[str, object]:
    """One training run through peak_rss.py (``program``: ``train`` for ``fairseq-train``, ``launch``
    for ``slam-fairseq-train``); its speed and memory."""
    command = [sys.executable, str(BENCHMARKS / "peak_rss.py"), program, str(data_dir),
               "--user-dir", str(REPO_ROOT / "slam_fairseq"), "--task", "slam_pretraining",
               "--criterion", "slam_multitask", "--arch", preset, "--stage2-start-update", "0",
               "--max-update", str(updates), "--max-tokens", str(max_tokens), "--optimizer", "adam",
               "--lr", "1e-4", "--clip-norm", "10", "--seed", "1", "--num-workers", "0",
               "--required-batch-size-multiple", "1", "--log-format", "json", "--log-interval",
               str(max(1, updates // 4)), "--no-progress-bar", "--no-save", "--disable-validation", *extra]
    if precision:
        command.append(f"--{precision}")
    if device == "cpu":
        command.append("--cpu")
    env = _child_env()
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO_ROOT), env=env, timeout=timeout)
    output = process.stdout + process.stderr
    result: Dict[str, object] = {"returncode": process.returncode, "wall_s": round(time.perf_counter() - start, 1),
                                 "command": " ".join(command[1:])}
    records = [json.loads(match) for match in re.findall(r"train_inner\W+(\{.*\})", output)]
    if records:
        result["updates_per_s"] = float(records[-1]["ups"])
        result["last_loss"] = float(records[-1]["loss"])
    for pattern, key in ((r"peak RSS: (\d+) MiB", "peak_rss_mib"), (r"peak CUDA memory: (\d+) MiB", "peak_cuda_mib")):
        match = re.search(pattern, output)
        if match:
            result[key] = int(match.group(1))
    if process.returncode != 0:
        result["error"] = output[-1500:]
    return result


def _bench_in_process(bench_args: List[str], module: str = "bench_pretraining") -> Dict[str, object]:
    """``main`` of a benchmark script (``module``) here; its printed lines, ratio and growth slopes."""
    bench = importlib.import_module(module)

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            ratio = bench.main(bench_args)
        result: Dict[str, object] = {"returncode": 0, "ratio": ratio}
    except Exception as error:  # recorded, the other parts still run
        result = {"returncode": 1, "ratio": None, "error": repr(error)[:1500]}
    result["output"] = captured.getvalue()
    for kind, ours, stock in re.findall(r"growth over (\w+) \(log-log slope, 1 = linear\): ours ([-0-9.]+), "
                                        r"stock ([-0-9.]+)", result["output"]):
        result[f"growth_{kind}"] = {"ours": float(ours), "stock": float(stock)}
    return result


def _bench_subprocess(bench_args: List[str], timeout: int) -> Dict[str, object]:
    """``bench_pretraining.py`` in a child process (a ``torch.compile`` run can be stopped there)."""
    command = [sys.executable, str(BENCHMARKS / "bench_pretraining.py"), *bench_args]
    env = _child_env()
    try:
        process = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO_ROOT), env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "error": f"stopped after {timeout} s"}
    ratio = re.search(r"ratio ours/stock: ([0-9.]+)", process.stdout)
    lines = [line for line in process.stdout.splitlines() if not line.startswith(("INFO", "WARNING"))]
    result: Dict[str, object] = {"returncode": process.returncode, "ratio": float(ratio.group(1)) if ratio else None,
                                 "output": "\n".join(lines[-8:])}
    if process.returncode != 0:
        result["error"] = process.stderr[-1500:]
    return result


def _recorded(part: Callable[[], object]) -> object:
    """``part()``, or its failure recorded (the other parts still run)."""
    try:
        return part()
    except Exception as error:
        return {"error": repr(error)[:500]}


def _warm_update(preset: str, device, dtype: str, batch: int, frames: int, warmups: int, extra: List[str] = ()):
    """Our update for ``preset`` (``bench_pretraining``'s, with ``extra`` flags) and its sample,
    after ``warmups`` updates."""
    import bench_pretraining as bench

    args = bench.parse_args(["--arch", preset, "--device", str(device), "--dtype", dtype, "--frames", str(frames),
                             *extra])
    update = bench.build_ours(args, device)
    sample = _batch(update, batch, frames, 128 if frames > 400 else 12, device, dtype)
    for _ in range(warmups):
        update(sample)
    return update, sample


def _batch(update, batch: int, frames: int, tokens: int, device, dtype: str):
    """An in-memory stage-2 sample: ``batch`` rows of speech and of pairs, twice as many texts."""
    import bench_pretraining as bench

    return bench.device_sample(update, {"speech": batch, "text": 2 * batch, "pair": batch}, frames, tokens, 0.2,
                               device, dtype)


def profile_update(preset: str, device, dtype: str, batch: int, frames: int, rows: int = 15) -> Dict[str, object]:
    """``torch.profiler`` over one update of ours after two warm-up updates: the ``rows`` operators
    with the most self time on the device (CPU without one), and the kernels launched."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    update, sample = _warm_update(preset, device, dtype, batch, frames, warmups=2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as profiler:
        update(sample)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = profiler.key_averages()
    kernels = sum(1 for event in profiler.events() if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)
    del update
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"batch": batch, "frames": frames, "sorted_by": sort_by, "kernels_launched": kernels, "table": table}


def host_syncs(preset: str, device, dtype: str, batch: int, frames: int) -> Dict[str, object]:
    """The syncs of one ``train_step`` of ours with pair CTC, after a warm-up update: CUDA's own
    report on a GPU, the dispatcher count on the accelerator paths elsewhere."""
    import torch

    from host_syncs import SyncCounter, cuda_sync_warnings
    from slam_fairseq.modules.padding import sync_free_paths

    update, sample = _warm_update(preset, device, dtype, batch, frames, warmups=1, extra=["--pair-ctc"])

    def step() -> None:
        update.optimizer.zero_grad()
        autocast = torch.autocast(device.type, dtype=update.dtype) if update.dtype else contextlib.nullcontext()
        with autocast:
            update.task.train_step(sample, update.model, update.criterion, update.optimizer, update_num=0)

    if device.type == "cuda":
        torch.cuda.synchronize()
        messages = cuda_sync_warnings(step)
        result = {"how": "torch.cuda.set_sync_debug_mode('warn')", "count": len(messages),
                  "calls": dict(Counter(messages))}
    else:
        with sync_free_paths(), SyncCounter() as counter:
            step()
        result = {"how": "ATen dispatcher count on the accelerator paths (sync_free_paths)",
                  "count": counter.total, "calls": dict(counter.counts)}
    del update
    return result


def largest_batch(preset: str, device, dtype: str, checkpoint_activations: bool, start: int,
                  doublings: int, frames: int) -> Dict[str, object]:
    """Double the batch of each modality from ``start`` while a train_step fits (at most ``doublings``)."""
    import torch

    import bench_pretraining as bench

    fits, tried = 0, []
    args = bench.parse_args(["--arch", preset, "--device", str(device), "--dtype", dtype, "--frames", str(frames)])
    update = bench.build_ours(args, device, checkpoint_activations=checkpoint_activations)
    for step in range(doublings + 1):
        batch = start * 2 ** step
        sample = None
        try:
            sample = _batch(update, batch, frames, args.tokens, device, dtype)
            peak = bench.measure_peak_mib(lambda: update(sample), device)
            tried.append({"batch": batch, "fits": True, "peak_mib": round(peak)})
            fits = batch
        except torch.cuda.OutOfMemoryError:
            tried.append({"batch": batch, "fits": False})
            break
        finally:
            sample = None
            update.optimizer.zero_grad()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del update
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"largest_batch": fits, "frames": frames, "bounded_at": start * 2 ** doublings, "tried": tried}


def sdpa_kernels(preset: str, device, dtype: str) -> Dict[str, object]:
    """Which SDPA backends run our attention call, with no padding (known on the host, as the
    collaters' ``lengths_on_host`` tell it: mask None) and with padding (additive float mask)."""
    import argparse as _argparse

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fairseq.models import ARCH_CONFIG_REGISTRY

    import slam_fairseq  # noqa: F401
    from slam_fairseq.modules.attention import RotarySelfAttention, attention_bias

    sizes = _argparse.Namespace()
    ARCH_CONFIG_REGISTRY[preset](sizes)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    attention = RotarySelfAttention(sizes.encoder_embed_dim, sizes.encoder_attention_heads).to(device, torch_dtype)
    x = torch.randn(4, 256, sizes.encoder_embed_dim, device=device, dtype=torch_dtype)
    results: Dict[str, object] = {}
    for case, lengths in (("no_padding", [256, 256, 256, 256]), ("padding", [256, 200, 150, 100])):
        padding = torch.arange(256, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
        usable = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]), torch.no_grad():
                    attention(x, padding, attention_bias(padding, padded=min(lengths) < 256))
                usable.append(backend.name.lower())
            except RuntimeError:
                pass
        results[case] = usable
    return results


def _save(out_dir: Path, report: Dict[str, object]) -> None:
    """Write the JSON and the markdown after every part, so that a run stopped by the time limit
    still leaves what it measured."""
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out_dir / "gpu_check.md").write_text(_markdown(report), encoding="utf-8")


def _run_note(run: Dict[str, object]) -> str:
    """The note of a run, or for a failed one the last line of its output naming an error."""
    if not run.get("returncode"):
        return str(run.get("note", ""))
    lines = str(run.get("error", "")).strip().splitlines()
    errors = [line for line in lines if "Error" in line] or lines or [""]
    return "failed: " + errors[-1].strip()[:200]


def _markdown(report: Dict[str, object]) -> str:
    wall = f"{report['wall_s']} s in all" if "wall_s" in report else "incomplete (stopped before the last part)"
    lines = [f"# GPU check: {report['preset']} on {report['device_name']}", "",
             f"torch {report['torch']}, {report['when']}, {wall}", ""]
    lines += ["## training runs (synthetic data, stage 2)", "",
              "| run | updates/s | peak CUDA MiB | peak RSS MiB | note |", "| --- | --- | --- | --- | --- |"]
    for name, run in report.get("fairseq_train", {}).items():
        lines.append(f"| {name} | {run.get('updates_per_s', '-')} | {run.get('peak_cuda_mib', '-')} | "
                     f"{run.get('peak_rss_mib', '-')} | {_run_note(run)} |")
    for title, key in (("ours against stock fairseq (bench_pretraining.py)", "bench_pretraining"),
                       ("the same with --compile-layers", "bench_compiled"),
                       ("seconds per update over batch size and utterance length (--curves)", "curves"),
                       ("the MSM quantizer, ours against fairseq's (bench_quantizer.py)", "quantizer")):
        if key in report:
            bench = report[key]
            text = bench.get("output", "").strip() or str(bench.get("error", bench.get("note", "")))
            lines += ["", f"## {title}", "", "```", text, "```"]
    if "largest_batch" in report:
        lines += ["", "## largest batch (bounded doubling; rows per modality, text twice)", ""]
        for name, result in report["largest_batch"].items():
            lines.append(f"- {name}: {result.get('largest_batch', result.get('error', '-'))} "
                         f"(of {result.get('frames', '-')} frames; bounded at {result.get('bounded_at', '-')}; "
                         f"peak MiB by batch: {[(t['batch'], t.get('peak_mib', 'OOM')) for t in result.get('tried', [])]})")
    if "profile" in report:
        result = report["profile"]
        lines += ["", "## one update of ours under torch.profiler", ""]
        if "table" in result:
            lines += [f"batch {result['batch']} x {result['frames']} frames, sorted by {result['sorted_by']}, "
                      f"{result['kernels_launched']} device kernels launched", "", "```", result["table"].rstrip(), "```"]
        else:
            lines.append(str(result.get("error")))
    if "host_syncs" in report:
        result = report["host_syncs"]
        lines += ["", "## host syncs of one update of ours (pair CTC)", ""]
        lines.append(f"{result['count']} ({result['how']}): {result['calls']}" if "count" in result else
                     str(result.get("error")))
    if "sdpa_kernels" in report:
        lines += ["", "## SDPA kernels our attention can use", ""]
        for case, usable in report["sdpa_kernels"].items():
            lines.append(f"- {case}: {usable}")
    if "fully_sharded" in report:
        run = report["fully_sharded"]
        lines += ["", "## fully_sharded (1 GPU)", ""]
        lines.append(str(run) if not isinstance(run, dict) else
                     f"updates/s {run.get('updates_per_s', '-')}, peak CUDA {run.get('peak_cuda_mib', '-')} MiB; "
                     f"{_run_note(run) or 'ok'}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cpu-smoke", action="store_true", help="slam_tiny on CPU, seconds per part (CI)")
    parser.add_argument("--preset", default=os.environ.get("GPU_CHECK_PRESET", "slam_paper"))
    parser.add_argument("--updates", type=int, default=40, help="updates per fairseq-train run")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--compile-timeout", type=int, default=150, help="seconds for the --compile-layers benchmark")
    args = parser.parse_args(argv)
    import torch

    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if args.cpu_smoke:
        args.preset, args.updates = "slam_tiny", 3
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bf16" if cuda else "fp32"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report: Dict[str, object] = {
        "preset": args.preset, "device_name": torch.cuda.get_device_name() if cuda else "CPU (smoke)",
        "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    import make_synthetic_data

    data_dir = args.out_dir / "synthetic_data"
    if not (data_dir / "config.yaml").is_file():
        small = args.cpu_smoke
        make_synthetic_data.build(data_dir, 8 if small else 256, 8 if small else 256, 32 if small else 2048,
                                  100 if small else 400, 300 if small else 1600, 100 if small else 8000)
    max_tokens = 2000 if args.cpu_smoke else 40000
    # (label, precision flag, program): fairseq-train's --bf16 means a TPU in fairseq 0.12
    runs = ([("slam-fairseq-train --bf16", "bf16", "launch"), ("fairseq-train --fp16", "fp16", "train")] if cuda else
            [("fairseq-train fp32", None, "train"), ("slam-fairseq-train --bf16", "bf16", "launch")])
    report["fairseq_train"] = {}
    for label, precision, program in runs:
        run = _fairseq_train(data_dir, args.preset, precision, args.updates, max_tokens, device.type, [],
                             timeout=900, program=program)
        if not cuda:
            run["note"] = "on CPU (fairseq's --fp16 needs CUDA)"
        report["fairseq_train"][label] = run
        _save(args.out_dir, report)

    bench_args = (["--smoke", "--threads", "1"] if args.cpu_smoke else
                  ["--arch", args.preset, "--device", "cuda", "--dtype", "bf16", "--peak-tflops", str(args.peak_tflops),
                   "--batch-speech", "16", "--batch-text", "64", "--batch-pair", "16", "--frames", "1600",
                   "--tokens", "128", "--repeats", "5"])
    report["bench_pretraining"] = _bench_in_process(bench_args)
    _save(args.out_dir, report)
    report["largest_batch"] = {}
    for checkpointing in (False, True):
        name = "checkpoint_activations" if checkpointing else "plain"
        report["largest_batch"][name] = _recorded(lambda: largest_batch(
            args.preset, device, dtype, checkpointing, start=1 if args.cpu_smoke else 8,
            doublings=1 if args.cpu_smoke else 5, frames=150 if args.cpu_smoke else 1600))
        _save(args.out_dir, report)
    report["sdpa_kernels"] = _recorded(lambda: sdpa_kernels(args.preset, device, dtype))
    _save(args.out_dir, report)
    report["host_syncs"] = _recorded(lambda: host_syncs(args.preset, device, dtype, batch=2 if args.cpu_smoke else 8,
                                                        frames=150 if args.cpu_smoke else 1600))
    _save(args.out_dir, report)
    report["profile"] = _recorded(lambda: profile_update(args.preset, device, dtype, batch=2 if args.cpu_smoke else 16,
                                                         frames=150 if args.cpu_smoke else 1600))
    _save(args.out_dir, report)
    curve_args = (["--smoke", "--threads", "1", "--curves"] if args.cpu_smoke else
                  ["--arch", args.preset, "--device", "cuda", "--dtype", "bf16", "--peak-tflops", str(args.peak_tflops),
                   "--batch-speech", "4", "--batch-text", "16", "--batch-pair", "4", "--frames", "1600",
                   "--tokens", "128", "--repeats", "4", "--curves"])
    report["curves"] = _bench_in_process(curve_args)
    _save(args.out_dir, report)
    if not cuda:
        report["fully_sharded"] = "skipped: needs CUDA"
    elif importlib.util.find_spec("fairscale") is None:
        report["fully_sharded"] = "skipped: fairscale is not installed (fairseq 0.12's fully_sharded needs it)"
    else:
        report["fully_sharded"] = _fairseq_train(
            data_dir, args.preset, "fp16", max(8, args.updates // 4), max_tokens, "cuda",
            ["--ddp-backend", "fully_sharded"], timeout=600, program="launch")
    _save(args.out_dir, report)
    quantizer_args = (["--frames", "40", "--input-dim", "16", "--codes", "32", "--codevector-dim", "16",
                       "--repeats", "2", "--threads", "1"] if args.cpu_smoke else
                      ["--device", "cuda", "--dtype", "bf16", "--frames", "6000"])
    report["quantizer"] = _bench_in_process(quantizer_args, module="bench_quantizer")
    _save(args.out_dir, report)
    if cuda:
        report["bench_compiled"] = _bench_subprocess([*bench_args, "--compile-layers"], timeout=args.compile_timeout)
    else:
        report["bench_compiled"] = {"note": "skipped on CPU (inductor's C++ build takes minutes)"}
    report["wall_s"] = round(time.perf_counter() - start, 1)
    _save(args.out_dir, report)
    print(f"gpu check written to {args.out_dir}/gpu_check.json and gpu_check.md ({report['wall_s']} s)")
    return report


if __name__ == "__main__":
    main()
