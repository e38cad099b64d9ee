"""Preemption-safe resume (``slam_fairseq.checkpoint_recovery``): the readability check, the
replacement of an unreadable ``checkpoint_last.pt``, and real ``fairseq-train`` runs SIGKILLed
inside fairseq's copy onto ``checkpoint_last.pt`` (default run) and, marked slow, at several
moments (inside the copy, right after "Preparing to save", between saves, then a truncated
``checkpoint_last.pt``), each resumed by re-running the same command, ending with the weights and
optimizer state of an uninterrupted run.
"""
from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures as fixtures  # noqa: E402

import slam_fairseq  # noqa: E402,F401  (allow-lists fairseq's checkpoint types)
from slam_fairseq.checkpoint_recovery import (CheckpointRecoveryError, checkpoint_problem,  # noqa: E402
                                              intact_checkpoints, recover_checkpoint_dir)

USER_DIR = str(fixtures.REPO_ROOT / "slam_fairseq")


def _save(path: Path, value: float = 1.0) -> Path:
    torch.save({"model": {"weight": torch.full((64, 64), value)}, "extra_state": {"value": value}}, str(path))
    return path


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


# -- the readability check ----------------------------------------------------------------------------
def test_checkpoint_problem_accepts_an_intact_file_and_names_each_damage(tmp_path):
    intact = _save(tmp_path / "intact.pt")
    assert checkpoint_problem(str(intact)) is None
    size = intact.stat().st_size

    truncated = _save(tmp_path / "truncated.pt")
    _truncate(truncated, size - 3875)  # the kill: 1,458,176 of 1,462,051 bytes
    assert "damaged zip" in checkpoint_problem(str(truncated)) or "not a loadable" in checkpoint_problem(str(truncated))
    for keep in (size // 2, 100, 1):
        _truncate(truncated, keep)
        assert checkpoint_problem(str(truncated)) is not None, keep

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert checkpoint_problem(str(empty)) == "is empty (0 bytes)"

    not_torch = tmp_path / "other.pt"
    with zipfile.ZipFile(not_torch, "w") as archive:
        archive.writestr("archive/readme.txt", "not a checkpoint")
    assert "without the data.pkl entry" in checkpoint_problem(str(not_torch))

    flipped = _save(tmp_path / "flipped.pt")
    with zipfile.ZipFile(flipped) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(flipped.read_bytes())
    name_length, extra_length = struct.unpack("<HH", bytes(data[info.header_offset + 26: info.header_offset + 30]))
    start = info.header_offset + 30 + name_length + extra_length  # the local header's own lengths
    data[start + 5] ^= 0xFF  # one byte of the pickle: the CRC no longer matches
    flipped.write_bytes(bytes(data))
    assert "damaged zip" in checkpoint_problem(str(flipped))
    with pytest.raises(Exception):
        torch.load(str(flipped), weights_only=True)

    legacy = tmp_path / "legacy.pt"
    torch.save({"weight": torch.ones(3)}, str(legacy), _use_new_zipfile_serialization=False)
    assert checkpoint_problem(str(legacy)) is None
    _truncate(legacy, legacy.stat().st_size // 2)
    assert "not a loadable checkpoint" in checkpoint_problem(str(legacy))


# -- replacing checkpoint_last.pt ------------------------------------------------------------------------
def _age(path: Path, seconds_ago: float) -> None:
    moment = time.time() - seconds_ago
    os.utime(path, (moment, moment))


def test_unreadable_last_is_replaced_by_the_newest_intact_checkpoint(tmp_path, caplog):
    _age(_save(tmp_path / "checkpoint_1_2.pt", 2.0), 30)
    _age(_save(tmp_path / "checkpoint1.pt", 4.0), 20)
    newest_but_broken = _save(tmp_path / "checkpoint_2_6.pt", 6.0)
    _truncate(newest_but_broken, 500)
    _age(newest_but_broken, 10)
    _save(tmp_path / "checkpoint_avg.pt", 9.0)  # not a name fairseq's save writes: never a candidate
    last = _save(tmp_path / "checkpoint_last.pt", 6.0)
    _truncate(last, last.stat().st_size - 100)
    corrupt_bytes = last.read_bytes()

    assert intact_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint1.pt"), str(tmp_path / "checkpoint_1_2.pt")]
    with caplog.at_level(logging.WARNING, logger="slam_fairseq.checkpoint_recovery"):
        result = recover_checkpoint_dir(str(tmp_path))
    assert result.action == "replaced" and result.source_path == str(tmp_path / "checkpoint1.pt")
    assert (tmp_path / "checkpoint_last.pt.corrupt").read_bytes() == corrupt_bytes
    restored = torch.load(str(last), weights_only=True)
    assert restored["extra_state"]["value"] == 4.0
    assert f"{last} is a damaged zip" in caplog.text or f"{last} is not a loadable" in caplog.text
    assert f"moved it to {last}.corrupt and resuming from {tmp_path / 'checkpoint1.pt'}" in caplog.text
    assert f"{newest_but_broken}" in caplog.text, "a damaged candidate is reported, not used"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")], "no temporary file is left"

    again = recover_checkpoint_dir(str(tmp_path))  # now readable: nothing to do
    assert again.action == "none"


def test_a_best_checkpoint_cut_by_a_kill_during_its_copy_is_replaced_by_the_save_it_was_copied_from(
        tmp_path, caplog):
    """The save of update 6 was a new best: fairseq wrote checkpoint_2_6.pt, then was killed while
    copying it onto checkpoint_best.pt; checkpoint_last.pt still holds update 4 and is intact."""
    _age(_save(tmp_path / "checkpoint_1_4.pt", 4.0), 30)
    _age(_save(tmp_path / "checkpoint_last.pt", 4.0), 30)
    _age(_save(tmp_path / "checkpoint_2_6.pt", 6.0), 10)
    best = _save(tmp_path / "checkpoint_best.pt", 6.0)
    _truncate(best, best.stat().st_size // 2)
    cut = best.read_bytes()
    with caplog.at_level(logging.WARNING, logger="slam_fairseq.checkpoint_recovery"):
        result = recover_checkpoint_dir(str(tmp_path))
    assert result.action == "none"  # checkpoint_last.pt is readable: resumed as it is
    assert torch.load(str(best), weights_only=True)["extra_state"]["value"] == 6.0
    assert (tmp_path / "checkpoint_best.pt.corrupt").read_bytes() == cut
    assert f"put {tmp_path / 'checkpoint_2_6.pt'}, the newest intact checkpoint" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slam_fairseq.checkpoint_recovery"):
        assert recover_checkpoint_dir(str(tmp_path)).action == "none"
    assert "checkpoint_best" not in caplog.text  # readable now: left alone


def test_a_checkpoint_still_being_written_is_left_alone(tmp_path, caplog):
    """A model loaded in a script while a run copies its save onto checkpoint_last.pt: the
    half-written file must not be replaced under the run (its finished copy would be lost)."""
    import threading

    _age(_save(tmp_path / "checkpoint_1_2.pt", 2.0), 30)
    complete = _save(tmp_path / "checkpoint_2_4.pt", 4.0).read_bytes()
    last = tmp_path / "checkpoint_last.pt"
    last.write_bytes(complete[:200])
    stop = threading.Event()

    def copying():  # fairseq's copy, slowly
        with open(last, "ab") as handle:
            for start in range(200, len(complete), 20):
                if stop.is_set():
                    return
                handle.write(complete[start:start + 20])
                handle.flush()
                time.sleep(0.1)

    writer = threading.Thread(target=copying)
    writer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="slam_fairseq.checkpoint_recovery"):
            result = recover_checkpoint_dir(str(tmp_path))
    finally:
        stop.set()
        writer.join()
    assert result.action == "none" and "is being written" in caplog.text
    assert not (tmp_path / "checkpoint_last.pt.corrupt").exists()


def test_unreadable_last_without_any_intact_checkpoint_is_an_error_that_touches_nothing(tmp_path):
    """No kill leaves this (fairseq writes the first file of a save atomically): damaged storage.
    Starting from scratch would overwrite the save dir, so the run stops and names the file."""
    last = tmp_path / "checkpoint_last.pt"
    last.write_bytes(b"PK\x03\x04 half a checkpoint")
    with pytest.raises(CheckpointRecoveryError, match=rf"{last} .*no other checkpoint in {tmp_path} is intact.*"
                                                      rf"move {last} away"):
        recover_checkpoint_dir(str(tmp_path))
    assert last.read_bytes() == b"PK\x03\x04 half a checkpoint" and not (tmp_path / "checkpoint_last.pt.corrupt").exists()


def test_another_suffixs_best_checkpoints_are_never_candidates(tmp_path):
    """Two runs share a save dir, one with --checkpoint-suffix _b: its
    checkpoint.best_loss_2.3451_b.pt must not replace the other run's checkpoint_last.pt."""
    _age(_save(tmp_path / "checkpoint_1_4.pt", 4.0), 30)
    _save(tmp_path / "checkpoint.best_loss_2.3451_b.pt", 99.0)
    _save(tmp_path / "checkpoint.best_loss_4.1232_2.pt", 97.0)  # suffix "_2": not a value of 4.1232_2
    _save(tmp_path / "checkpoint.best_loss_2.3451-shard0.pt", 98.0)
    _save(tmp_path / "checkpoint.best_loss_2.3452.pt", 5.0)
    assert intact_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint.best_loss_2.3452.pt"),
                                                 str(tmp_path / "checkpoint_1_4.pt")]
    assert intact_checkpoints(str(tmp_path), "_b") == [str(tmp_path / "checkpoint.best_loss_2.3451_b.pt")]


def test_a_copy_killed_during_recovery_leaves_no_temporary_behind_the_next_one(tmp_path):
    from slam_fairseq.checkpoint_recovery import atomic_copy

    source = _save(tmp_path / "checkpoint_1_4.pt", 4.0)
    stale = tmp_path / ".tmp-checkpoint_last.ptab12cd"
    stale.write_bytes(b"x" * 1000)  # what a kill inside an earlier copy left
    atomic_copy(str(source), str(tmp_path / "checkpoint_last.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_4.pt", "checkpoint_last.pt"]


def test_unfinished_checkpoint_writes_of_this_run_left_by_a_kill_are_removed(tmp_path, caplog):
    """fairseq writes each save to ``NAME.pt.tmp`` and renames it: a kill before the rename leaves
    a whole checkpoint's bytes that nothing ever removes; so does a recovery copy killed midway.
    Removed: this --checkpoint-suffix's, any rank's shard, written before this process started.
    Kept: another suffix's, one written since (another process writing now), other files."""
    from slam_fairseq.checkpoint_recovery import remove_interrupted_writes

    _save(tmp_path / "checkpoint_1_4.pt", 4.0)
    leftovers = ["checkpoint_2_8.pt.tmp", "checkpoint_last-shard1.pt.tmp", ".tmp-checkpoint_last.ptab12cd_x",
                 "checkpoint.best_loss_2.3101.pt.tmp", "checkpoint3.pt.tmp"]
    kept = ["checkpoint_last_b.pt.tmp", ".tmp-checkpoint_last_b.ptab12cd", "notes.pt.tmp", "checkpoint_best.pt.tmpx",
            "checkpoint.best_loss_4.1232_2.pt.tmp", "checkpoint.best_loss_4.1232_run_1.pt.tmp"]
    for name in leftovers + kept + ["checkpoint_4_9.pt.tmp"]:
        (tmp_path / name).write_bytes(b"x" * 4096)
    started = time.time()
    for name in leftovers + kept:
        os.utime(tmp_path / name, (started - 60, started - 60))
    os.utime(tmp_path / "checkpoint_4_9.pt.tmp", (started + 1, started + 1))  # being written now
    with caplog.at_level(logging.WARNING):
        removed = remove_interrupted_writes(str(tmp_path), "", written_before=started)
    assert sorted(removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint_1_4.pt", "checkpoint_4_9.pt.tmp", *kept])
    assert f"removed 5 unfinished checkpoint writes a kill left (0 MiB): {', '.join(sorted(leftovers))}" in caplog.text
    assert remove_interrupted_writes(str(tmp_path), "_b", written_before=started) == sorted(kept[:2])
    assert remove_interrupted_writes(str(tmp_path), "_2", written_before=started) == [kept[4]]


def test_missing_or_readable_last_is_left_alone_and_an_explicit_restore_file_is_never_substituted(tmp_path):
    assert recover_checkpoint_dir(str(tmp_path)).action == "none"
    last = _save(tmp_path / "checkpoint_last.pt")
    before = last.read_bytes()
    assert recover_checkpoint_dir(str(tmp_path)).action == "none" and last.read_bytes() == before

    _save(tmp_path / "checkpoint_1_2.pt")
    chosen = _save(tmp_path / "checkpoint_2_6.pt")
    _truncate(chosen, 200)
    with pytest.raises(CheckpointRecoveryError, match=r"--restore-file .*checkpoint_2_6\.pt is .*intact "
                                                      r"checkpoints in .*'checkpoint_1_2\.pt'"):
        recover_checkpoint_dir(str(tmp_path), str(chosen))
    suffixed = _save(tmp_path / "checkpoint_last-shard0.pt")
    _truncate(suffixed, 300)
    _save(tmp_path / "checkpoint_1_2-shard0.pt", 3.0)
    result = recover_checkpoint_dir(str(tmp_path), suffix="-shard0")
    assert result.action == "replaced" and result.source_path == str(tmp_path / "checkpoint_1_2-shard0.pt")


# -- real fairseq-train runs, killed and resumed -------------------------------------------------------------
# A copy in small chunks with pauses, standing in for fairseq's PathManager.copy, so that a kill
# lands inside the copy onto checkpoint_last.pt (on a real disk it lasts milliseconds to minutes).
_SLOW_COPY = (
    "import shutil, time, fairseq.file_io as io\n"
    "def slow_copy(src_path, dst_path, overwrite=False):\n"
    "    with open(src_path, 'rb') as src, open(dst_path, 'wb') as dst:\n"
    "        while True:\n"
    "            chunk = src.read(1 << 16)\n"
    "            if not chunk:\n"
    "                return True\n"
    "            dst.write(chunk); dst.flush(); time.sleep(0.02)\n"
    "io.PathManager.copy = staticmethod(slow_copy)\n"
)
_MAIN = "import sys; from fairseq_cli.train import cli_main; sys.argv[0] = 'fairseq-train'; cli_main()\n"


def _train_args(data_dir: Path, save_dir: Path):
    return [str(data_dir), "--user-dir", USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny",
            "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2", "--batch-size", "8",
            "--max-sentences-speech", "2", "--max-sentences-text", "4", "--max-sentences-pair", "3",
            "--stage2-start-update", "3", "--max-update", "8", "--save-dir", str(save_dir),
            "--no-epoch-checkpoints", "--save-interval-updates", "2", "--disable-validation",
            "--cpu", "--seed", "7", "--log-format", "json", "--log-interval", "1", "--ddp-backend", "legacy_ddp"]


def _start(args, log_path: Path, slow_copy: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fixtures.REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    code = (_SLOW_COPY if slow_copy else "") + _MAIN
    log = open(log_path, "w", encoding="utf-8")
    try:
        return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(fixtures.REPO_ROOT), env=env)
    finally:
        log.close()


def _kill_when(process: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """SIGKILL ``process`` as soon as ``condition()`` holds (polled every 2 ms); False when the
    process ended first. Bounded by ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.kill()
    process.wait()
    raise AssertionError("the run neither reached the kill point nor ended in time")


def _run_to_end(args, log_path: Path) -> str:
    process = _start(args, log_path)
    process.wait(timeout=300)
    output = log_path.read_text(encoding="utf-8")
    assert process.returncode == 0, output[-4000:]
    return output


def _final_state(save_dir: Path):
    state = torch.load(str(save_dir / "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 8
    return state["model"], state["last_optimizer_state"]


def _assert_same_state(expected, actual) -> None:
    expected_model, expected_optimizer = expected
    actual_model, actual_optimizer = actual
    assert expected_model.keys() == actual_model.keys()
    for key in expected_model:
        assert torch.equal(expected_model[key], actual_model[key]), f"{key} differs after the kills"
    for index, moments in expected_optimizer["state"].items():
        for name, value in moments.items():
            other = actual_optimizer["state"][index][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"Adam {name} of {index} differs"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fixtures.build_data_dir(tmp_path_factory.mktemp("recovery") / "data", real_speech=False)


def _kill_inside_the_copy(args, save_dir: Path, log: Path) -> None:
    """SIGKILL while fairseq copies checkpoint_1_2.pt onto checkpoint_last.pt (the first save)."""
    last, first = save_dir / "checkpoint_last.pt", save_dir / "checkpoint_1_2.pt"

    def copy_half_done() -> bool:
        try:
            return first.is_file() and 0 < last.stat().st_size < first.stat().st_size
        except FileNotFoundError:
            return False

    assert _kill_when(_start(args, log, slow_copy=True), copy_half_done)
    assert checkpoint_problem(str(last)) is not None, "the kill left checkpoint_last.pt truncated"


def test_cli_run_killed_inside_the_copy_resumes_to_the_uninterrupted_weights(data_dir, tmp_path):
    """The short variant: one kill, inside the copy onto checkpoint_last.pt, then the same command."""
    if not fixtures.criterion_registered("slam_multitask"):
        pytest.fail("slam_multitask is not registered by the user dir")
    reference_dir, save_dir = tmp_path / "reference", tmp_path / "killed"
    _run_to_end(_train_args(data_dir, reference_dir), tmp_path / "reference.log")
    args = _train_args(data_dir, save_dir)
    _kill_inside_the_copy(args, save_dir, tmp_path / "kill.log")
    output = _run_to_end(args, tmp_path / "final.log")
    last, first = save_dir / "checkpoint_last.pt", save_dir / "checkpoint_1_2.pt"
    assert f"moved it to {last}.corrupt and resuming from {first}, the newest intact checkpoint" in output
    assert "Loaded checkpoint" in output
    _assert_same_state(_final_state(reference_dir), _final_state(save_dir))


@pytest.mark.slow
def test_cli_runs_killed_at_several_moments_resume_to_the_uninterrupted_weights(data_dir, tmp_path):
    """Four interruptions of one run, each followed by the same command (about 40 s of CPU)."""
    if not fixtures.criterion_registered("slam_multitask"):
        pytest.fail("slam_multitask is not registered by the user dir")
    reference_dir, save_dir = tmp_path / "reference", tmp_path / "killed"
    _run_to_end(_train_args(data_dir, reference_dir), tmp_path / "reference.log")
    args = _train_args(data_dir, save_dir)
    last, first = save_dir / "checkpoint_last.pt", save_dir / "checkpoint_1_2.pt"

    # 1. Inside fairseq's copy of checkpoint_1_2.pt onto checkpoint_last.pt (the first save).
    _kill_inside_the_copy(args, save_dir, tmp_path / "kill1.log")

    # 2. Re-run the same command: checkpoint_last.pt is replaced by checkpoint_1_2.pt; killed
    #    right after "Preparing to save" at update 6, wherever that lands in the save.
    log = tmp_path / "kill2.log"
    process = _start(args, log)
    assert _kill_when(process, lambda: "Preparing to save checkpoint for epoch 2 @ 6" in log.read_text())
    output = log.read_text()
    assert f"moved it to {last}.corrupt and resuming from {first}" in output
    assert "Loaded checkpoint" in output and (save_dir / "checkpoint_last.pt.corrupt").is_file()

    # 3. Between saves: after update 7 was logged.
    log = tmp_path / "kill3.log"
    _kill_when(_start(args, log), lambda: '"num_updates": "7"' in log.read_text())

    # 4. A truncated checkpoint_last.pt (the case: a few KB missing at the end).
    if checkpoint_problem(str(last)) is None:
        _truncate(last, last.stat().st_size - 3875)
    output = _run_to_end(args, tmp_path / "final.log")
    assert f"{last} " in output and "resuming from" in output and "newest intact checkpoint" in output

    _assert_same_state(_final_state(reference_dir), _final_state(save_dir))


_RECOVER_AS_RANK = (
    "import sys, torch.distributed as dist\n"
    "import slam_fairseq\n"
    "from slam_fairseq.checkpoint_recovery import recover_checkpoint_dir_on_rank_zero\n"
    "rank, port, save_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
    "dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)\n"
    "try:\n"
    "    recover_checkpoint_dir_on_rank_zero(save_dir)\n"
    "    print('went on')\n"
    "except Exception as error:\n"
    "    print(f'raised {type(error).__name__}: {error}', flush=True)\n"
    "dist.barrier()  # both ranks are done before either tears gloo down (else an abort at exit)\n"
    "dist.destroy_process_group()\n"
)


def test_a_recovery_error_on_rank_zero_stops_every_rank(tmp_path):
    """Rank 0 finds checkpoint_last.pt unreadable and nothing intact: every rank must stop, not
    only rank 0 (the others would wait in fairseq's load for a rank that is gone)."""
    import distributed_helpers as dist_helpers

    (tmp_path / "checkpoint_last.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    port = dist_helpers.free_port()
    commands = [[sys.executable, "-c", _RECOVER_AS_RANK, str(rank), str(port), str(tmp_path)] for rank in range(2)]
    finished = dist_helpers.launch(commands, tmp_path / "logs", dist_helpers.base_env(), timeout=120)
    assert "raised CheckpointRecoveryError: " in finished[0].output and "no other checkpoint" in finished[0].output
    assert "raised CheckpointRecoveryError: rank 0 could not prepare the checkpoint to resume: " \
           "CheckpointRecoveryError: " in finished[1].output
    assert "went on" not in finished[0].output + finished[1].output
