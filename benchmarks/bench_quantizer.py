"""The MSM quantizer's forward + backward: ours (``GumbelQuantizer``) against fairseq's
``GumbelVectorQuantizer`` on the same weights, input and Gumbel draws.

fairseq forms codevectors through an (N, G x V, d) broadcast product; ours through one batched
matrix product. At ``slam_paper``'s quantizer (1024 codes of 256, input width 1024) and 3000 masked
frames that product is 3 GB in float32. Interleaved timing; peak memory per side (CUDA max
allocated, or on CPU the process's VmHWM above the RSS before the call). The last line is
``ratio ours/stock: X`` (stock time / our time).

    python benchmarks/bench_quantizer.py                        # slam_paper's quantizer, 3000 frames, CPU
    python benchmarks/bench_quantizer.py --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3000, help="masked frames quantized (N)")
    parser.add_argument("--input-dim", type=int, default=1024, help="quantizer input width (slam_paper: 1024)")
    parser.add_argument("--codes", type=int, default=1024, help="codes per group (V)")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--codevector-dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    parser.add_argument("--threads", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> float:
    args = parse_args(argv)
    import torch

    for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from fairseq.modules import GumbelVectorQuantizer

    from bench_pretraining import measure_memory_mib
    from interleaved_timing import interleaved
    from slam_fairseq.modules.gumbel_quantizer import GumbelQuantizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = dict(dim=args.input_dim, num_vars=args.codes, temp=(2.0, 0.5, 0.999995), groups=args.groups,
                 combine_groups=False, vq_dim=args.codevector_dim, time_first=True)
    torch.manual_seed(0)
    ours = GumbelQuantizer(**sizes).to(device).train()
    stock = GumbelVectorQuantizer(**sizes).to(device).train()
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(1, args.frames, args.input_dim, device=device)
    upstream = torch.randn(1, args.frames, args.codevector_dim, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)

    def step(quantizer):
        def run() -> None:
            quantizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                result = quantizer(x, produce_targets=True)
            ((result["x"].float() * upstream).sum() + result["prob_perplexity"]).backward()
        return run

    ours_times, stock_times = interleaved(step(ours), step(stock), args.repeats, device)
    ratio = statistics.median(s / o for o, s in zip(ours_times, stock_times))
    memory = {}
    for name, quantizer in (("ours", ours), ("stock", stock)):
        before, peak = measure_memory_mib(step(quantizer), device)
        memory[name] = peak - before
    print(f"quantizer forward + backward: {args.frames} frames of {args.input_dim}, {args.groups} x {args.codes} codes "
          f"of {args.codevector_dim // args.groups}, {device} {args.dtype}, {torch.get_num_threads()} threads")
    for name, times in (("ours", ours_times), ("stock", stock_times)):
        print(f"{name:5s}: {statistics.median(times) * 1e3:.1f} ms, peak memory of the call {memory[name]:.0f} MiB")
    print(f"ratio ours/stock: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
