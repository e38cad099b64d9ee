"""Speed and memory of our Conformer layer against stock fairseq's ``ConformerEncoderLayer``.

Same sizes, same padded batch, forward + backward, as a ratio (ours / stock) so that it holds on any
machine. Run on CPU by default, on CUDA with ``--device cuda`` (add ``--dtype bf16`` for mixed
precision). Example:

    python benchmarks/bench_encoder.py --batch 8 --frames 400 --dim 256 --heads 4 --ffn 1024 --kernel 31
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict

import torch

from fairseq.modules.conformer_layer import ConformerEncoderLayer
from interleaved_timing import interleaved
from slam_fairseq.modules.conformer import ConformerLayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _time_interleaved(first: Callable[[], None], second: Callable[[], None], repeats: int,
                      device: torch.device):
    """Median seconds of each, and the median of the per-pair ratios first/second (interleaved)."""
    first_times, second_times = interleaved(first, second, repeats, device)
    ratios = [a / b for a, b in zip(first_times, second_times)]
    return statistics.median(first_times), statistics.median(second_times), statistics.median(ratios)


def _peak_memory(step: Callable[[], None], device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def run(args: argparse.Namespace) -> Dict[str, float]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    lengths = torch.linspace(args.frames // 2, args.frames, args.batch).long().to(device)
    padding_mask = torch.arange(args.frames, device=device)[None, :] >= lengths[:, None]
    x = torch.randn(args.batch, args.frames, args.dim, device=device)
    ours = ConformerLayer(args.dim, args.ffn, args.heads, args.kernel, dropout=0.0,
                          attention_dropout=0.0, activation_dropout=0.0).to(device).train()
    stock = ConformerEncoderLayer(args.dim, args.ffn, args.heads, dropout=0.0, use_fp16=False,
                                  depthwise_conv_kernel_size=args.kernel,
                                  attn_type="espnet" if args.stock_pos_enc != "abs" else None,
                                  pos_enc_type=args.stock_pos_enc).to(device).train()
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step_ours() -> None:
        with autocast:
            output = ours(x, padding_mask)
        output.float().sum().backward()

    def step_stock() -> None:
        with autocast:
            output, _ = stock(x.transpose(0, 1), padding_mask)
        output.float().sum().backward()

    ours_s, stock_s, time_ratio = _time_interleaved(step_ours, step_stock, args.repeats, device)
    results = {"ours_s": ours_s, "stock_s": stock_s, "time_ratio": time_ratio,
               "ours_peak_mib": _peak_memory(step_ours, device),
               "stock_peak_mib": _peak_memory(step_stock, device)}
    results["memory_ratio"] = results["ours_peak_mib"] / results["stock_peak_mib"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--kernel", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stock-pos-enc", choices=["abs", "rope"], default="abs",
                        help="stock layer's position scheme (abs: fairseq MultiheadAttention, rope: espnet)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    print(f"forward+backward, batch {args.batch} x {args.frames} frames x dim {args.dim}, "
          f"{args.heads} heads, FFN {args.ffn}, kernel {args.kernel}, {args.device} {args.dtype}")
    print(f"stock fairseq ConformerEncoderLayer (pos_enc {args.stock_pos_enc}):      {results['stock_s']:.3f} s"
          f"  peak {results['stock_peak_mib']:.0f} MiB")
    print(f"slam_fairseq ConformerLayer (SDPA, rope, masked GroupNorm):   {results['ours_s']:.3f} s"
          f"  peak {results['ours_peak_mib']:.0f} MiB")
    print(f"ratio ours/stock: time {results['time_ratio']:.2f} (median of paired runs)  "
          f"memory {results['memory_ratio']:.2f} (CUDA only)")


if __name__ == "__main__":
    main()
