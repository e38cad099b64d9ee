"""``slam_fairseq.launch``: torchrun and SLURM environments -> fairseq's distributed flags
(a pure function), the warning for ``torchrun ... fairseq-train``, and (slow) two processes with
SLURM's variables. The real ``torchrun --nproc_per_node 2 -m slam_fairseq.launch`` CPU run is in
tests/test_distributed.py (it is also the 2-rank side of the --update-freq comparison)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_helpers as dist  # noqa: E402
import pretraining_fixtures  # noqa: E402

from slam_fairseq.launch import (bf16_args, distributed_args, first_slurm_host,  # noqa: E402
                                 wants_bf16_off_tpu, warn_if_launched_without_mapping)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
         "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08,11],login1", "SLURM_NNODES": "3"}


def _flags(args):
    """Flag -> value ("" for a switch) of a flat argument list."""
    parsed, index = {}, 0
    while index < len(args):
        flag = args[index]
        has_value = index + 1 < len(args) and not args[index + 1].startswith("--")
        parsed[flag] = args[index + 1] if has_value else ""
        index += 2 if has_value else 1
    return parsed


def test_torchrun_on_cpu():
    added = distributed_args(TORCHRUN, ["DATA", "--arch", "slam_tiny"], cuda_available=False)
    assert _flags(added) == {"--distributed-world-size": "8", "--distributed-rank": "3",
                             "--distributed-no-spawn": "", "--distributed-init-method": "tcp://10.0.0.5:29400",
                             "--distributed-backend": "gloo", "--ddp-backend": "legacy_ddp", "--cpu": ""}


def test_torchrun_on_cuda_uses_nccl_and_the_local_rank_as_device():
    flags = _flags(distributed_args(TORCHRUN, ["DATA"], cuda_available=True, cuda_device_count=2))
    assert flags["--distributed-backend"] == "nccl" and flags["--device-id"] == "1"
    assert "--cpu" not in flags and flags["--distributed-rank"] == "3"
    # --cpu on a GPU machine: gloo, no device
    flags = _flags(distributed_args(TORCHRUN, ["DATA", "--cpu"], cuda_available=True))
    assert flags["--distributed-backend"] == "gloo" and "--device-id" not in flags and "--cpu" not in flags


def test_slurm_ranks_and_the_first_node_as_rendezvous():
    flags = _flags(distributed_args(SLURM, ["DATA"], cuda_available=True, cuda_device_count=8))
    assert flags["--distributed-world-size"] == "16" and flags["--distributed-rank"] == "5"
    assert flags["--device-id"] == "5"
    assert flags["--distributed-init-method"] == f"tcp://gpu07:{20000 + 123456 % 20000}"
    with_master = dict(SLURM, MASTER_ADDR="head", MASTER_PORT="4000")
    assert _flags(distributed_args(with_master, [], True))["--distributed-init-method"] == "tcp://head:4000"
    # torchrun inside an srun allocation: torchrun's variables describe the processes
    both = dict(SLURM, **TORCHRUN)
    assert _flags(distributed_args(both, [], False))["--distributed-world-size"] == "8"


def test_slurm_node_lists():
    assert first_slurm_host("gpu[07-08,11],login1") == "gpu07"
    assert first_slurm_host("node5,node6") == "node5"
    assert first_slurm_host("rack[2-3]-n[1,4],x9") == "rack2-n1"
    assert first_slurm_host("a-ib[010,003]") == "a-ib010"
    for bad in ("", "gpu[1-2"):
        with pytest.raises(ValueError, match="no host"):
            first_slurm_host(bad)


def test_flags_the_user_gave_win():
    argv = ["DATA", "--ddp-backend", "c10d", "--distributed-backend=mpi", "--distributed-init-method",
            "env://", "--local_rank", "0"]
    flags = _flags(distributed_args(TORCHRUN, argv, cuda_available=True))
    assert "--ddp-backend" not in flags and "--distributed-backend" not in flags
    assert "--distributed-init-method" not in flags and "--device-id" not in flags
    assert flags["--distributed-world-size"] == "8"
    # the same world size and rank as the environment are fine, and not repeated
    same = _flags(distributed_args(TORCHRUN, ["--distributed-world-size", "8", "--distributed-rank", "3"], False))
    assert "--distributed-world-size" not in same and "--distributed-rank" not in same


def test_contradictions_and_bad_variables_are_errors():
    with pytest.raises(ValueError, match="--distributed-world-size 4 contradicts the launch environment"):
        distributed_args(TORCHRUN, ["--distributed-world-size", "4"], False)
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not an integer"):
        distributed_args(dict(TORCHRUN, WORLD_SIZE="two"), [], False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed_args({"RANK": "0", "WORLD_SIZE": "2"}, [], False)
    with pytest.raises(ValueError, match="rank 9 is outside the world size 8"):
        distributed_args(dict(TORCHRUN, RANK="9"), [], False)
    for backend in ("c10d", "pytorch_ddp", "fully_sharded"):
        with pytest.raises(ValueError, match=f"--ddp-backend {backend} cannot run on the CPU.*legacy_ddp"):
            distributed_args(TORCHRUN, ["--ddp-backend", backend], cuda_available=False)
    with pytest.raises(ValueError, match="--distributed-rank 'x' is not an integer"):
        distributed_args(TORCHRUN, ["--distributed-rank=x"], False)
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        distributed_args({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}, [], False)


def test_slurm_tasks_that_no_srun_step_started_are_an_error():
    """A batch script (or an salloc shell) of 16 tasks has SLURM_NTASKS=16 and SLURM_PROCID=0 but
    no step: mapped as rank 0 of 16, the one process would wait for 15 ranks nothing starts."""
    batch = {key: value for key, value in SLURM.items() if key != "SLURM_STEP_NUM_TASKS"}
    with pytest.raises(ValueError, match=r"SLURM_NTASKS=16, but this process is not a task of an srun step.*"
                                         r"srun slam-fairseq-train"):
        distributed_args(dict(batch, SLURM_PROCID="0"), ["DATA"], True, 8)
    assert distributed_args({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, ["DATA"], True, 1) == []
    # the step's own count wins over the job's (a step of 8 tasks in a job of 16)
    step = dict(SLURM, SLURM_STEP_NUM_TASKS="8")
    assert _flags(distributed_args(step, ["DATA"], True, 8))["--distributed-world-size"] == "8"


def test_a_process_bound_to_its_own_gpu_uses_device_0():
    """``srun --gpus-per-task 1``: SLURM_LOCALID 5, one visible GPU (CUDA_VISIBLE_DEVICES=5)."""
    assert _flags(distributed_args(SLURM, ["DATA"], True, cuda_device_count=1))["--device-id"] == "0"
    with pytest.raises(ValueError, match="local rank 5 but this process sees 4 CUDA devices"):
        distributed_args(SLURM, ["DATA"], True, cuda_device_count=4)
    # torchrun has no per-task binding: two processes on one visible GPU is an error
    with pytest.raises(ValueError, match="local rank 1 but this process sees 1 CUDA devices: start one process per GPU$"):
        distributed_args(TORCHRUN, ["DATA"], True, cuda_device_count=1)


def test_tasks_on_this_node_from_torchrun_or_the_srun_step():
    from slam_fairseq.launch import tasks_on_this_node

    assert tasks_on_this_node({"LOCAL_WORLD_SIZE": "4"}) == 4
    step = {"SLURM_STEP_TASKS_PER_NODE": "8(x2),1", "SLURM_NODEID": "1"}
    assert tasks_on_this_node(step) == 8
    assert tasks_on_this_node(dict(step, SLURM_NODEID="2")) == 1
    assert tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_NODEID": "0"}) == 1
    assert tasks_on_this_node({}) is None and tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "odd"}) is None


def test_no_launcher_or_a_single_process_adds_nothing():
    assert distributed_args({}, ["DATA"], True) == []
    assert distributed_args(dict(TORCHRUN, WORLD_SIZE="1", RANK="0"), ["DATA"], False) == []
    assert distributed_args({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, ["DATA"], False) == []


def test_fully_sharded_in_one_cuda_process_gets_a_one_process_rendezvous():
    """fairscale's FSDP needs a process group; fairseq makes one only when given an init method."""
    flags = _flags(distributed_args({}, ["DATA", "--ddp-backend", "fully_sharded"], cuda_available=True))
    port = flags.pop("--distributed-init-method")
    assert port.startswith("tcp://127.0.0.1:") and int(port.rsplit(":", 1)[1]) > 0
    assert flags == {"--distributed-world-size": "1", "--distributed-rank": "0", "--distributed-no-spawn": "",
                     "--device-id": "0", "--distributed-backend": "nccl"}
    single = dict(TORCHRUN, WORLD_SIZE="1", RANK="0")
    assert "--distributed-init-method" in _flags(distributed_args(single, ["--ddp-backend=fully_sharded"], True))
    # what the command already says wins; nothing for other backends
    given = ["--ddp-backend", "fully_sharded", "--distributed-init-method", "tcp://h:1"]
    assert distributed_args({}, given, True) == []
    assert distributed_args({}, ["--ddp-backend", "legacy_ddp"], True) == []
    # on the CPU, one process too: refused with the reason, not fairscale's process-group error
    for argv, cuda in ((["--ddp-backend", "fully_sharded", "--cpu"], True), (["--ddp-backend", "fully_sharded"], False)):
        with pytest.raises(ValueError, match="--ddp-backend fully_sharded cannot run on the CPU.*legacy_ddp"):
            distributed_args({}, argv, cuda)
    # several GPUs: fairseq starts one process per GPU itself, unless the command asks for one
    assert distributed_args({}, ["--ddp-backend", "fully_sharded"], True, cuda_device_count=8) == []
    one_of_eight = ["--ddp-backend", "fully_sharded", "--distributed-world-size", "1"]
    assert _flags(distributed_args({}, one_of_eight, True, cuda_device_count=8))["--device-id"] == "0"
    assert distributed_args({}, ["--ddp-backend", "fully_sharded", "--distributed-world-size", "2"], True) == []


