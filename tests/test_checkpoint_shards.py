"""Resume after a kill under ``--ddp-backend fully_sharded --use-sharded-state``
(``slam_fairseq.checkpoint_shards``): every rank's ``checkpoint_last`` shard must come from one
readable save, or another save's complete set is put in place; the names fairseq's ranks use.

fairscale's FSDP needs CUDA (it checks its process group on a CUDA tensor), so these are built
from shard files as fairseq's sharded saves name and fill them, not from a CPU training run.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures as fixtures  # noqa: E402

import slam_fairseq  # noqa: E402,F401  (allow-lists fairseq's checkpoint types)
from slam_fairseq.checkpoint_recovery import CheckpointRecoveryError, recover_checkpoint_dir_on_rank_zero  # noqa: E402
from slam_fairseq.checkpoint_shards import (check_shard_set, rank_checkpoint_suffix,  # noqa: E402
                                            recover_sharded_checkpoint_dir, saved_update, sharded_state_world_size)


def _save_shard(path: Path, update: int, rank: int, seconds_ago: float = 0.0) -> Path:
    """A fairseq-like shard: this rank's part of the weights at ``update``."""
    torch.save({"model": {"weight": torch.full((32, 32), update * 10.0 + rank)},
                "optimizer_history": [{"num_updates": update - 1}, {"num_updates": update}],
                "extra_state": {"rank": rank}}, str(path))
    moment = time.time() - seconds_ago
    os.utime(path, (moment, moment))
    return path


def _save_set(directory: Path, stem: str, update: int, world_size: int, seconds_ago: float) -> None:
    for rank in range(world_size):
        _save_shard(directory / f"{stem}-shard{rank}.pt", update, rank, seconds_ago)


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    old = time.time() - 5  # a finished (killed) write, not one in progress
    os.utime(path, (old, old))
    return data


def _weights(path: Path) -> float:
    return float(torch.load(str(path), weights_only=True)["model"]["weight"][0, 0])


def test_the_suffix_of_each_rank_is_fairseqs():
    assert rank_checkpoint_suffix("", "fully_sharded", True, rank=3) == "-shard3"
    assert rank_checkpoint_suffix("-ft", "fully_sharded", True, rank=0) == "-ft-shard0"
    assert rank_checkpoint_suffix("-ft", "fully_sharded", False, rank=3) == "-ft"
    assert rank_checkpoint_suffix("", "legacy_ddp", True, rank=3) == ""
    assert rank_checkpoint_suffix("", "fully_sharded", True) == "-shard0"  # one process, no process group
    assert sharded_state_world_size("fully_sharded", True) == 1
    assert sharded_state_world_size("fully_sharded", False) == 0
    assert sharded_state_world_size("c10d", True) == 0


def test_saved_update_reads_the_optimizer_history(tmp_path):
    assert saved_update(str(_save_shard(tmp_path / "a.pt", 40, 0))) == 40
    torch.save({"model": {}}, str(tmp_path / "b.pt"))
    assert saved_update(str(tmp_path / "b.pt")) is None


def test_a_complete_set_of_last_shards_is_used_as_it_is(tmp_path):
    _save_set(tmp_path, "checkpoint_2_40", 40, 2, 20)
    _save_set(tmp_path, "checkpoint_last", 40, 2, 20)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2)
    assert result.action == "none" and not result.problems
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert recover_sharded_checkpoint_dir(str(tmp_path / "empty"), "checkpoint_last.pt", "", 2).action == "none"


def test_a_kill_during_one_ranks_copy_resumes_every_rank_from_that_save(tmp_path, caplog):
    """Update 40 was saved: both ranks wrote checkpoint_2_40-shard<r>.pt; rank 0 finished its copy
    onto checkpoint_last-shard0.pt, rank 1 was killed inside its copy."""
    _save_set(tmp_path, "checkpoint_1_20", 20, 2, 60)
    _save_set(tmp_path, "checkpoint_2_40", 40, 2, 10)
    _save_shard(tmp_path / "checkpoint_last-shard0.pt", 40, 0, 10)
    cut = _truncate(_save_shard(tmp_path / "checkpoint_last-shard1.pt", 40, 1))
    with caplog.at_level(logging.WARNING, logger="slam_fairseq.checkpoint_shards"):
        result = recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2)
    assert result.action == "replaced"
    assert result.source_paths == [str(tmp_path / f"checkpoint_2_40-shard{r}.pt") for r in range(2)]
    assert [_weights(tmp_path / f"checkpoint_last-shard{r}.pt") for r in range(2)] == [400.0, 401.0]
    assert (tmp_path / "checkpoint_last-shard1.pt.corrupt").read_bytes() == cut
    assert (tmp_path / "checkpoint_last-shard0.pt.mismatched").is_file()
    assert ("checkpoint_last-shard1.pt is a damaged zip" in caplog.text
            or "checkpoint_last-shard1.pt is not a loadable checkpoint" in caplog.text)
    assert "(update 40), the newest complete set" in caplog.text
    assert recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2).action == "none"


