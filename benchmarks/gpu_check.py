"""The prepared GPU check (run by ``benchmarks/gpu_check.sh``): JSON + markdown into an output dir.

Parts, in the order they run, each timed and each allowed to fail on its own (the failure is
recorded, the rest runs); the headline ones (1 to 4) come first:

1. ours against stock fairseq at equal size (``bench_pretraining.py``): updates/s, MFU, peak memory;
2. on CUDA, ``bench_pretraining.py`` again with ``--compile-layers`` (``torch.compile`` of each
   Conformer layer), in a subprocess under its own time limit;
3. synthetic data for the training runs (``make_synthetic_data.py``), in ``--data-dir``;
4. pre-training of the preset on that data, stage 2 from the first update:
   ``slam-fairseq-train --bf16`` (fairseq 0.12's own ``fairseq-train --bf16`` looks for a TPU; the
   launcher trains in bf16 on the GPU or CPU) and ``fairseq-train --fp16`` (on CPU:
   ``fairseq-train`` in fp32, as ``--fp16`` asserts CUDA, and the launcher's bf16): updates/s from
   the last ``train_inner`` record, peak memory (``peak_rss.py``: VmHWM, CUDA max allocated);
5. which SDPA kernel our attention can use, with and without padding: each backend alone under
   ``torch.nn.attention.sdpa_kernel``, the ones that run are listed;
6. the largest batch that fits, with and without ``--checkpoint-activations``: the real
   ``train_step`` on in-memory batches, doubling the batch until out of memory (bounded, and
   stopped early when the next doubling would overrun the part's time);
7. a 1-GPU ``slam-fairseq-train --ddp-backend fully_sharded --fp16`` run (fairseq's FSDP refuses
   bf16; the launcher gives the one process the process group fairscale needs); skipped, with a
   note, without fairscale or CUDA;
8. the cost curves over batch size (x1, x2, x4) and utterance length (x0.5, x1, x2) from a batch
   of 4 utterances, 16 sentences and 4 pairs (``bench_pretraining.py --curves``), ours and stock;
9. a ``torch.profiler`` table of one update of ours (the operators with the most self time on the
   device, or on the CPU without one) and the number of kernels it launches;
10. the host syncs of one update of ours with pair CTC (``host_syncs.py``): on CUDA the calls that
   ``torch.cuda.set_sync_debug_mode("warn")`` reports, on the CPU the dispatcher count on the
   paths an accelerator takes (``sync_free_paths``);
11. the MSM quantizer alone, ours against fairseq's ``GumbelVectorQuantizer`` at ``slam_paper``'s
   size (``bench_quantizer.py``, bf16 autocast on CUDA): time and peak memory.

Time: the deadline is ``--deadline-seconds`` (default: ``GPU_CHECK_TIMEOUT``, the limit the shell
script runs this under) less a margin. Each part gets the smaller of its own cap and what is left
(a headline part: less what the later headline parts need at least); a part with too little time
left is skipped with a note, and a child process that overruns its time is stopped and recorded
as that part's error. Before each part the report says ``"running": <part>``, so a run killed
from outside still tells where it stopped.

A part in this process that fails and leaves its CUDA context unusable (a sticky error: an
illegal memory access, a device-side assert) would fail every later part of the process: the
check then runs the remaining parts in a new process (``--start-part``), on the same data and
deadline, and the report says so under ``continued``.

Memory: after each part in this process its CUDA cache is emptied, and the free and total CUDA
memory is recorded before each part that runs in a child process.

The JSON and the markdown are rewritten (each to a temporary file, then renamed) after every
part; the output dir holds nothing else (the data goes to ``--data-dir``, by default a temporary
directory removed at the end).

    GPU_CHECK_PRESET=slam_paper bash benchmarks/gpu_check.sh OUT_DIR      # on one H100/H200
    bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke                        # slam_tiny on CPU (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

# Kept off the deadline: interpreter start before it is taken, the last writes and the cleanup.
DEADLINE_MARGIN_S = 20.0
# Errors that mean the step did not fit: CUDA's allocator ("CUDA out of memory"), and the
# libraries' own allocations (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED).
OUT_OF_MEMORY_TEXTS = ("out of memory", "ALLOC_FAILED")


# -- time and memory ------------------------------------------------------------------------------
class Deadline:
    """``seconds`` from now less ``margin`` (no deadline when ``seconds`` is None)."""

    def __init__(self, seconds: Optional[float], margin: float = DEADLINE_MARGIN_S) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds - margin

    def remaining(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()


@dataclass
class Part:
    """One part of the check: ``run(seconds)`` gives its result, stored at ``report[key]`` (or
    ``report[key][name]``)."""

    key: str
    run: Callable[[float], object]
    needs: float  # fewer seconds left than this: skipped with a note
    cap: float = math.inf  # the most seconds it is given
    name: Optional[str] = None
    headline: bool = False
    child: bool = False  # runs in a child process

    @property
    def label(self) -> str:
        return self.key if self.name is None else f"{self.key}: {self.name}"


def release_memory(cuda: bool) -> None:
    """Free what this process no longer references, and on CUDA hand its cached blocks back."""
    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def cuda_memory() -> Dict[str, int]:
    """The device's free and total memory and what this process's allocator keeps (MiB)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"free_mib": free // 2 ** 20, "total_mib": total // 2 ** 20,
            "this_process_reserved_mib": torch.cuda.memory_reserved() // 2 ** 20}


