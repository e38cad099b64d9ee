"""``slam-fairseq-train``: ``fairseq-train`` started by torchrun or SLURM, one process per rank.

fairseq 0.12 cannot be started by torchrun as it stands: without distributed flags every process
trains alone (world size 1, all writing one save dir); with ``--distributed-world-size`` it
computes the device as ``RANK % torch.cuda.device_count()`` (ZeroDivisionError on a CPU machine)
and, on a GPU node, ignores LOCAL_RANK. Its SLURM support expects one task per node. This module
reads the launcher's environment and hands fairseq its own explicit flags instead, then runs
fairseq's ``fairseq_cli.train.cli_main`` unchanged (nothing in fairseq is patched)::

    torchrun --nproc_per_node 8 -m slam_fairseq.launch DATA --task slam_pretraining ...
    srun --ntasks-per-node 8 --gpus-per-node 8 slam-fairseq-train DATA --task slam_pretraining ...

Flags added where the command line does not give them (given ones win):

- ``--distributed-world-size W --distributed-rank R --distributed-no-spawn`` and, on CUDA,
  ``--device-id L`` from torchrun's WORLD_SIZE / RANK / LOCAL_RANK or the srun step's
  SLURM_STEP_NUM_TASKS / SLURM_PROCID / SLURM_LOCALID (torchrun's variables win when both are set;
  under SLURM a process that sees one GPU, as ``srun --gpus-per-task 1`` binds them, uses device
  0; more processes than visible GPUs otherwise is an error). A batch
  script or an salloc shell of several tasks, which no srun step started, is an error (it would
  wait for ranks that nothing starts); fewer processes on a node than its GPUs is a WARNING;
- ``--distributed-init-method tcp://MASTER_ADDR:MASTER_PORT``; under SLURM the address defaults to
  the first host of SLURM_JOB_NODELIST and the port to ``20000 + SLURM_JOB_ID % 20000``;
- ``--distributed-backend nccl`` with CUDA, ``gloo`` (plus ``--cpu``) without;
- ``--ddp-backend legacy_ddp``: one gradient all-reduce after all of an update's backward passes
  (SLAM pre-training runs one backward per modality, each leaving some parameters unused, and a
  frozen fine-tuning encoder has no gradients). This is the backend the 2-rank tests run.
  ``--ddp-backend c10d``/``pytorch_ddp`` pass ``device_ids`` to PyTorch and fail on the CPU;
- ``--user-dir`` pointing at this package.

Without a launcher environment (or with a world size of 1) only ``--user-dir`` is added, and, for
``--ddp-backend fully_sharded`` on one GPU, a one-process rendezvous (fairscale's FSDP needs a
process group, which fairseq creates only when given an init method).

``--bf16`` trains on the GPU (or the CPU) here. fairseq 0.12 reads ``--bf16`` as "train on a TPU"
(its argument post-processing sets ``--tpu``, and ``fairseq-train --bf16`` on a GPU machine then
fails in ``get_tpu_device``); the launcher keeps fairseq's bf16 training (the model and batches in
bfloat16, float32 master weights in its ``FP16Optimizer``) and clears only the implied ``--tpu``,
unless ``--tpu`` is given. Without CUDA it also adds ``--fp16-no-flatten-grads`` (fairseq allocates
the flat float32 master buffer on the current CUDA device).
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import List, Mapping, Optional, Sequence

__all__ = ["distributed_args", "bf16_args", "first_slurm_host", "tasks_on_this_node",
           "warn_if_launched_without_mapping", "main"]

logger = logging.getLogger(__name__)

DEFAULT_DDP_BACKEND = "legacy_ddp"
# what stops them on the CPU
_CUDA_ONLY_DDP_BACKENDS = {
    "c10d": "fairseq passes device_ids to PyTorch's DistributedDataParallel",
    "pytorch_ddp": "fairseq passes device_ids to PyTorch's DistributedDataParallel",
    "fully_sharded": "fairscale's FSDP places its compute device and streams on CUDA",
}
_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE")
_SLURM_KEYS = ("SLURM_PROCID", "SLURM_NTASKS")


def _started_by_torchrun(env: Mapping[str, str]) -> bool:
    """Whether torchrun's variables are set (they win over SLURM's when both are)."""
    return all(key in env for key in _TORCHRUN_KEYS)


def _given(argv: Sequence[str], flag: str, *aliases: str) -> bool:
    names = (flag, *aliases)
    return any(arg in names or arg.split("=", 1)[0] in names for arg in argv)


def _value(argv: Sequence[str], flag: str) -> Optional[str]:
    value = None
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as ``scontrol show hostnames`` lists it first:
    ``gpu[07-08,11],login1`` -> ``gpu07``, ``rack[2-3]-n[1,4]`` -> ``rack2-n1``."""
    depth, entry = 0, ""
    for char in nodelist.strip():
        if char == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(char, 0)
        entry += char
    if not entry or depth != 0:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: no host in it")
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", entry)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def _trains_on_cuda(argv: Sequence[str], cuda_available: bool) -> bool:
    return cuda_available and not _given(argv, "--cpu")