def test_readable_last_shards_of_different_updates_are_not_loaded_together(tmp_path, caplog):
    """Rank 1 was killed before it wrote its shard of update 40: its checkpoint_last shard still
    holds update 20, readable. fairseq would load a model of two updates; the last complete save
    (update 20) is used on every rank instead."""
    _save_set(tmp_path, "checkpoint_1_20", 20, 2, 60)
    _save_shard(tmp_path / "checkpoint_2_40-shard0.pt", 40, 0, 10)
    _save_shard(tmp_path / "checkpoint_last-shard0.pt", 40, 0, 10)
    _save_shard(tmp_path / "checkpoint_last-shard1.pt", 20, 1, 60)
    assert set(check_shard_set([str(tmp_path / f"checkpoint_last-shard{r}.pt") for r in range(2)]).problems) == {
        str(tmp_path / f"checkpoint_last-shard{r}.pt") for r in range(2)}
    with caplog.at_level(logging.WARNING, logger="slam_fairseq.checkpoint_shards"):
        result = recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2)
    assert result.action == "replaced"
    assert [_weights(tmp_path / f"checkpoint_last-shard{r}.pt") for r in range(2)] == [200.0, 201.0]
    assert "holds update 40" in caplog.text and "holds update 20" in caplog.text
    assert "checkpoint_2_40-shard*.pt" not in caplog.text  # an incomplete save is not even a candidate
    assert sorted(p.name for p in tmp_path.glob("*.mismatched")) == [
        "checkpoint_last-shard0.pt.mismatched", "checkpoint_last-shard1.pt.mismatched"]


def test_a_missing_last_shard_is_a_damaged_set(tmp_path):
    """The first save: rank 1 was killed before its copy began; rank 0's shard alone would start
    rank 0 from update 20 and rank 1 from scratch."""
    _save_set(tmp_path, "checkpoint_1_20", 20, 2, 30)
    _save_shard(tmp_path / "checkpoint_last-shard0.pt", 20, 0, 30)
    result = recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2)
    assert result.action == "replaced"
    assert result.problems == {str(tmp_path / "checkpoint_last-shard1.pt"): "is missing"}
    assert [_weights(tmp_path / f"checkpoint_last-shard{r}.pt") for r in range(2)] == [200.0, 201.0]


def test_without_a_complete_set_the_run_stops_and_touches_nothing(tmp_path):
    """A fresh start would overwrite the save dir, so an error names the shards and says how to
    keep a complete save."""
    _save_shard(tmp_path / "checkpoint_1_20-shard0.pt", 20, 0, 30)
    _truncate(_save_shard(tmp_path / "checkpoint_1_20-shard1.pt", 20, 1))
    _save_shard(tmp_path / "checkpoint_last-shard0.pt", 20, 0, 30)
    _truncate(_save_shard(tmp_path / "checkpoint_last-shard1.pt", 20, 1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointRecoveryError, match=r"checkpoint_last-shard1\.pt is .*no other save in .* has all 2 "
                                                      r"shards readable and from one update.*--keep-interval-updates 2.*"
                                                      r"move these files away"):
        recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_state_of_fewer_ranks_is_an_error_not_a_damaged_set(tmp_path):
    """Resuming a 2-rank sharded state on 4 ranks: shards 2 and 3 are not missing by a kill; the
    2-rank save is intact and must not be set aside."""
    _save_set(tmp_path, "checkpoint_1_20", 20, 2, 30)
    _save_set(tmp_path, "checkpoint_last", 20, 2, 30)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointRecoveryError, match=r"checkpoint_last-shard1\.pt: a sharded state "
                                                      r"\(--use-sharded-state\) of 2 ranks; this run has 4"):
        recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 4)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_best_shards_of_two_updates_are_set_aside(tmp_path, caplog):
    """Update 40 was a new best; rank 1 was killed before it wrote its shard of it, so its
    checkpoint_best shard still holds the best of update 20."""
    _save_set(tmp_path, "checkpoint_last", 40, 2, 10)
    _save_shard(tmp_path / "checkpoint_best-shard0.pt", 40, 0, 10)
    _save_shard(tmp_path / "checkpoint_best-shard1.pt", 20, 1, 60)
    with caplog.at_level(logging.WARNING, logger="slam_fairseq.checkpoint_shards"):
        assert recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2).action == "none"
    assert not list(tmp_path.glob("checkpoint_best-shard?.pt"))
    assert len(list(tmp_path.glob("checkpoint_best-shard?.pt.mismatched"))) == 2
    assert "the checkpoint_best shards hold different updates" in caplog.text


def test_shards_of_more_ranks_than_this_run_are_an_error(tmp_path):
    _save_set(tmp_path, "checkpoint_last", 20, 4, 30)
    with pytest.raises(CheckpointRecoveryError, match=r"checkpoint_last-shard2\.pt, .*checkpoint_last-shard3\.pt: "
                                                      r"shards beyond this run's 2 ranks"):
        recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2)


