"""What fairseq-train remembers of validation scores, restarted when their stage changes
(``slam_fairseq.tasks.validation_scores``): which metrics restart, the stage of a resumed run
without one saved, ``--keep-best-checkpoints`` files, and the places fairseq keeps a best."""
import sys

import pytest
import torch

import slam_fairseq  # noqa: F401  (tracks fairseq's plateau schedulers)
from slam_fairseq.compat.fairseq_internals import forget_best_validation_scores
from slam_fairseq.tasks.validation_scores import (SCORES_STAGE_KEY, ValidationScores, check_best_checkpoint_metric,
                                                  metric_modality)


@pytest.fixture
def fairseq_best():
    """fairseq-train's three memories of past scores, set as after a few validations."""
    from fairseq import checkpoint_utils
    from fairseq.optim.lr_scheduler.reduce_lr_on_plateau import (ReduceLROnPlateauLRSchedule,
                                                                 ReduceLROnPlateauLRScheduleConfig)
    import fairseq_cli.train as train

    from fairseq.optim.adam import FairseqAdam
    from omegaconf import OmegaConf

    optimizer = FairseqAdam(OmegaConf.create({"lr": [1.0], "adam_betas": "(0.9, 0.999)", "adam_eps": 1e-8,
                                              "weight_decay": 0.0, "use_old_adam": True, "fp16_adam_stats": False,
                                              "tpu": False}), [torch.nn.Parameter(torch.zeros(1))])
    plateau_cfg = OmegaConf.create(dict(vars(ReduceLROnPlateauLRScheduleConfig()), lr=[1.0], lr_patience=5,
                                        maximize_best_checkpoint_metric=False, warmup_init_lr=-1.0))
    plateau = ReduceLROnPlateauLRSchedule(plateau_cfg, optimizer)
    plateau.lr_scheduler.step(10.0)
    plateau.lr_scheduler.step(12.0)  # one bad epoch
    checkpoint_utils.save_checkpoint.best = 10.0
    train.should_stop_early.best, train.should_stop_early.num_runs = 10.0, 1
    yield checkpoint_utils.save_checkpoint, train.should_stop_early, plateau.lr_scheduler
    for holder in (checkpoint_utils.save_checkpoint, train.should_stop_early):
        if hasattr(holder, "best"):
            del holder.best


def test_forgetting_clears_the_best_checkpoint_patience_and_plateau(fairseq_best):
    save_checkpoint, should_stop_early, plateau = fairseq_best
    assert plateau.best == 10.0 and plateau.num_bad_epochs == 1
    forget_best_validation_scores()
    assert not hasattr(save_checkpoint, "best") and not hasattr(should_stop_early, "best")
    assert should_stop_early.num_runs == 0
    assert plateau.best == float("inf") and plateau.num_bad_epochs == 0 and plateau.cooldown_counter == 0


def test_the_summed_loss_restarts_at_another_stage_and_an_objectives_own_metric_does_not(fairseq_best, tmp_path):
    save_checkpoint, _, _ = fairseq_best
    state = {SCORES_STAGE_KEY: 1}
    scores = ValidationScores(state, str(tmp_path))
    objective = {"span_masking_loss": 3.0, "best_span_masking_loss": 2.5}
    scores.validated(2, objective, "span_masking_loss")
    assert save_checkpoint.best == 10.0 and objective["best_span_masking_loss"] == 2.5  # the same objective
    state[SCORES_STAGE_KEY] = 1
    summed = {"loss": 30.0, "best_loss": 10.0}
    scores.validated(2, summed, "loss")
    assert not hasattr(save_checkpoint, "best") and summed["best_loss"] == 30.0 and state[SCORES_STAGE_KEY] == 2
    save_checkpoint.best = 30.0
    scores.validated(2, {"loss": 29.0, "best_loss": 29.0}, "loss")
    assert save_checkpoint.best == 30.0, "the same stage: nothing forgotten"