def cuda_context_problem(cuda: bool) -> Optional[str]:
    """Why this process can no longer use the GPU, or None: some CUDA errors (an illegal memory
    access, a device-side assert) stay with the process's context, and every later CUDA call of
    the process fails with them."""
    if not cuda:
        return None
    import torch

    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as error:  # the sticky error itself
        return repr(error)[:300]
    return None


def run_parts(parts: List[Part], report: Dict[str, object], deadline: Deadline, cuda: bool,
              save: Callable[[], None], start: int = 0,
              continue_elsewhere: Optional[Callable[[int], None]] = None) -> None:
    """Run ``parts[start:]`` in order into ``report``, calling ``save`` before each and after each.

    When a part run in this process fails and leaves the CUDA context unusable
    (:func:`cuda_context_problem`), the report says so under ``continued`` and
    ``continue_elsewhere(next index)`` runs the rest (in a new process); this returns."""
    for index, part in enumerate(parts):
        if index < start:
            continue
        reserve = sum(later.needs for later in parts[index + 1:] if later.headline) if part.headline else 0.0
        seconds = min(part.cap, deadline.remaining() - reserve)
        result: object = {"note": f"skipped: {max(0.0, seconds):.0f} s left for it, it needs about "
                                  f"{part.needs:.0f} s"}
        problem = None
        if seconds >= part.needs:
            report["running"] = part.label
            save()
            memory = cuda_memory() if cuda and part.child else None
            started = time.perf_counter()
            result = _recorded(lambda: part.run(seconds))
            if isinstance(result, dict) and "error" in result and not part.child:
                problem = cuda_context_problem(cuda)
            if problem is None:  # a broken context cannot even empty its cache
                try:
                    release_memory(cuda)
                except Exception as error:
                    problem = repr(error)[:300]
            if isinstance(result, dict):
                result["part_s"] = round(time.perf_counter() - started, 1)
                if memory is not None:
                    result["cuda_memory_before"] = memory
        if part.name is None:
            report[part.key] = result
        else:
            report.setdefault(part.key, {})[part.name] = result
        report.pop("running", None)
        save()
        if problem is not None and continue_elsewhere is not None and index + 1 < len(parts):
            report.setdefault("continued", []).append(
                f"{part.label} left this process's CUDA context unusable ({problem}): the parts from "
                f"{parts[index + 1].label} on ran in a new process")
            save()
            continue_elsewhere(index + 1)
            return


def _recorded(part: Callable[[], object]) -> object:
    """``part()``, or its failure recorded (the other parts still run)."""
    try:
        return part()
    except Exception as error:
        return {"error": repr(error)[:500]}