def test_an_explicit_restore_file_is_checked_not_substituted(tmp_path):
    _save_set(tmp_path, "checkpoint_1_20", 20, 2, 30)
    _save_shard(tmp_path / "chosen-shard0.pt", 30, 0)
    cut = _truncate(_save_shard(tmp_path / "chosen-shard1.pt", 30, 1))
    with pytest.raises(CheckpointRecoveryError, match=r"--restore-file .*chosen\.pt \(sharded state\): .*"
                                                      r"chosen-shard1\.pt is (a damaged zip|not a loadable)"):
        recover_sharded_checkpoint_dir(str(tmp_path), str(tmp_path / "chosen.pt"), "", 2)
    assert (tmp_path / "chosen-shard1.pt").read_bytes() == cut


def test_the_checkpoint_suffix_comes_before_the_shard(tmp_path):
    _save_set(tmp_path, "checkpoint_2_40-ft", 40, 2, 10)
    _save_set(tmp_path, "checkpoint_2_40", 99, 2, 5)  # another suffix's run: never a candidate
    _save_shard(tmp_path / "checkpoint_last-ft-shard0.pt", 40, 0, 10)
    _truncate(_save_shard(tmp_path / "checkpoint_last-ft-shard1.pt", 40, 1))
    result = recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "-ft", 2)
    assert result.action == "replaced"
    assert [_weights(tmp_path / f"checkpoint_last-ft-shard{r}.pt") for r in range(2)] == [400.0, 401.0]


def test_a_damaged_best_shard_is_repaired_from_its_ranks_save(tmp_path):
    _save_set(tmp_path, "checkpoint_2_40", 40, 2, 10)
    _save_set(tmp_path, "checkpoint_last", 40, 2, 10)
    _save_shard(tmp_path / "checkpoint_best-shard0.pt", 40, 0, 10)
    _truncate(_save_shard(tmp_path / "checkpoint_best-shard1.pt", 40, 1))
    assert recover_sharded_checkpoint_dir(str(tmp_path), "checkpoint_last.pt", "", 2).action == "none"
    assert _weights(tmp_path / "checkpoint_best-shard1.pt") == 401.0


def test_the_run_recovers_its_shards_on_rank_zero_from_its_flags(tmp_path):
    """``recover_for_training_args`` (fine-tuning) and the pre-training task route a
    ``--use-sharded-state`` run here; one process is rank 0 of a world of 1."""
    from slam_fairseq.checkpoint_recovery import recover_for_training_args

    _save_shard(tmp_path / "checkpoint_1_20-shard0.pt", 20, 0, 30)
    _truncate(_save_shard(tmp_path / "checkpoint_last-shard0.pt", 20, 0))
    args = SimpleNamespace(save_dir=str(tmp_path), restore_file="checkpoint_last.pt", checkpoint_suffix="",
                           ddp_backend="fully_sharded", use_sharded_state=True, path=None)
    result = recover_for_training_args(args)
    assert result.action == "replaced" and _weights(tmp_path / "checkpoint_last-shard0.pt") == 200.0
    assert recover_checkpoint_dir_on_rank_zero(str(tmp_path), "checkpoint_last.pt", "", shards=1).action == "none"


def test_the_pretraining_task_recovers_sharded_state_before_fairseq_loads(tmp_path):
    from slam_fairseq.tasks.slam_pretraining import SlamPretrainingConfig, SlamPretrainingTask

    data = fixtures.build_data_dir(tmp_path / "data", real_speech=False, num_speech=4)
    save = tmp_path / "save"
    save.mkdir()
    _save_shard(save / "checkpoint_1_20-shard0.pt", 20, 0, 30)
    _truncate(_save_shard(save / "checkpoint_last-shard0.pt", 20, 0))
    config = SlamPretrainingConfig(data=str(data), seed=1, max_update=10, train_subset="train", save_dir=str(save),
                                   restore_file="checkpoint_last.pt", checkpoint_suffix="",
                                   ddp_backend="fully_sharded", use_sharded_state=True)
    SlamPretrainingTask.setup_task(config)
    assert _weights(save / "checkpoint_last-shard0.pt") == 200.0
    assert (save / "checkpoint_last-shard0.pt.corrupt").is_file()


def test_the_restore_check_of_fine_tuning_sees_this_ranks_shard(tmp_path):
    from slam_fairseq.compat.fairseq_internals import weights_restored_by_fairseq

    _save_shard(tmp_path / "checkpoint_last-shard0.pt", 20, 0)
    args = SimpleNamespace(save_dir=str(tmp_path), restore_file="checkpoint_last.pt", checkpoint_suffix="",
                           ddp_backend="fully_sharded", use_sharded_state=True, path=None, continue_once=None,
                           finetune_from_model=None)
    assert weights_restored_by_fairseq(SimpleNamespace(args=args)) == (
        f"fairseq-train resumes from {tmp_path / 'checkpoint_last-shard0.pt'}")
    args.use_sharded_state = False
    assert weights_restored_by_fairseq(SimpleNamespace(args=args)) is None