def test_bf16_trains_off_a_tpu_and_without_cuda_skips_the_flat_master_buffer():
    assert wants_bf16_off_tpu(["DATA", "--bf16"]) and wants_bf16_off_tpu(["--memory-efficient-bf16"])
    assert not wants_bf16_off_tpu(["DATA", "--bf16", "--tpu"]) and not wants_bf16_off_tpu(["DATA", "--fp16"])
    assert bf16_args(["DATA", "--bf16"], cuda_available=False) == ["--fp16-no-flatten-grads"]
    assert bf16_args(["DATA", "--bf16", "--cpu"], cuda_available=True) == ["--fp16-no-flatten-grads"]
    assert bf16_args(["DATA", "--bf16"], cuda_available=True) == []
    assert bf16_args(["DATA", "--bf16", "--fp16-no-flatten-grads"], cuda_available=False) == []
    assert bf16_args(["DATA", "--fp16"], cuda_available=False) == []


def test_warning_for_torchrun_fairseq_train(caplog):
    with caplog.at_level(logging.WARNING, logger="slam_fairseq.launch"):
        assert warn_if_launched_without_mapping({"WORLD_SIZE": "2"}, ["/usr/bin/fairseq-train", "DATA"])
        assert "each process trains alone" in caplog.text and "slam-fairseq-train" in caplog.text
        caplog.clear()
        assert warn_if_launched_without_mapping({"WORLD_SIZE": "2"},
                                                ["fairseq-train", "DATA", "--distributed-world-size", "2"])
        assert "ZeroDivisionError" in caplog.text
    assert not warn_if_launched_without_mapping({"WORLD_SIZE": "1"}, ["fairseq-train"])
    assert not warn_if_launched_without_mapping({}, ["fairseq-train"])
    assert not warn_if_launched_without_mapping({"WORLD_SIZE": "2"}, ["fairseq-train", "--distributed-init-method",
                                                                      "tcp://h:1"])
    assert not warn_if_launched_without_mapping({"WORLD_SIZE": "2"}, ["-m", "DATA"])  # python -m slam_fairseq.launch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return pretraining_fixtures.build_data_dir(tmp_path_factory.mktemp("launch") / "data", real_speech=False)