# -- child processes ------------------------------------------------------------------------------
def _child_env() -> Dict[str, str]:
    """This environment with the repository first on PYTHONPATH (the plugin and its packages), and
    unbuffered output (a child stopped at its time limit still leaves what it printed)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1")


def _text(output) -> str:
    """Captured output as text (a timed-out run's partial output comes as bytes)."""
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return output or ""


def run_child(command: List[str], timeout: Optional[float],
              cwd: Path = REPO_ROOT) -> Tuple[Optional[int], str, str, float]:
    """``command`` in ``cwd`` (the repository): (return code, None when stopped after ``timeout``
    seconds; stdout; stderr; seconds)."""
    start = time.perf_counter()
    try:
        process = subprocess.run(command, capture_output=True, text=True, cwd=str(cwd), env=_child_env(),
                                 timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        return None, _text(expired.stdout), _text(expired.stderr), time.perf_counter() - start
    return process.returncode, process.stdout, process.stderr, time.perf_counter() - start


def training_figures(output: str) -> Dict[str, object]:
    """Updates/s and loss of the last ``train_inner`` record, and peak_rss.py's memory lines."""
    result: Dict[str, object] = {}
    records = [json.loads(match) for match in re.findall(r"train_inner\W+(\{.*\})", output)]
    if records:
        result["updates_per_s"] = float(records[-1]["ups"])
        result["last_loss"] = float(records[-1]["loss"])
    for pattern, key in ((r"peak RSS: (\d+) MiB", "peak_rss_mib"), (r"peak CUDA memory: (\d+) MiB", "peak_cuda_mib")):
        match = re.search(pattern, output)
        if match:
            result[key] = int(match.group(1))
    return result


def _fairseq_train(data_dir: Path, preset: str, precision: Optional[str], updates: int, max_tokens: int,
                   device: str, extra: List[str], timeout: float, program: str = "train") -> Dict[str, object]:
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
    returncode, stdout, stderr, seconds = run_child(command, timeout)
    output = stdout + stderr
    result: Dict[str, object] = {"returncode": returncode, "wall_s": round(seconds, 1),
                                 "command": " ".join(command[1:]), **training_figures(output)}
    if returncode is None:
        result["error"] = f"stopped after {timeout:.0f} s\n" + output[-1500:]
    elif returncode != 0:
        result["error"] = output[-1500:]
    return result


def _bench_figures(path: Path) -> Dict[str, object]:
    """The figures ``bench_pretraining.py --json`` wrote (empty if it wrote none)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _bench_in_process(bench_args: List[str], module: str = "bench_pretraining",
                      figures: Optional[Path] = None) -> Dict[str, object]:
    """``main`` of a benchmark script (``module``) here; its printed lines, ratio and growth slopes,
    and with ``figures`` (``bench_pretraining``'s ``--json`` file) every figure it measured."""
    bench = importlib.import_module(module)

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            ratio = bench.main([*bench_args, *(["--json", str(figures)] if figures else [])])
        result: Dict[str, object] = {"returncode": 0, "ratio": ratio}
    except Exception as error:  # recorded, the other parts still run
        result = {"returncode": 1, "ratio": None, "error": repr(error)[:1500]}
    result["output"] = captured.getvalue()
    for kind, ours, stock in re.findall(r"growth over (\w+) \(log-log slope, 1 = linear\): ours ([-0-9.]+), "
                                        r"stock ([-0-9.]+)", result["output"]):
        result[f"growth_{kind}"] = {"ours": float(ours), "stock": float(stock)}
    if figures:
        result["figures"] = _bench_figures(figures)
    return result


def _bench_subprocess(bench_args: List[str], timeout: float, figures: Path) -> Dict[str, object]:
    """``bench_pretraining.py`` in a child process (a ``torch.compile`` run can be stopped there)."""
    command = [sys.executable, str(BENCHMARKS / "bench_pretraining.py"), *bench_args, "--json", str(figures)]
    returncode, stdout, stderr, seconds = run_child(command, timeout)
    ratio = re.search(r"ratio ours/stock: ([0-9.]+)", stdout)
    lines = [line for line in stdout.splitlines() if not line.startswith(("INFO", "WARNING"))]
    result: Dict[str, object] = {"returncode": returncode, "ratio": float(ratio.group(1)) if ratio else None,
                                 "wall_s": round(seconds, 1), "output": "\n".join(lines[-8:]),
                                 "figures": _bench_figures(figures)}
    if returncode is None:
        result["error"] = f"stopped after {timeout:.0f} s"
    elif returncode != 0:
        result["error"] = stderr[-1500:]
    return result


# -- in-process parts -----------------------------------------------------------------------------
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
        return {"how": "torch.cuda.set_sync_debug_mode('warn')", "count": len(messages),
                "calls": dict(Counter(messages))}
    with sync_free_paths(), SyncCounter() as counter:
        step()
    return {"how": "ATen dispatcher count on the accelerator paths (sync_free_paths)",
            "count": counter.total, "calls": dict(counter.counts)}


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says that a step did not fit in the device's memory."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_TEXTS)


def double_until_full(try_batch: Callable[[int], float], start: int, doublings: int, release: Callable[[], None],
                      seconds: float = math.inf) -> Dict[str, object]:
    """``try_batch(batch)`` (the peak MiB of a step) for ``start``, twice that, ... (at most
    ``doublings`` times) while it fits and the next try, taken as three times the last one's
    time, ends within ``seconds``; ``release()`` after each try. Another error than running out
    of memory ends the search, recorded beside the batches tried so far."""
    result: Dict[str, object] = {"largest_batch": 0, "bounded_at": start * 2 ** doublings}
    tried: List[Dict[str, object]] = []
    result["tried"] = tried
    began = time.monotonic()
    for step in range(doublings + 1):
        batch = start * 2 ** step
        step_began = time.monotonic()
        peak, error_text = None, None
        try:
            peak = try_batch(batch)
        except Exception as error:
            if not is_out_of_memory(error):
                error_text = repr(error)[:1500]
        release()
        if error_text is not None:
            result["error"] = error_text
            break
        if peak is None:
            tried.append({"batch": batch, "fits": False})
            break
        tried.append({"batch": batch, "fits": True, "peak_mib": round(peak)})
        result["largest_batch"] = batch
        took = time.monotonic() - step_began
        if step < doublings and time.monotonic() - began + 3 * took > seconds:
            result["stopped"] = f"out of time: batch {2 * batch} would need about {3 * took:.0f} s more"
            break
    return result


def largest_batch(preset: str, device, dtype: str, checkpoint_activations: bool, start: int,
                  doublings: int, frames: int, seconds: float = math.inf) -> Dict[str, object]:
    """Double the batch of each modality from ``start`` while a train_step fits (at most
    ``doublings``, within ``seconds``)."""
    import bench_pretraining as bench

    args = bench.parse_args(["--arch", preset, "--device", str(device), "--dtype", dtype, "--frames", str(frames)])
    update = bench.build_ours(args, device, checkpoint_activations=checkpoint_activations)

    def try_batch(batch: int) -> float:
        sample = _batch(update, batch, frames, args.tokens, device, dtype)
        return bench.measure_peak_mib(lambda: update(sample), device)

    def release() -> None:
        update.optimizer.zero_grad()
        release_memory(device.type == "cuda")

    result = double_until_full(try_batch, start, doublings, release, seconds)
    result["frames"] = frames
    return result


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


def peak_tflops(given: Optional[float], device_name: Optional[str]) -> Tuple[float, str]:
    """The peak TFLOP/s that MFU is taken against, and where it comes from: ``given``, else the
    datasheet figure for ``device_name`` (None: the CPU smoke run, one thread)."""
    import bench_pretraining as bench

    if given:
        return given, "given (--peak-tflops)"
    if device_name is None:
        return bench.nominal_cpu_tflops(1), "nominal CPU figure, 1 thread x 32 FLOP/cycle x 2.5 GHz"
    found = bench.datasheet_peak_tflops(device_name)
    if found is not None:
        return found, f"datasheet dense bf16 figure for {device_name}"
    return bench.UNKNOWN_GPU_PEAK_TFLOPS, (f"unknown device {device_name!r}: H100 SXM's dense bf16 figure "
                                           "assumed; give --peak-tflops")


# -- the report -----------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file and a rename (never half written)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _save(out_dir: Path, report: Dict[str, object]) -> None:
    """Write the JSON and the markdown, so that a run stopped by the time limit still leaves what
    it measured."""
    write_atomic(out_dir / "gpu_check.json", json.dumps(report, indent=2))
    write_atomic(out_dir / "gpu_check.md", _markdown(report))


def _run_note(run: Dict[str, object]) -> str:
    """The note of a run, or for a failed one the last line of its output naming an error."""
    if not run.get("returncode") and "error" not in run:
        return str(run.get("note", ""))
    lines = str(run.get("error", "")).strip().splitlines()
    errors = [line for line in lines if "Error" in line or line.startswith("stopped after")] or lines or [""]
    return "failed: " + errors[-1].strip()[:200]


def _markdown(report: Dict[str, object]) -> str:
    if "wall_s" in report:
        wall = f"{report['wall_s']} s in all"
    elif "running" in report:
        wall = f"incomplete: stopped while running {report['running']}"
    else:
        wall = "incomplete (stopped between parts)"
    lines = [f"# GPU check: {report['preset']} on {report['device_name']}", "",
             f"torch {report['torch']}, {report['when']}, {wall}; time budget {report.get('deadline_s', 'none')} s; "
             f"MFU against {report['peak_tflops']} TFLOP/s ({report['peak_tflops_source']})", ""]
    for note in report.get("continued", []):
        lines += [f"continued: {note}", ""]
    if "continuation_error" in report:
        lines += [f"continuation error: {report['continuation_error']}", ""]
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
            ended = result.get("error") or result.get("stopped") or result.get("note") or ""
            lines.append(f"- {name}: {result.get('largest_batch', '-')} "
                         f"(of {result.get('frames', '-')} frames; bounded at {result.get('bounded_at', '-')}; "
                         f"peak MiB by batch: {[(t['batch'], t.get('peak_mib', 'OOM')) for t in result.get('tried', [])]})"
                         + (f"; {ended}" if ended else ""))
    if "profile" in report:
        result = report["profile"]
        lines += ["", "## one update of ours under torch.profiler", ""]
        if "table" in result:
            lines += [f"batch {result['batch']} x {result['frames']} frames, sorted by {result['sorted_by']}, "
                      f"{result['kernels_launched']} device kernels launched", "", "```", result["table"].rstrip(), "```"]
        else:
            lines.append(str(result.get("error", result.get("note"))))
    if "host_syncs" in report:
        result = report["host_syncs"]
        lines += ["", "## host syncs of one update of ours (pair CTC)", ""]
        lines.append(f"{result['count']} ({result['how']}): {result['calls']}" if "count" in result else
                     str(result.get("error", result.get("note"))))
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
    children = []
    for key, value in report.items():
        if isinstance(value, dict):
            children += [(key, value)] if "cuda_memory_before" in value else []
            children += [(f"{key}: {name}", run) for name, run in value.items()
                         if isinstance(run, dict) and "cuda_memory_before" in run]
    if children:
        lines += ["", "## CUDA memory before each child process (MiB)", ""]
        for label, result in children:
            memory = result["cuda_memory_before"]
            lines.append(f"- {label}: {memory['free_mib']} free of {memory['total_mib']}, "
                         f"{memory['this_process_reserved_mib']} kept by this process's allocator")
    return "\n".join(lines) + "\n"


# -- the check ------------------------------------------------------------------------------------
def _stop_on_sigterm(signum: int, frame) -> None:
    """The time limit's SIGTERM: leave through ``finally`` blocks (the temporary data is removed)."""
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where gpu_check.json and gpu_check.md go (nothing else)")
    parser.add_argument("--cpu-smoke", action="store_true", help="slam_tiny on CPU, seconds per part (CI)")
    parser.add_argument("--preset", default=os.environ.get("GPU_CHECK_PRESET", "slam_paper"))
    parser.add_argument("--updates", type=int, default=40, help="updates per fairseq-train run")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: from the device's name; "
                        "H100 SXM / H200: 989 dense bf16)")
    parser.add_argument("--compile-timeout", type=int, default=150, help="seconds for the --compile-layers benchmark")
    parser.add_argument("--data-dir", type=Path,
                        help="the synthetic training data, reused if there (default: a temporary directory, removed)")
    timeout = os.environ.get("GPU_CHECK_TIMEOUT")
    parser.add_argument("--deadline-seconds", type=float, default=float(timeout) if timeout else None,
                        help=f"the whole run's time (default: GPU_CHECK_TIMEOUT); the parts end "
                             f"{DEADLINE_MARGIN_S:.0f} s before it")
    # the parts from this index on, into the report already in OUT (a continuation, see run_parts)
    parser.add_argument("--start-part", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline_seconds)
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if args.cpu_smoke:
        args.preset, args.updates = "slam_tiny", 3
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bf16" if cuda else "fp32"
    device_name = torch.cuda.get_device_name() if cuda else None
    peak, peak_source = peak_tflops(args.peak_tflops, device_name)
    args.out_dir = args.out_dir.resolve()  # the benchmark children run in the repository
    args.data_dir = args.data_dir.resolve() if args.data_dir else None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report: Dict[str, object] = {
        "preset": args.preset, "device_name": device_name or "CPU (smoke)", "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "deadline_s": args.deadline_seconds,
        "peak_tflops": peak, "peak_tflops_source": peak_source}
    if args.start_part:
        report = json.loads((args.out_dir / "gpu_check.json").read_text(encoding="utf-8"))
        if cuda:  # what the stopped process (waiting for this one) still holds of the GPU
            report["continued_with_cuda_memory"] = cuda_memory()

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    data_dir = args.data_dir or work / "synthetic_data"
    max_tokens = 2000 if args.cpu_smoke else 40000
    small = args.cpu_smoke

    bench_args = (["--smoke", "--threads", "1", "--peak-tflops", str(peak)] if args.cpu_smoke else
                  ["--arch", args.preset, "--device", "cuda", "--dtype", "bf16", "--peak-tflops", str(peak),
                   "--batch-speech", "16", "--batch-text", "64", "--batch-pair", "16", "--frames", "1600",
                   "--tokens", "128", "--repeats", "5"])
    curve_args = (["--smoke", "--threads", "1", "--curves", "--peak-tflops", str(peak)] if args.cpu_smoke else
                  ["--arch", args.preset, "--device", "cuda", "--dtype", "bf16", "--peak-tflops", str(peak),
                   "--batch-speech", "4", "--batch-text", "16", "--batch-pair", "4", "--frames", "1600",
                   "--tokens", "128", "--repeats", "4", "--curves"])
    quantizer_args = (["--frames", "40", "--input-dim", "16", "--codes", "32", "--codevector-dim", "16",
                       "--repeats", "2", "--threads", "1"] if args.cpu_smoke else
                      ["--device", "cuda", "--dtype", "bf16", "--frames", "6000"])

    def synthetic_data(seconds: float) -> Dict[str, object]:
        import make_synthetic_data

        if not (data_dir / "config.yaml").is_file():
            make_synthetic_data.build(data_dir, 8 if small else 256, 8 if small else 256, 32 if small else 2048,
                                      100 if small else 400, 300 if small else 1600, 100 if small else 8000)
        return {"dir": str(data_dir)}

    def train(precision: Optional[str], program: str) -> Callable[[float], Dict[str, object]]:
        def run(seconds: float) -> Dict[str, object]:
            result = _fairseq_train(data_dir, args.preset, precision, args.updates, max_tokens, device.type, [],
                                    timeout=seconds, program=program)
            if not cuda:
                result["note"] = "on CPU (fairseq's --fp16 needs CUDA)"
            return result
        return run

    def fully_sharded(seconds: float) -> object:
        if not cuda:
            return "skipped: needs CUDA"
        if importlib.util.find_spec("fairscale") is None:
            return "skipped: fairscale is not installed (fairseq 0.12's fully_sharded needs it)"
        return _fairseq_train(data_dir, args.preset, "fp16", max(8, args.updates // 4), max_tokens, "cuda",
                              ["--ddp-backend", "fully_sharded"], timeout=seconds, program="launch")

    def compiled(seconds: float) -> Dict[str, object]:
        if not cuda:
            return {"note": "skipped on CPU (inductor's C++ build takes minutes)"}
        return _bench_subprocess([*bench_args, "--compile-layers"], timeout=seconds, figures=work / "compiled.json")

    frames = 150 if small else 1600
    # (label, precision flag, program): fairseq-train's --bf16 means a TPU in fairseq 0.12
    runs = ([("slam-fairseq-train --bf16", "bf16", "launch"), ("fairseq-train --fp16", "fp16", "train")] if cuda else
            [("fairseq-train fp32", None, "train"), ("slam-fairseq-train --bf16", "bf16", "launch")])
    # needs: about the least each part takes for slam_paper on one H100/H200 (CPU smoke: far less)
    parts = [
        Part("bench_pretraining", lambda seconds: _bench_in_process(bench_args, figures=work / "bench.json"),
             needs=40, headline=True),
        Part("bench_compiled", compiled, needs=60, cap=args.compile_timeout, headline=True, child=True),
        Part("synthetic_data", synthetic_data, needs=15, headline=True),
        *[Part("fairseq_train", train(precision, program), needs=45, cap=180, name=label, headline=True,
               child=True) for label, precision, program in runs],
        Part("sdpa_kernels", lambda seconds: sdpa_kernels(args.preset, device, dtype), needs=5),
        *[Part("largest_batch", lambda seconds, checkpointing=checkpointing: largest_batch(
                args.preset, device, dtype, checkpointing, start=1 if small else 8, doublings=1 if small else 5,
                frames=frames, seconds=seconds), needs=30, cap=90,
               name="checkpoint_activations" if checkpointing else "plain") for checkpointing in (False, True)],
        Part("fully_sharded", fully_sharded, needs=40, cap=120, child=True),
        Part("curves", lambda seconds: _bench_in_process(curve_args, figures=work / "curves.json"), needs=45),
        Part("profile", lambda seconds: profile_update(args.preset, device, dtype, batch=2 if small else 16,
                                                       frames=frames), needs=20),
        Part("host_syncs", lambda seconds: host_syncs(args.preset, device, dtype, batch=2 if small else 8,
                                                      frames=frames), needs=20),
        Part("quantizer", lambda seconds: _bench_in_process(quantizer_args, module="bench_quantizer"), needs=15),
    ]
    def continue_elsewhere(index: int) -> None:
        """The parts from ``index`` on in a new process (a fresh CUDA context), on the same data
        and deadline; its report becomes this one's."""
        given = argv if argv is not None else sys.argv[1:]
        command = [sys.executable, __file__, *given, "--start-part", str(index), "--data-dir", str(data_dir)]
        left, timeout = deadline.remaining(), None
        if not math.isinf(left):
            command += ["--deadline-seconds", f"{left + DEADLINE_MARGIN_S:.0f}"]
            timeout = max(left + DEADLINE_MARGIN_S / 2, 5.0)
        returncode, stdout, stderr, _ = run_child(command, timeout=timeout, cwd=Path.cwd())
        report.clear()
        report.update(json.loads((args.out_dir / "gpu_check.json").read_text(encoding="utf-8")))
        if returncode != 0:
            report["continuation_error"] = f"exit {returncode}: {(stderr or stdout).strip()[-500:]}"

    try:
        run_parts(parts, report, deadline, cuda, lambda: _save(args.out_dir, report), start=args.start_part,
                  continue_elsewhere=continue_elsewhere)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    _save(args.out_dir, report)
    print(f"gpu check written to {args.out_dir}/gpu_check.json and gpu_check.md ({report['wall_s']} s)")
    return report


if __name__ == "__main__":
    main()