def test_without_a_saved_stage_the_stage_of_the_last_update_before_the_resume_is_used(fairseq_best, tmp_path):
    """A resume with --reset-dataloader (or a checkpoint from before the key) saves no stage: the
    task tells the stage of the update before the one it resumes at."""
    save_checkpoint, _, _ = fairseq_best
    scores = ValidationScores({}, str(tmp_path))
    scores.start_stage = 1
    scores.validated(2, {"loss": 30.0}, "loss")
    assert not hasattr(save_checkpoint, "best")
    save_checkpoint.best = 5.0
    fresh = ValidationScores({}, str(tmp_path))  # nothing known at all: nothing forgotten
    fresh.validated(2, {"loss": 30.0}, "loss")
    assert save_checkpoint.best == 5.0


def test_keep_best_checkpoints_files_of_the_old_stage_are_renamed(fairseq_best, tmp_path, caplog):
    for name in ("checkpoint.best_loss_18.5720.pt", "checkpoint.best_loss_19.1000.pt", "checkpoint_best.pt",
                 "checkpoint.best_stm_accuracy_0.5000.pt"):
        (tmp_path / name).write_bytes(b"x")
    scores = ValidationScores({SCORES_STAGE_KEY: 1}, str(tmp_path))
    scores.validated(2, {"loss": 30.0}, "loss")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint.best_stm_accuracy_0.5000.pt", "checkpoint.stage1_best_loss_18.5720.pt",
        "checkpoint.stage1_best_loss_19.1000.pt", "checkpoint_best.pt"]
    assert "validation scores restart at stage 2" in caplog.text and "checkpoint.stage1_best_loss_18.5720.pt" in caplog.text


def test_metric_names_and_the_modalities_that_log_them():
    assert metric_modality("loss") is None and metric_modality("wpb") is None
    assert metric_modality("stm_accuracy") == "pair" and metric_modality("span_masking_loss") == "text"
    assert metric_modality("code_perplexity") == "speech" and metric_modality("nsentences_pair") == "pair"
    check_best_checkpoint_metric("stm_accuracy", ["pair", "speech", "text"])
    check_best_checkpoint_metric("${checkpoint.best_checkpoint_metric}")  # not from a command line
    with pytest.raises(ValueError, match="stm_acc: no slam_multitask validation logs it") as refused:
        check_best_checkpoint_metric("stm_acc")
    assert "stm_accuracy" in str(refused.value) and "pair_ctc_loss" in str(refused.value)
    # the names offered are this run's scores: no pair objective without pairs, no pair CTC without
    # its head, none of fairseq's throughput counters
    with pytest.raises(ValueError, match="stm_acc") as refused:
        check_best_checkpoint_metric("stm_acc", ["speech", "text"], pair_ctc=False)
    offered = str(refused.value).split("log are ")[1].split(", ")
    assert "loss" in offered and "msm_contrastive_loss" in offered and "span_masking_loss" in offered
    assert not {"stm_accuracy", "pair_ctc_loss", "bsz", "wps", "stage"} & set(offered)
    with pytest.raises(ValueError, match="logged by pair batches, which no stage of this run trains"):
        check_best_checkpoint_metric("stm_accuracy", ["speech", "text"])
    with pytest.raises(ValueError, match="no pair CTC head"):
        check_best_checkpoint_metric("pair_ctc_loss", ["pair"], pair_ctc=False)


def test_under_sharded_state_each_rank_renames_its_own_best_files(fairseq_best, tmp_path, monkeypatch):
    """``--use-sharded-state``: every rank writes ``checkpoint.best_<metric>_<value>-shard<rank>.pt``
    and renames its own (rank 0 renaming all could take a file another rank is writing). Run as
    rank 1 of a process group; without sharded state rank 1 renames nothing."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    names = ("checkpoint.best_loss_18.5720-shard0.pt", "checkpoint.best_loss_18.5720-shard1.pt")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    ValidationScores({SCORES_STAGE_KEY: 1}, str(tmp_path), "-shard1").validated(2, {"loss": 30.0}, "loss")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names)
    scores = ValidationScores({SCORES_STAGE_KEY: 1}, str(tmp_path), "-shard1", per_rank_files=True)
    scores.validated(2, {"loss": 30.0}, "loss")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint.best_loss_18.5720-shard0.pt", "checkpoint.stage1_best_loss_18.5720-shard1.pt"]