def _rendezvous(env: Mapping[str, str]):
    """(world size, rank, local rank, tcp address) from torchrun's or SLURM's variables, or None."""
    if _started_by_torchrun(env):
        world_size, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not env.get(key)]
        if missing and world_size > 1:
            raise ValueError(f"WORLD_SIZE={world_size} and RANK={rank} are set but {', '.join(missing)} "
                             "is not: start the job with torchrun, or set both")
        address = f"tcp://{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
        return world_size, rank, local_rank, address
    if all(key in env for key in _SLURM_KEYS):
        if "SLURM_STEP_NUM_TASKS" not in env:
            # a batch script or an salloc shell: the job's tasks, but no step started them
            tasks = _int(env, "SLURM_NTASKS")
            if tasks > 1:
                raise ValueError(f"SLURM_NTASKS={tasks}, but this process is not a task of an srun step (no "
                                 f"SLURM_STEP_NUM_TASKS): it would wait for {tasks - 1} ranks that nothing starts. "
                                 "Start one task per GPU with `srun slam-fairseq-train ...`, or run fairseq-train "
                                 "directly for one process")
            return 1, 0, 0, ""
        world_size, rank = _int(env, "SLURM_STEP_NUM_TASKS"), _int(env, "SLURM_PROCID")
        local_rank = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if world_size <= 1:
            return world_size, rank, local_rank, ""
        host = env.get("MASTER_ADDR")
        if not host:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("SLURM_PROCID and SLURM_NTASKS are set but neither MASTER_ADDR nor "
                                 "SLURM_JOB_NODELIST names the host of rank 0")
            host = first_slurm_host(nodelist)
        if env.get("MASTER_PORT"):
            port = _int(env, "MASTER_PORT")
        else:
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000 if env.get("SLURM_JOB_ID") else 29500
        return world_size, rank, local_rank, f"tcp://{host}:{port}"
    return None


def _device_of(local_rank: int, cuda_device_count: int, slurm: bool) -> int:
    """The CUDA device of the process of ``local_rank`` on its node: that device when the process
    sees the node's GPUs; under SLURM, device 0 when it sees one (``srun --gpus-per-task 1`` gives
    each task its own GPU as device 0). Else more processes than GPUs: an error."""
    if local_rank < cuda_device_count:
        return local_rank
    if slurm and cuda_device_count == 1:
        return 0
    raise ValueError(f"local rank {local_rank} but this process sees {cuda_device_count} CUDA devices: start one "
                     "process per GPU" + (", each seeing all of the node's GPUs or only its own" if slurm else ""))