def _pretraining_args(data_dir: Path, save_dir: Path):
    # no --user-dir: the launcher adds it
    return [str(data_dir), "--task", "slam_pretraining", "--arch", "slam_tiny", "--criterion", "slam_multitask",
            "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "4", "--max-sentences-speech", "2",
            "--max-update", "3", "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--seed", "3",
            "--num-workers", "0", "--log-format", "json", "--log-interval", "1"]


@pytest.mark.slow
def test_slurm_two_cpu_tasks_through_the_launcher(data_dir, tmp_path):
    """Two tasks as ``srun --ntasks 2`` starts them (the SLURM variables set by hand). Slow (two
    more processes); the mapping is covered above and a real torchrun launch in test_distributed."""
    port, hash_dir = dist.free_port(), tmp_path / "hashes"
    command = [sys.executable, "-m", "slam_fairseq.launch", *_pretraining_args(data_dir, tmp_path / "ckpt")]
    env = dist.hash_env(dist.base_env(), hash_dir)
    envs = [dict(env, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID=str(rank),
                 SLURM_JOB_ID="77",
                 SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port)) for rank in range(2)]
    finished = dist.launch_each([command, command], envs, tmp_path / "logs", timeout=240)
    assert "training on 2 devices" in finished[0].output
    hashes = dist.read_hashes(hash_dir)
    assert [update for update, _ in hashes[0]] == [1, 2, 3] and hashes[0] == hashes[1]


