#!/usr/bin/env python3
"""Cost of completing a step's logging output to the ``slam_multitask`` key schema.

``slam_pretraining`` runs ``complete_logging_output`` once per train and validation step
(``slam_fairseq/tasks/logging_schema.py``). Measured here on the CPU (one thread) for a stage-1
speech step (Python numbers, as the criterion logs them today) and for the same step logged as
scalar tensors; reported in microseconds per call, CPU time (``time.process_time``, meaningful on
a busy machine) and wall time.

Usage: python benchmarks/bench_logging_schema.py [--calls 20000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from slam_fairseq.tasks.logging_schema import complete_logging_output, multitask_logging_keys  # noqa: E402


def speech_step(as_tensors: bool) -> dict:
    values = {"loss": 7.1, "sample_size": 1, "ntokens": 812, "nsentences": 4, "_msm_contrastive_loss_sum": 300.2,
              "_msm_contrastive_count": 41, "_msm_contrastive_correct": 12, "_diversity_loss_sum": 0.4,
              "_diversity_count": 1, "_msm_mlm_loss_sum": 200.5, "_msm_mlm_count": 41, "_msm_mlm_correct": 3,
              "_quantizer_batches": 1, "_code_perplexity_sum": 30.0, "_prob_perplexity_sum": 33.0,
              "_gumbel_temperature_sum": 2.0, "nframes_speech": 812, "nsentences_speech": 4}
    return {k: torch.tensor(float(v)) for k, v in values.items()} if as_tensors else values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys, device = multitask_logging_keys(), torch.device("cpu")
    print(f"schema: {len(keys)} keys; {args.calls} calls each")
    for label, as_tensors in (("python numbers", False), ("scalar tensors", True)):
        step = speech_step(as_tensors)
        complete_logging_output(step, keys, device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.calls):
            complete_logging_output(step, keys, device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{label}: {1e6 * cpu / args.calls:.1f} us CPU per call ({1e6 * wall / args.calls:.1f} us wall)")


if __name__ == "__main__":
    main()