def tasks_on_this_node(env: Mapping[str, str]) -> Optional[int]:
    """Processes the launcher started on this node: torchrun's LOCAL_WORLD_SIZE, or the count that
    srun's SLURM_STEP_TASKS_PER_NODE (``8(x2),4``) gives this node (SLURM_NODEID); None if unknown."""
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return int(env["LOCAL_WORLD_SIZE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE")
    if not spec or not env.get("SLURM_NODEID", "").isdigit():
        return None
    counts: List[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(env["SLURM_NODEID"])
    return counts[node] if node < len(counts) else None


def distributed_args(env: Mapping[str, str], argv: Sequence[str], cuda_available: bool,
                     cuda_device_count: int = 1) -> List[str]:
    """fairseq flags for this process, to append to ``argv``; the flags ``argv`` gives win.

    Args:
        env: the process environment (torchrun's or SLURM's variables).
        argv: the fairseq-train arguments the user gave (without the program name).
        cuda_available: whether this process will train on CUDA (else CPU, gloo).
        cuda_device_count: GPUs this process sees (fairseq's default world size without a launcher).
    Returns:
        the added flags, e.g. ``["--distributed-world-size", "2", "--distributed-rank", "1", ...]``;
        ``[]`` when the environment holds no multi-process launch, except for
        ``--ddp-backend fully_sharded`` on CUDA, which gets a one-process rendezvous.
    Raises:
        ValueError: a variable is malformed, or ``--distributed-world-size`` /
            ``--distributed-rank`` contradicts the environment (the ranks would wait forever).
    """
    found = _rendezvous(env)
    if found is None or found[0] <= 1:
        return _single_process_fsdp_args(argv, cuda_available, cuda_device_count)
    world_size, rank, local_rank, address = found
    slurm = not _started_by_torchrun(env)  # _rendezvous read SLURM's variables
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world size {world_size} of the launch environment")
    for flag, expected in (("--distributed-world-size", world_size), ("--distributed-rank", rank)):
        given = _value(argv, flag)
        if given is not None and not given.lstrip("-").isdigit():
            raise ValueError(f"{flag} {given!r} is not an integer")
        if given is not None and int(given) != expected:
            raise ValueError(f"{flag} {given} contradicts the launch environment ({expected}); "
                             f"drop {flag} and let the launcher set it")
    use_cuda = _trains_on_cuda(argv, cuda_available)
    ddp_backend = _value(argv, "--ddp-backend")
    if not use_cuda and ddp_backend in _CUDA_ONLY_DDP_BACKENDS:
        raise ValueError(f"--ddp-backend {ddp_backend} cannot run on the CPU with fairseq 0.12 "
                         f"({_CUDA_ONLY_DDP_BACKENDS[ddp_backend]}); use --ddp-backend {DEFAULT_DDP_BACKEND} "
                         "(the launcher's default)")
    wanted = [
        ("--distributed-world-size", [str(world_size)]),
        ("--distributed-rank", [str(rank)]),
        ("--distributed-no-spawn", []),
        ("--distributed-init-method", [address]),
        ("--distributed-backend", ["nccl" if use_cuda else "gloo"]),
        ("--ddp-backend", [DEFAULT_DDP_BACKEND]),
    ]
    if use_cuda:
        if not _given(argv, "--device-id", "--local_rank"):  # the user's device wins, unchecked
            wanted.append(("--device-id", [str(_device_of(local_rank, cuda_device_count, slurm))]))
    else:
        wanted.append(("--cpu", []))
    added: List[str] = []
    for flag, values in wanted:
        aliases = ("--local_rank",) if flag == "--device-id" else ()
        if not _given(argv, flag, *aliases):
            added += [flag, *values]
    return added


def _free_local_port() -> int:
    """A port free now; fairseq binds it moments later (another process could take it first, which
    fails the start with an address-in-use error rather than anything silent)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _single_process_fsdp_args(argv: Sequence[str], cuda_available: bool, cuda_device_count: int) -> List[str]:
    """``--ddp-backend fully_sharded`` in one process on one GPU: fairscale's FSDP needs a process
    group, which fairseq creates only when given an init method, so the process gets a one-member
    rendezvous on a free local port. ``[]`` for anything else: other backends, a command that sets
    an init method, or several GPUs without ``--distributed-world-size 1`` (fairseq then spawns one
    process per GPU itself). On the CPU, ``fully_sharded`` is refused (ValueError)."""
    use_cuda = _trains_on_cuda(argv, cuda_available)
    if _value(argv, "--ddp-backend") == "fully_sharded" and not use_cuda:
        raise ValueError(f"--ddp-backend fully_sharded cannot run on the CPU with fairseq 0.12 "
                         f"({_CUDA_ONLY_DDP_BACKENDS['fully_sharded']}); use --ddp-backend {DEFAULT_DDP_BACKEND}")
    if _value(argv, "--ddp-backend") != "fully_sharded" or not use_cuda or _given(argv, "--distributed-init-method"):
        return []
    world_size = _value(argv, "--distributed-world-size")
    if world_size != "1" and (world_size is not None or cuda_device_count != 1):
        return []
    wanted = [("--distributed-world-size", ["1"]), ("--distributed-rank", ["0"]), ("--distributed-no-spawn", []),
              ("--device-id", ["0"]), ("--distributed-backend", ["nccl"]),
              ("--distributed-init-method", [f"tcp://127.0.0.1:{_free_local_port()}"])]
    return [item for flag, values in wanted if not _given(argv, flag) for item in (flag, *values)]


def wants_bf16_off_tpu(argv: Sequence[str]) -> bool:
    """Whether the command asks for bf16 training (``--bf16`` / ``--memory-efficient-bf16``)
    without ``--tpu``: the launcher then trains in bf16 on the GPU or CPU instead of a TPU."""
    return _given(argv, "--bf16", "--memory-efficient-bf16") and not _given(argv, "--tpu")


def bf16_args(argv: Sequence[str], cuda_available: bool) -> List[str]:
    """Flags that bf16 training off a TPU needs: ``--fp16-no-flatten-grads`` without CUDA (fairseq
    puts the flat float32 master copy on the current CUDA device); ``[]`` otherwise."""
    if not wants_bf16_off_tpu(argv):
        return []
    use_cuda = _trains_on_cuda(argv, cuda_available)
    if use_cuda or _given(argv, "--fp16-no-flatten-grads"):
        return []
    return ["--fp16-no-flatten-grads"]


def _run_fairseq_train(bf16_off_tpu: bool) -> None:
    """``fairseq_cli.train.cli_main`` on ``sys.argv``. With ``bf16_off_tpu``, the same steps as
    ``cli_main`` (parse, convert to a config, the plasma store for ``--use-plasma-view``, the NVTX
    ranges for ``--profile``, ``call_main``) with the ``--tpu`` that ``--bf16`` implies cleared."""
    from fairseq_cli.train import cli_main

    if not bf16_off_tpu:
        cli_main()
        return
    import torch
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli.train import main as train_main

    args = options.parse_args_and_arch(options.get_training_parser())
    args.tpu = False
    on_cpu = args.cpu or not torch.cuda.is_available()
    logger.info(f"--bf16 without --tpu: training in bfloat16 on {'the CPU' if on_cpu else 'CUDA'} "
                "(fairseq 0.12 alone would look for a TPU)")
    cfg = convert_namespace_to_omegaconf(args)
    if cfg.common.use_plasma_view:
        from fairseq.data.plasma_utils import PlasmaStore

        server = PlasmaStore(path=cfg.common.plasma_path)
        logger.info(f"Started plasma server pid {server.server.pid} {cfg.common.plasma_path}")
    if args.profile:
        with torch.cuda.profiler.profile(), torch.autograd.profiler.emit_nvtx():
            distributed_utils.call_main(cfg, train_main)
    else:
        distributed_utils.call_main(cfg, train_main)


def _user_dir_args(argv: Sequence[str]) -> List[str]:
    if _given(argv, "--user-dir"):
        return []
    return ["--user-dir", os.path.dirname(os.path.abspath(__file__))]


def warn_if_launched_without_mapping(env: Mapping[str, str] = os.environ,
                                     argv: Sequence[str] = sys.argv) -> bool:
    """Log a WARNING when this process was started by torchrun (WORLD_SIZE > 1) but fairseq got
    no distributed flags, i.e. ``torchrun ... fairseq-train``; returns whether it warned."""
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    # the launcher itself: the package is imported before it rewrites sys.argv ("-m" while
    # ``python -m slam_fairseq.launch`` imports the package)
    program = os.path.basename(argv[0]) if argv else ""
    if program in ("-m", "slam-fairseq-train", "launch.py"):
        return False
    if world_size <= 1 or _given(argv, "--distributed-init-method"):
        return False
    problem = ("each process trains alone (world size 1) into the same save dir"
               if not _given(argv, "--distributed-world-size") else
               "fairseq then derives the device from RANK % torch.cuda.device_count() (ZeroDivisionError "
               "without a GPU) and ignores LOCAL_RANK")
    logger.warning(f"started with WORLD_SIZE={world_size} but without fairseq's distributed flags: {problem}. "
                   "Launch `torchrun ... -m slam_fairseq.launch ARGS` or `slam-fairseq-train ARGS` instead "
                   "of fairseq-train (docs/distributed.md)")
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Map the launch environment onto fairseq's flags and run ``fairseq-train``."""
    import torch

    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stdout,
                        force=True)  # importing fairseq installs a root handler first; log as fairseq-train does
    args = list(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    try:
        added = distributed_args(os.environ, args, cuda, torch.cuda.device_count() if cuda else 0)
    except ValueError as error:
        raise SystemExit(f"slam-fairseq-train: {error}") from None
    local_tasks = tasks_on_this_node(os.environ)
    if cuda and "--device-id" in added and local_tasks:
        devices = torch.cuda.device_count()
        bound_per_task = devices == 1 and not _started_by_torchrun(os.environ)
        if local_tasks > devices and not bound_per_task:
            raise SystemExit(f"slam-fairseq-train: {local_tasks} processes on this node but {devices} CUDA devices; "
                             "start one process per GPU")
        if devices > 1 and local_tasks < devices:
            logger.warning(f"{local_tasks} processes on this node, which has {devices} CUDA devices: only "
                           f"{local_tasks} of them train. Start one process per GPU (torchrun --nproc_per_node "
                           f"{devices}, srun --ntasks-per-node {devices})")
    added += bf16_args(args, cuda) + _user_dir_args(args)
    if added:
        logger.info(f"slam-fairseq-train adds: {' '.join(added)}")
    sys.argv = ["slam-fairseq-train", *args, *added]
    _run_fairseq_train(wants_bf16_off_tpu(args))


if __name__ == "__main__":
    main()
