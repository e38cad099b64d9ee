"""Peak resident memory of a fairseq command, read from ``/proc/self/status`` (Linux).

Runs ``fairseq-train`` (or another ``fairseq_cli`` module, or ``launch``: ``slam-fairseq-train``) in this process and prints, at exit, one
line ``peak RSS: X MiB (VmHWM), RSS at exit: Y MiB`` (and, on CUDA, ``peak CUDA memory: ...``) so that memory fixes can be measured on the real
training loop:

    python benchmarks/peak_rss.py train DATA --user-dir slam_fairseq --task slam_pretraining ...
"""
from __future__ import annotations

import atexit
import importlib
import sys
from typing import Dict


def proc_status_mib(path: str = "/proc/self/status") -> Dict[str, float]:
    """The ``Vm*`` lines of a /proc status file in MiB (empty off Linux)."""
    values: Dict[str, float] = {}
    try:
        with open(path, encoding="ascii") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name.startswith("Vm") and rest.strip().endswith("kB"):
                    values[name] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def _report() -> None:
    status = proc_status_mib()
    print(f"peak RSS: {status.get('VmHWM', float('nan')):.0f} MiB (VmHWM), "
          f"RSS at exit: {status.get('VmRSS', float('nan')):.0f} MiB", flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2 ** 20:.0f} MiB reserved", flush=True)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: {sys.argv[0]} train|hydra_train|launch ARGS...")
    atexit.register(_report)
    if sys.argv[1] == "launch":  # slam-fairseq-train (slam_fairseq.launch)
        importlib.import_module("slam_fairseq.launch").main(sys.argv[2:])
        return
    module = importlib.import_module(f"fairseq_cli.{sys.argv[1]}")
    sys.argv = [f"fairseq-{sys.argv[1]}", *sys.argv[2:]]
    module.cli_main()


if __name__ == "__main__":
    main()