def test_the_plugin_warns_on_import_under_torchrun_without_the_launcher():
    """What ``torchrun --nproc_per_node 2 fairseq-train DATA --user-dir slam_fairseq`` meets when
    fairseq imports the user dir (fairseq-train has configured logging by then)."""
    import subprocess

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
            "sys.argv = ['/usr/bin/fairseq-train', 'DATA', '--user-dir', 'slam_fairseq']; import slam_fairseq")
    env = dist.base_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING:slam_fairseq.launch:started with WORLD_SIZE=2 but without fairseq's distributed flags" \
        in result.stderr
    assert "slam-fairseq-train" in result.stderr


def _first_losses(output: str):
    return [float(record["loss"]) for record in dist.json_records(output, "train_inner")]


def test_the_launcher_trains_in_bf16_where_fairseq_train_would_look_for_a_tpu(data_dir, tmp_path):
    """``slam-fairseq-train --bf16`` on the CPU: fairseq's bf16 training (model and batches in
    bfloat16, float32 master weights), not its TPU path; the same run in float32 for reference."""
    import subprocess

    env = dist.base_env()
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        command = [sys.executable, "-m", "slam_fairseq.launch", *_pretraining_args(data_dir, tmp_path / name),
                   "--cpu", "--stage2-start-update", "0", "--no-save", *extra]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = result.stdout + result.stderr
    assert "--bf16 without --tpu: training in bfloat16 on the CPU" in runs["bf16"]
    assert "'bf16': True" in runs["bf16"] and "'tpu': False" in runs["bf16"]
    assert "--fp16-no-flatten-grads" in runs["bf16"]
    fp32, bf16 = _first_losses(runs["fp32"]), _first_losses(runs["bf16"])
    assert len(fp32) == len(bf16) == 3, (fp32, bf16)
    # the same data and seed: bfloat16 arithmetic changes the loss a little, and only a little
    assert fp32[0] != bf16[0] and abs(fp32[0] - bf16[0]) < 0.05 * fp32[0], (fp32, bf16)
    assert all(loss == loss for loss in bf16)


def test_python_m_launch_runs_without_runpy_s_warning():
    """``torchrun -m slam_fairseq.launch`` imports the package first; the package must not import
    the launcher itself (runpy then warns that 'slam_fairseq.launch' was found in sys.modules)."""
    import subprocess

    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "slam_fairseq.launch", "--help"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "found in sys.modules" not in run.stderr and "usage: slam-fairseq-train" in run.stdout
