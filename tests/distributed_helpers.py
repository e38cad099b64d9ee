"""Running real multi-process ``fairseq-train`` jobs on the CPU (gloo) in tests.

- :func:`free_port`: a TCP port nobody listens on (for ``tcp://127.0.0.1:PORT`` rendezvous).
- :func:`rank_flags`: fairseq's own flags for one process per rank (``--distributed-no-spawn``).
- :func:`launch`: start several commands at once, wait for all with one deadline, and on a
  failure or a timeout kill the rest and fail with every process's log tail.
- Parameter hashes: with :func:`hash_env`, every Python process of the job (a rank started
  directly, by torchrun, or by the launcher) appends ``<num_updates> <sha256 of all parameters>``
  to ``<dir>/params.rank<R>.txt`` after each ``Trainer.train_step``, through a ``sitecustomize``
  module on ``PYTHONPATH`` (test code only; the product does not patch fairseq).
  :func:`read_hashes` reads them back.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO_ROOT / "slam_fairseq")

_SITECUSTOMIZE = '''
"""Test hook: hash the parameters after every fairseq train step (see tests/distributed_helpers.py)."""
import os

if os.environ.get("SLAM_TEST_HASH_DIR"):
    import hashlib

    import fairseq.trainer

    _original_train_step = fairseq.trainer.Trainer.train_step

    def _hashing_train_step(self, samples, raise_oom=False):
        result = _original_train_step(self, samples, raise_oom)
        digest = hashlib.sha256()
        for name, parameter in sorted(self.model.named_parameters()):
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
        path = os.path.join(os.environ["SLAM_TEST_HASH_DIR"], f"params.rank{self.data_parallel_rank}.txt")
        with open(path, "a") as handle:
            handle.write(f"{self.get_num_updates()} {digest.hexdigest()}\\n")
        return result

    fairseq.trainer.Trainer.train_step = _hashing_train_step
'''


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_flags(rank: int, world_size: int, port: int) -> List[str]:
    """fairseq's flags for rank ``rank`` of a CPU job with one process per rank."""
    return ["--distributed-world-size", str(world_size), "--distributed-rank", str(rank),
            "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}",
            "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--cpu"]


def base_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a job: this checkout first on PYTHONPATH, one thread per process,
    and no inherited torchrun/SLURM variables (unless ``extra`` sets them)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not key.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def hash_env(env: Dict[str, str], hash_dir: Path) -> Dict[str, str]:
    """``env`` plus the parameter-hash hook writing into ``hash_dir``."""
    hook_dir = hash_dir / "hook"
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), env.get("PYTHONPATH", "")])
    env["SLAM_TEST_HASH_DIR"] = str(hash_dir)
    return env


def read_hashes(hash_dir: Path) -> Dict[int, List[Tuple[int, str]]]:
    """rank -> [(num_updates after the step, parameter hash), ...] in step order."""
    result = {}
    for path in sorted(hash_dir.glob("params.rank*.txt")):
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        result[int(path.stem.split("rank")[1])] = [(int(update), digest) for update, digest in rows]
    return result


@dataclass
class Finished:
    """One finished process: its command, exit status and combined stdout + stderr."""

    command: List[str]
    returncode: int
    output: str


def _tails(finished: Sequence[Finished], chars: int = 4000) -> str:
    return "\n".join(f"--- process {i} (exit {f.returncode}): {' '.join(f.command)[:300]}\n{f.output[-chars:]}"
                     for i, f in enumerate(finished))


def launch(commands: Sequence[Sequence[str]], log_dir: Path, env: Dict[str, str], timeout: float = 240,
           cwd: Optional[Path] = None, check: bool = True) -> List[Finished]:
    """Start every command at once; wait for all of them at most ``timeout`` seconds in total.

    Logs go to ``log_dir/process<i>.log``. With ``check``, a non-zero exit or the timeout kills
    the others and raises AssertionError with every process's log tail.
    """
    return launch_each(commands, [env] * len(commands), log_dir, timeout, cwd, check)


def launch_each(commands: Sequence[Sequence[str]], envs: Sequence[Dict[str, str]], log_dir: Path,
                timeout: float = 240, cwd: Optional[Path] = None, check: bool = True) -> List[Finished]:
    """As :func:`launch`, command ``i`` with environment ``envs[i]``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    handles, processes = [], []
    for index, (command, env) in enumerate(zip(commands, envs)):
        handle = open(log_dir / f"process{index}.log", "w")
        handles.append(handle)
        processes.append(subprocess.Popen([str(part) for part in command], stdout=handle,
                                          stderr=subprocess.STDOUT, env=env, cwd=str(cwd or REPO_ROOT)))
    deadline = time.monotonic() + timeout
    timed_out = failed = False
    try:
        while any(process.poll() is None for process in processes):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if check and any(process.poll() not in (None, 0) for process in processes):
                failed = True
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            process.wait()
        for handle in handles:
            handle.close()
    finished = [Finished([str(part) for part in command], process.returncode,
                         (log_dir / f"process{index}.log").read_text(errors="replace"))
                for index, (command, process) in enumerate(zip(commands, processes))]
    if check and (timed_out or failed or any(f.returncode != 0 for f in finished)):
        reason = f"timed out after {timeout:.0f} s" if timed_out else "a process failed"
        raise AssertionError(f"{reason}; logs in {log_dir}\n{_tails(finished)}")
    return finished


def json_records(output: str, kind: str) -> List[Dict[str, str]]:
    """fairseq's ``--log-format json`` records of one kind (``train_inner``, ``train``, ``valid``
    or a validation subset's name) from a process's output."""
    line = re.compile(r"(?<![\w.])" + re.escape(kind) + r"\W+(?:INFO\W+)?(\{\".*\})\s*$")
    return [json.loads(match.group(1)) for match in map(line.search, output.splitlines()) if match]


def fairseq_train(*args) -> List[str]:
    """The command of ``fairseq-train ARGS`` (its Python entry point)."""
    return [sys.executable, "-m", "fairseq_cli.train", *map(str, args)]


def train_ranks(args: Sequence[str], world_size: int, log_dir: Path, env: Dict[str, str],
                timeout: float = 240, check: bool = True) -> List[Finished]:
    """``fairseq-train ARGS`` as ``world_size`` CPU ranks over gloo, one process each."""
    port = free_port()
    commands = [fairseq_train(*args, *rank_flags(rank, world_size, port)) for rank in range(world_size)]
    return launch(commands, log_dir, env, timeout=timeout, check=check)
