"""The cost of giving freed host memory back after every CPU update (``--release-host-memory``).

Runs ``fairseq-train`` in this process with the task's release call replaced by one variant and
prints one line ``RESULT <variant> wall W user U sys S peakMiB P``:

- ``none``: nothing is released (the default of ``slam_pretraining``);
- ``trim``: ``malloc_trim(0)`` after every update;
- ``default``: what ``--release-host-memory`` does (a fixed 1 MiB mmap threshold + ``malloc_trim``).

Run the variants one after the other on the same data and flags (one thread for steady figures):

    for v in none trim default; do
        OMP_NUM_THREADS=1 python benchmarks/host_memory_ab.py $v DATA --user-dir slam_fairseq \\
            --task slam_pretraining --release-host-memory ...
    done
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv) -> None:
    variant, train_args = argv[0], argv[1:]
    if variant not in ("none", "trim", "default"):
        raise SystemExit(f"variant {variant!r}: expected none, trim or default")
    import slam_fairseq  # noqa: F401  (registers the task)
    from slam_fairseq import host_memory
    from slam_fairseq.tasks import slam_pretraining

    if variant == "none":
        slam_pretraining.release_free_heap_memory = lambda: False
    elif variant == "trim":
        slam_pretraining.release_free_heap_memory = host_memory.trim_heap
    if "--release-host-memory" not in train_args:
        train_args = [*train_args, "--release-host-memory"]  # the task calls the (replaced) release
    from fairseq_cli.train import cli_main

    sys.argv = ["fairseq-train", *train_args]
    start = time.time()
    try:
        cli_main()
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open("/proc/self/status", encoding="ascii") as status:
            peak = next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))
        print(f"RESULT {variant} wall {time.time() - start:.1f} user {usage.ru_utime:.1f} "
              f"sys {usage.ru_stime:.1f} peakMiB {peak}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
