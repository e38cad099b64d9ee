"""Task ``slam_pretraining``: setup checks, the two-stage schedule, batching, the per-modality
train step, and real ``fairseq-train`` / ``fairseq-hydra-train`` runs (stage switch, checkpoint,
stop-and-resume with the same losses as an uninterrupted run).

The command-line runs use the plugin's criterion ``slam_multitask``.
"""
from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures as fixtures  # noqa: E402

from slam_fairseq.data.pretraining.round_robin import RoundRobinBatchDataset  # noqa: E402
from slam_fairseq.tasks.slam_pretraining import SlamPretrainingConfig, SlamPretrainingTask  # noqa: E402

REPO_ROOT = fixtures.REPO_ROOT
USER_DIR = str(REPO_ROOT / "slam_fairseq")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Real (espeak-ng) speech: 8 speech utterances, 12 text lines, 6 pairs for training."""
    return fixtures.build_data_dir(tmp_path_factory.mktemp("pretraining_task") / "data")


def make_task(data: Path, **overrides) -> SlamPretrainingTask:
    values = dict(data=str(data), seed=1, max_update=10, train_subset="train")
    values.update(overrides)
    return SlamPretrainingTask.setup_task(SlamPretrainingConfig(**values))


# -- setup -------------------------------------------------------------------------------------------
def test_dictionary_has_mask(data_dir):
    task = make_task(data_dir)
    dictionary = task.source_dictionary
    assert dictionary.index("<mask>") == len(dictionary) - 1 != dictionary.unk()


def test_stage2_without_pairs_fails_at_setup(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    (copy / "pair_train.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"stage 2 is configured .*pair_train\.tsv does not exist"):
        make_task(copy, stage2_start_update=5)
    make_task(copy, stage2_start_update=-1)  # stage 1 only: speech + text are enough
    task = make_task(copy, stage2_start_update=10, max_update=10)  # stage 2 is never reached
    assert "no stage 2" in task.describe_schedule()


def test_the_schedule_names_only_the_objectives_the_data_can_train(data_dir, tmp_path, caplog):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    (copy / "text_train.txt").unlink()
    with caplog.at_level(logging.WARNING):
        task = make_task(copy, stage2_start_update=-1, epoch_modality="text")
    assert "stage 1 has no text data" in caplog.text and "span masking is left out" in caplog.text
    assert task.describe_schedule().startswith("stage 1: MSM; no stage 2")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        task.load_dataset("train")
    assert ("--epoch-modality text: split 'train' has no text data in this stage (loaded: speech); an epoch is one "
            "pass over the largest of them") in caplog.text


def test_no_stage1_data_fails_at_setup(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    for name in ("speech_train.tsv", "text_train.txt"):
        (copy / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"no training data for stage 1 .*speech_train\.tsv"):
        make_task(copy)
    (copy / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"config\.yaml: no data config"):
        make_task(copy)


# -- schedule -----------------------------------------------------------------------------------------
def test_stage_is_a_function_of_the_update_number(data_dir):
    task = make_task(data_dir, stage2_start_update=3)
    assert [task.stage_at(update) for update in range(6)] == [1, 1, 1, 2, 2, 2]
    assert task.active_modalities(2) == ("speech", "text")
    assert task.active_modalities(3) == ("speech", "text", "pair")
    assert make_task(data_dir, stage2_start_update=0).active_modalities(0) == ("speech", "text", "pair")
    never = make_task(data_dir)  # default -1: stage 1 only, pairs are not even loaded
    assert never.active_modalities(10 ** 6) == ("speech", "text") and "pair" not in never.loaded_modalities
    custom = make_task(data_dir, stage2_start_update=2, stage1_modalities="text", stage2_modalities="text,pair")
    assert custom.active_modalities(1) == ("text",) and custom.active_modalities(2) == ("text", "pair")


def test_post_validate_nulls_only_an_empty_validation_and_keeps_the_previous_best(data_dir, monkeypatch):
    from fairseq import checkpoint_utils

    task = make_task(data_dir, stage2_start_update=3, best_checkpoint_metric="loss")
    counts = {f"nsentences_{name}": 0.0 for name in ("speech", "text", "pair")}
    monkeypatch.setattr(checkpoint_utils.save_checkpoint, "best", 2.5, raising=False)
    empty = dict(counts, loss=0.0, best_loss=0.0, num_updates=2)  # fairseq's best_loss: min(2.5, 0)
    task.post_validate(None, empty, None)
    assert empty["loss"] is None and empty["best_loss"] == 2.5
    seen = dict(counts, nsentences_speech=4.0, loss=3.0, best_loss=2.5)
    task.post_validate(None, seen, None)
    assert seen["loss"] == 3.0 and seen["best_loss"] == 2.5
    other_criterion = {"loss": 3.2, "speech_loss": 1.0}  # no per-modality counts: nothing to judge by
    task.post_validate(None, other_criterion, None)
    assert other_criterion == {"loss": 3.2, "speech_loss": 1.0}
    stage2_metric = make_task(data_dir, stage2_start_update=3, best_checkpoint_metric="tlm_text_accuracy")
    stage1 = dict(seen)
    stage2_metric.post_validate(None, stage1, None)
    assert stage1["tlm_text_accuracy"] is None and stage1["loss"] == 3.0  # not logged in stage 1: no KeyError


# -- batching ----------------------------------------------------------------------------------------
def test_batch_iterator_uses_per_modality_limits_and_fairseq_fallbacks(data_dir):
    task = make_task(data_dir, stage2_start_update=0, max_sentences_speech=2, max_sentences_pair=4)
    task.load_dataset("train")
    dataset = task.dataset("train")
    assert isinstance(dataset, RoundRobinBatchDataset)
    iterator = task.get_batch_iterator(dataset, max_sentences=5, seed=1, epoch=1)
    sizes = {name: sorted(len(batch) for batch in batches) for name, batches in dataset.batches.items()}
    assert sizes == {"speech": [2, 2, 2, 2], "text": [2, 5, 5], "pair": [2, 4]}
    assert dataset.epoch_modality == "speech" and len(iterator) == 4
    for sample in iterator.next_epoch_itr():
        assert set(sample) == {"speech", "text", "pair"}
    assert task.get_batch_iterator(dataset, max_sentences=5, seed=1, epoch=1) is iterator


# -- train step ------------------------------------------------------------------------------------
class _LinearModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def set_num_updates(self, num_updates) -> None:
        pass


class _RecordingCriterion:
    """loss = weight . e_m * (1 + m) for modality m: each modality moves its own coordinate."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, model, sample):
        (name,) = sample.keys()
        self.calls.append(name)
        position = ("speech", "text", "pair").index(name)
        loss = model.weight[position] * (1 + position)
        return loss, 1, {"loss": float(loss.detach()), "sample_size": 1, f"{name}_rows": 1}


class _Optimizer:
    def __init__(self) -> None:
        self.backward_calls = 0

    def backward(self, loss) -> None:
        self.backward_calls += 1
        loss.backward()


def test_train_step_backpropagates_each_active_modality_and_sums_gradients(data_dir, caplog):
    task = make_task(data_dir, stage2_start_update=3)
    sample = {name: {"id": torch.tensor([0, 1])} for name in ("speech", "text", "pair")}
    model, criterion = _LinearModel(), _RecordingCriterion()

    with caplog.at_level(logging.INFO, logger="slam_fairseq.tasks.slam_pretraining"):
        optimizer = _Optimizer()
        loss, sample_size, logs = task.train_step(sample, model, criterion, optimizer, update_num=2)
        assert criterion.calls == ["speech", "text"] and optimizer.backward_calls == 2
        assert model.weight.grad.tolist() == [1.0, 2.0, 0.0]
        assert sample_size == 1 and logs["sample_size"] == 1 and logs["speech_rows"] == logs["text_rows"] == 1

        model.weight.grad = None
        criterion.calls.clear()
        optimizer = _Optimizer()
        task.train_step(sample, model, criterion, optimizer, update_num=3)
        assert criterion.calls == ["speech", "text", "pair"] and optimizer.backward_calls == 3
        assert model.weight.grad.tolist() == [1.0, 2.0, 3.0], "the gradient is the sum over modalities"
    assert "stage 2 starts at update 3: adding TLM + STM" in caplog.text

    model.weight.grad = None
    task.train_step(sample, model, criterion, _Optimizer(), update_num=4, ignore_grad=True)
    assert model.weight.grad.tolist() == [0.0, 0.0, 0.0]

    criterion.calls.clear()
    _, sample_size, _ = task.valid_step(sample, model, criterion)
    assert criterion.calls == ["speech", "text", "pair"] and sample_size == 1


def test_an_epoch_ending_before_stage_2_leaves_the_pairs_out_and_a_stage_2_update_refuses_such_a_batch(data_dir):
    """From the trainer's logged update count: an epoch of S steps over W ranks makes at most
    ceil(S / W) updates; if all of them come before --stage2-start-update, pairs are not read.
    A stage-2 update given such a batch is an error, never a silent update without pairs."""
    from fairseq.logging import metrics

    from slam_fairseq.data.pretraining.round_robin import LEFT_OUT_KEY

    task = make_task(data_dir, stage2_start_update=8)
    metrics.reset()
    assert task.modalities_left_out(4, 1) == (), "no update count logged yet: every modality is read"
    metrics.log_scalar("num_updates", 4, weight=0)
    assert task.modalities_left_out(4, 1) == ("pair",), "updates 4 .. 7 are all in stage 1"
    assert task.modalities_left_out(5, 1) == (), "update 8 may be in this epoch"
    assert task.modalities_left_out(8, 2) == ("pair",) and task.modalities_left_out(9, 2) == ()
    metrics.log_scalar("num_updates", 8, weight=0)
    assert task.modalities_left_out(1, 1) == ()
    # a resumed mid-epoch checkpoint: fairseq logs the count (6), then loads the saved metrics into
    # the registry; later counts go to the still-active aggregator, which is the one to read
    metrics.reset()
    metrics.log_scalar("num_updates", 5, weight=0)
    saved = metrics.state_dict()
    metrics.reset()
    metrics.log_scalar("num_updates", 6, weight=0)
    metrics.load_state_dict(saved)
    metrics.log_scalar("num_updates", 12, weight=0)
    assert metrics.get_meter("default", "num_updates").val == 5
    assert task.modalities_left_out(4, 1) == (), "updates 12 .. 15 may reach update 8"
    for other in (make_task(data_dir, stage2_start_update=0), make_task(data_dir, stage2_start_update=-1),
                  make_task(data_dir, stage2_start_update=8, stage1_modalities="speech,text,pair")):
        metrics.log_scalar("num_updates", 0, weight=0)
        assert other.modalities_left_out(1, 1) == ()
    metrics.reset()

    sample = {name: {"id": torch.tensor([0, 1])} for name in ("speech", "text")}
    sample[LEFT_OUT_KEY] = ("pair",)
    model, criterion = _LinearModel(), _RecordingCriterion()
    task.train_step(sample, model, criterion, _Optimizer(), update_num=7)
    assert criterion.calls == ["speech", "text"]
    with pytest.raises(RuntimeError, match=r"update 8 \(stage 2\) trains pair, but its batch was read without"):
        task.train_step(sample, model, criterion, _Optimizer(), update_num=8)


def test_reduce_metrics_leaves_no_count_of_fairseqs_per_update_aggregators_behind(data_dir):
    """fairseq's trainer reduces each update's logs inside a new uuid-named ``metrics.aggregate()``
    whose count it never deletes (one entry a update, forever): the task drops finished ones."""
    from fairseq.logging import metrics

    class Criterion:
        @staticmethod
        def reduce_metrics(logging_outputs):
            metrics.log_scalar("loss", sum(log["loss"] for log in logging_outputs))

        @staticmethod
        def logging_outputs_can_be_summed():
            return True

    task = make_task(data_dir)
    metrics.reset()
    for update in range(200):  # the trainer's _reduce_and_log_stats, once an update
        with metrics.aggregate() as agg:
            task.reduce_metrics([{"loss": float(update), "ntokens": 1, "nsentences": 1, "sample_size": 1}],
                                Criterion())
            assert agg.get_smoothed_value("loss") == float(update)
    counts = dict(metrics._active_aggregators_cnt)
    assert counts.get("default") == 1 and len(counts) == 2, f"{len(counts)} counts after 200 updates"
    metrics.reset()


# -- command line ----------------------------------------------------------------------------------
def _criterion():
    """(criterion name, whether a stand-in must be registered): the plugin's own, which importing
    the plugin registers (a run without it would test another criterion)."""
    assert fixtures.criterion_registered("slam_multitask"), "the plugin did not register slam_multitask"
    return "slam_multitask", False


def _train_args(data_dir: Path, save_dir: Path, criterion: str, max_update: int):
    return [str(data_dir), "--user-dir", USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny",
            "--criterion", criterion, "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", "2", "--batch-size", "8", "--max-sentences-speech", "2",
            "--max-sentences-text", "4", "--max-sentences-pair", "3", "--stage2-start-update", "3",
            "--max-update", str(max_update), "--save-dir", str(save_dir), "--no-epoch-checkpoints",
            "--cpu", "--seed", "7", "--log-format", "json", "--log-interval", "1",
            "--ddp-backend", "legacy_ddp"]


def _losses(records):
    return {int(r["num_updates"]): {k: v for k, v in r.items() if k == "stage" or k.endswith("loss")}
            for r in records}


def _check(run):
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return run.stdout + run.stderr


def test_cli_stage_switch_checkpoint_and_resume_match_an_uninterrupted_run(data_dir, tmp_path):
    criterion, stand_in = _criterion()
    # 8 speech utterances in batches of 2: an epoch is 4 updates; stage 2 from update 3;
    # the interrupted run stops after update 6, in the middle of epoch 2.
    whole = _check(fixtures.run_fairseq(_train_args(data_dir, tmp_path / "whole", criterion, 8), stand_in))
    first = _check(fixtures.run_fairseq(_train_args(data_dir, tmp_path / "split", criterion, 6), stand_in))
    assert (tmp_path / "split" / "checkpoint_last.pt").is_file()
    second = _check(fixtures.run_fairseq(_train_args(data_dir, tmp_path / "split", criterion, 8), stand_in))

    assert "stage 2 starts at update 3: adding TLM + STM" in whole
    assert "stage 2 starts at update 3: adding TLM + STM" in first
    assert "Loaded checkpoint" in second and "training in stage 2 from update 6" in second

    expected = _losses(fixtures.json_log_records(whole))
    assert sorted(expected) == list(range(1, 9))
    assert [expected[u]["stage"] for u in range(1, 9)] == ["1", "1", "1", "2", "2", "2", "2", "2"]
    stage1_keys, stage2_keys = set(expected[3]), set(expected[4])
    assert stage1_keys < stage2_keys, "stage 2 logs more objectives"

    resumed = _losses(fixtures.json_log_records(first))
    resumed.update(_losses(fixtures.json_log_records(second)))
    assert sorted(resumed) == list(range(1, 9))
    for update in range(1, 9):
        assert resumed[update] == expected[update], f"update {update} differs after resuming"
    whole_valid = fixtures.json_log_records(whole, "valid")
    split_valid = fixtures.json_log_records(first, "valid") + fixtures.json_log_records(second, "valid")
    assert whole_valid[0]["valid_loss"] == split_valid[0]["valid_loss"]  # end of epoch 1
    assert whole_valid[-1]["valid_loss"] == split_valid[-1]["valid_loss"]  # end of training


def test_cli_epochs_before_stage_2_do_not_read_pairs_and_train_as_a_run_that_reads_them(data_dir, tmp_path):
    """4 updates an epoch, stage 2 from update 16: epochs 2 to 4 (updates 4 .. 15) leave the pairs
    out (epoch 1 reads them: no update count is logged before it), epoch 5 reads them. The same
    run stopped at update 6 (a first process that loads no pairs: stage 2 is past its
    --max-update) and resumed mid-epoch trains every update as the whole run, and its resumed
    process plans epoch 5 from the count of update 16, not from the resumed checkpoint's metrics."""
    criterion, stand_in = _criterion()

    def args(save_dir: Path, max_update: int):
        values = _train_args(data_dir, save_dir, criterion, max_update)
        values[values.index("--stage2-start-update") + 1] = "16"
        return values + ["--save-interval-updates", "3"]

    whole = _check(fixtures.run_fairseq(args(tmp_path / "whole", 20), stand_in))
    first = _check(fixtures.run_fairseq(args(tmp_path / "split", 6), stand_in))
    killed_save = tmp_path / "split" / "checkpoint_2_7.pt.tmp"  # a save a kill stopped before its rename
    killed_save.write_bytes(b"PK" * 1000)
    second = _check(fixtures.run_fairseq(args(tmp_path / "split", 20), stand_in))
    assert not killed_save.exists() and "removed 1 unfinished checkpoint write a kill left" in second
    for epoch in (2, 3, 4):
        assert f"epoch {epoch}: no update of it trains pair: those batches are not read" in whole
        assert f"epoch {epoch}: no update of it trains pair" in second
    assert "epoch 1: no update" not in whole and "epoch 5: no update" not in whole + second
    assert "no update of it trains" not in first
    expected = _losses(fixtures.json_log_records(whole))
    assert [expected[u]["stage"] for u in range(1, 21)] == ["1"] * 16 + ["2"] * 4
    assert "tlm_text_loss" in expected[17] and "tlm_text_loss" not in expected[16]
    resumed = _losses(fixtures.json_log_records(first))
    resumed.update(_losses(fixtures.json_log_records(second)))
    assert resumed == expected


def test_cli_resume_under_other_batch_limits_names_the_change_and_goes_on(data_dir, tmp_path):
    """A mid-epoch checkpoint resumed with another --max-sentences-speech: fairseq would resume at a
    position of another batch list (or fail past its end); the run says so and moves on."""
    criterion, stand_in = _criterion()
    _check(fixtures.run_fairseq(_train_args(data_dir, tmp_path / "ck", criterion, 6), stand_in))  # epoch 2, step 2
    finer = _train_args(data_dir, tmp_path / "ck", criterion, 7) + ["--max-sentences-speech", "1"]
    output = _check(fixtures.run_fairseq(finer, stand_in))
    assert ("resuming epoch 2 at step 2 of a batch list laid out differently (steps_per_epoch 4 -> 8, batches "
            in output), output[-3000:]
    coarser = _train_args(data_dir, tmp_path / "ck", criterion, 9) + ["--max-sentences-speech", "8"]
    output = _check(fixtures.run_fairseq(coarser, stand_in))
    assert ("resuming epoch 2 at step 3, but under the options of this run its epoch has only 3 steps per shard "
            "(steps_per_epoch 8 -> 3, epoch_modality speech -> text, batches ") in output, output[-3000:]
    assert "): starting epoch 3" in output
    assert [int(r["num_updates"]) for r in fixtures.json_log_records(output)] == [8, 9]


def test_a_stage1_validation_without_examples_is_no_score_for_best_checkpoint_or_patience(tmp_path):
    """Validation data with pairs only (the demo's layout): stage 1 validates nothing. Its loss is
    None, not 0, so checkpoint_best and --patience take only the stage-2 validations."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fixtures.build_data_dir(tmp_path / "built", real_speech=False), data)
    (data / "speech_valid.tsv").unlink()
    (data / "text_valid.txt").unlink()
    args = _train_args(data, tmp_path / "ck", "slam_multitask", 8) + [
        "--validate-interval-updates", "2", "--save-interval-updates", "2", "--patience", "2"]
    output = _check(fixtures.run_fairseq(args, stand_in=False))  # its per-modality counts tell an empty validation
    valid = {int(r["valid_num_updates"]): r for r in fixtures.json_log_records(output, "valid")}
    assert valid[2]["valid_loss"] is None and "held no example of the active modalities" in output
    assert "leaves out the pair batches" in output
    stage2 = [float(r["valid_loss"]) for update, r in valid.items() if update > 3]
    assert stage2 and min(stage2) > 0
    assert "early stop" not in output.split('"num_updates": "6"')[0]  # a 0 from stage 1 stopped it at 6
    state = torch.load(tmp_path / "ck" / "checkpoint_best.pt", map_location="cpu", weights_only=False)
    assert state["extra_state"]["best"] == pytest.approx(min(stage2), abs=1e-3)


def _weighted_objective_sum(record, prefix: str = "valid_") -> float:
    """The weighted sum of a record's logged objectives (slam_multitask's default weights: 1, and
    0.1 for the diversity loss, which is logged as a fraction, not in bits)."""
    total = 0.0
    for name in ("msm_contrastive", "msm_mlm", "span_masking", "tlm_text", "tlm_speech", "stm", "pair_ctc"):
        total += float(record.get(f"{prefix}{name}_loss") or 0)
    return total + 0.1 * float(record.get(f"{prefix}diversity_loss") or 0) / math.log(2)


def test_cli_validation_scores_restart_at_the_stage_switch_and_sum_the_objectives(data_dir, tmp_path):
    """A stage-2 validation sums more objectives than a stage-1 one: checkpoint_best.pt and
    --patience compare stage-2 validations only, from the first one on. Each validation's loss is
    the weighted sum of its objectives, however many steps hold each modality;
    --batch-size-valid sets the validation batches."""
    args = _train_args(data_dir, tmp_path / "ck", "slam_multitask", 12) + [
        "--validate-interval-updates", "2", "--save-interval-updates", "2", "--patience", "3",
        "--batch-size-valid", "1"]
    output = _check(fixtures.run_fairseq(args, stand_in=False))
    valid = {int(r["valid_num_updates"]): r for r in fixtures.json_log_records(output, "valid")}
    assert sorted(valid) == [2, 4, 6, 8, 10, 12], "--patience 3 did not stop the run at the switch"
    assert [valid[u]["valid_stage"] for u in sorted(valid)] == ["1", "2", "2", "2", "2", "2"]
    stage1, stage2 = float(valid[2]["valid_loss"]), [float(valid[u]["valid_loss"]) for u in range(4, 13, 2)]
    assert stage1 < min(stage2), "the premise: stage 1's loss sums fewer objectives"
    assert "validation scores restart at stage 2" in output
    assert valid[4]["valid_best_loss"] == valid[4]["valid_loss"]
    state = torch.load(tmp_path / "ck" / "checkpoint_best.pt", map_location="cpu", weights_only=False)
    assert state["extra_state"]["best"] == pytest.approx(min(stage2), abs=1e-3)
    assert state["extra_state"]["train_iterator"]["slam_run_state"] == {"stage_reached": 2,
                                                                         "validation_scores_stage": 2}
    for record in valid.values():
        assert float(record["valid_loss"]) == pytest.approx(_weighted_objective_sum(record), abs=0.02)
    validation_batches = [line for line in output.splitlines() if "round robin over" in line][1]
    assert "{'speech': 4, 'text': 6, 'pair': 3}" in validation_batches, validation_batches  # one example each

    # resumed with --reset-optimizer: the update count starts over, in stage 1 again, and it is said
    resumed = _check(fixtures.run_fairseq(_train_args(data_dir, tmp_path / "ck", "slam_multitask", 1)
                                          + ["--reset-optimizer"], stand_in=False))
    assert "training in stage 1 from update 0, but this run's checkpoint had reached stage 2" in resumed


def test_cli_validation_goes_on_without_a_modality_that_no_batch_of_max_tokens_valid_holds(data_dir, tmp_path):
    """--max-tokens-valid below every validation utterance: validation (and the checkpoint after
    it) runs on the text, saying so, rather than ending the run at its first validation; with no
    modality left it is an error naming the split."""
    frames = [int(row["n_frames"]) for name in ("speech_valid.tsv", "pair_valid.tsv")
              for row in csv.DictReader(open(data_dir / name, encoding="utf-8"), delimiter="\t")]
    limit = min(frames) - 1
    lines = (data_dir / "text_valid.txt").read_text(encoding="utf-8").splitlines()
    assert 2 * max(map(len, lines)) + 2 < limit, "the premise: every validation text line fits into such a batch"
    args = _train_args(data_dir, tmp_path / "ck", "slam_multitask", 4) + [
        "--validate-interval-updates", "4", "--max-tokens-valid", str(limit)]
    output = _check(fixtures.run_fairseq(args, stand_in=False))
    [valid] = fixtures.json_log_records(output, "valid")
    assert valid["valid_stage"] == "2" and float(valid["valid_span_masking_loss"]) > 0
    assert not [key for key in valid if "msm" in key or "stm" in key or "pair_ctc" in key or "tlm" in key], valid
    assert "every speech example was skipped" in output and "every pair example was skipped" in output
    assert "evaluated without speech batches" in output
    assert (tmp_path / "ck" / "checkpoint_last.pt").is_file()

    none_fits = fixtures.run_fairseq(_train_args(data_dir, tmp_path / "none", "slam_multitask", 4) + [
        "--validate-interval-updates", "4", "--max-tokens-valid", "1"], stand_in=False)
    assert none_fits.returncode != 0
    assert "valid: every example of every modality was skipped" in none_fits.stderr


def test_cli_a_stage2_metric_resumed_into_stage1_and_a_misspelled_metric(data_dir, tmp_path):
    """--best-checkpoint-metric stm_accuracy: resumed with a later --stage2-start-update, a stage-1
    validation has no score (fairseq would raise KeyError). A metric no validation logs is an error
    before training."""
    metric = ["--validate-interval-updates", "2", "--save-interval-updates", "2",
              "--best-checkpoint-metric", "stm_accuracy", "--maximize-best-checkpoint-metric"]
    _check(fixtures.run_fairseq(_train_args(data_dir, tmp_path / "ck", "slam_multitask", 6) + metric, stand_in=False))
    later = _train_args(data_dir, tmp_path / "ck", "slam_multitask", 10) + metric
    later[later.index("--stage2-start-update") + 1] = "9"
    output = _check(fixtures.run_fairseq(later, stand_in=False))
    valid = {r["valid_num_updates"]: r for r in fixtures.json_log_records(output, "valid")}
    assert sorted(valid) == ["10", "8"] and valid["8"].get("valid_stm_accuracy") is None
    assert 0.0 <= float(valid["10"]["valid_stm_accuracy"]) <= 1.0 and "KeyError" not in output

    typo = fixtures.run_fairseq(_train_args(data_dir, tmp_path / "typo", "slam_multitask", 2)
                                + ["--best-checkpoint-metric", "stm_acc"], stand_in=False)
    assert typo.returncode != 0
    assert "--best-checkpoint-metric stm_acc: no slam_multitask validation logs it" in typo.stderr
    # the scores offered are this run's: it stops (update 2) before stage 2 (update 3) trains pairs
    assert "msm_contrastive_loss" in typo.stderr and "stm_accuracy" not in typo.stderr.split("no slam_multitask")[1]
    assert not (tmp_path / "typo" / "checkpoint_last.pt").exists()
    never = _train_args(data_dir, tmp_path / "never", "slam_multitask", 2) + metric
    never[never.index("--stage2-start-update") + 1] = "-1"
    never = fixtures.run_fairseq(never, stand_in=False)
    assert never.returncode != 0 and "logged by pair batches, which no stage of this run trains" in never.stderr


def test_cli_reduce_lr_on_plateau_does_not_count_the_stage_switch_as_a_plateau(data_dir, tmp_path):
    """Validation at each epoch end (4 updates); stage 2 from update 5: the stage-2 validation at 8
    is higher than stage 1's at 4, which fairseq's plateau scheduler (patience 0) took for a
    plateau and halved the learning rate."""
    args = _train_args(data_dir, tmp_path / "ck", "slam_multitask", 11)
    args[args.index("--lr-scheduler") + 1] = "reduce_lr_on_plateau"
    args[args.index("--stage2-start-update") + 1] = "5"
    del args[args.index("--warmup-updates"):args.index("--warmup-updates") + 2]
    args += ["--lr-shrink", "0.5", "--lr-patience", "0"]
    output = _check(fixtures.run_fairseq(args, stand_in=False))
    valid = {int(r["valid_num_updates"]): float(r["valid_loss"]) for r in fixtures.json_log_records(output, "valid")}
    assert valid[8] > valid[4], "the premise: the stage-2 loss is higher"
    rates = {int(r["num_updates"]): float(r["lr"]) for r in fixtures.json_log_records(output)}
    assert rates[9] == rates[4] == 1e-3, rates


def test_cli_a_finished_run_started_again_trains_nothing(data_dir, tmp_path):
    """fairseq alone trains one more update and rewrites checkpoint_last.pt; a larger --max-update
    goes on training."""
    args = _train_args(data_dir, tmp_path / "ck", "slam_multitask", 4)
    _check(fixtures.run_fairseq(args, stand_in=False))
    last = tmp_path / "ck" / "checkpoint_last.pt"
    before = (last.stat().st_mtime_ns, last.read_bytes())
    again = _check(fixtures.run_fairseq(args, stand_in=False))
    assert "this run is finished (4 updates, --max-update 4)" in again
    assert not fixtures.json_log_records(again) and (last.stat().st_mtime_ns, last.read_bytes()) == before
    longer = _train_args(data_dir, tmp_path / "ck", "slam_multitask", 5)
    records = fixtures.json_log_records(_check(fixtures.run_fairseq(longer, stand_in=False)))
    assert [int(r["num_updates"]) for r in records] == [5]


def test_hydra_tiny_demo_config_starts(data_dir, tmp_path):
    _, stand_in = _criterion()
    args = ["--config-dir", str(REPO_ROOT / "examples" / "pretraining" / "config"),
            "--config-name", "slam_tiny_demo", f"task.data={data_dir}", f"common.user_dir={USER_DIR}",
            "optimization.max_update=3", "task.stage2_start_update=2",
            f"checkpoint.save_dir={tmp_path / 'checkpoints'}", "dataset.num_workers=0"]
    output = _check(fixtures.run_fairseq(args, stand_in, module="hydra_train", cwd=tmp_path))
    assert "stage 2 starts at update 2: adding TLM + STM" in output
    records = fixtures.json_log_records(output)
    assert len(records) == 3
    # the yaml turns on mSLAM's pair CTC: it is logged from stage 2 on
    assert records[1].get("pair_ctc_loss") is None and float(records[2]["pair_ctc_loss"]) > 0
    assert (tmp_path / "checkpoints" / "checkpoint_last.pt").is_file()
    params = int(output.split("num. shared model params: ")[1].split(" ")[0].replace(",", ""))
    assert params < 2_000_000, "the tiny demo must build a tiny model"
    # the demo's objectives: a Gumbel quantizer on the subsampling output collapses at this size
    saved = torch.load(str(tmp_path / "checkpoints" / "checkpoint_last.pt"), weights_only=False)["cfg"]
    assert (saved["model"]["quantizer_type"], saved["model"]["quantizer_input"]) == ("random_projection", "features")
    assert float(saved["criterion"]["pair_ctc_weight"]) == 10.0


def test_hydra_paper_config_takes_size_overrides_and_paths_relative_to_where_it_starts(data_dir, tmp_path):
    """slam_paper.yaml spells its sizes out (so model.* overrides work) and runs in the directory
    it is started from (hydra.run.dir: .), where relative task.data and checkpoint.save_dir point."""
    _, stand_in = _criterion()
    (tmp_path / "data").symlink_to(data_dir)
    sizes = dict(encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2, speech_encoder_layers=1,
                 multimodal_encoder_layers=1, subsampling_conv_channels=8, quantizer_codebook_size=16,
                 quantizer_codevector_dim=8)
    args = ["--config-dir", str(REPO_ROOT / "examples" / "pretraining" / "config"), "--config-name", "slam_paper",
            "task.data=data", f"common.user_dir={USER_DIR}", "common.fp16=false", "common.cpu=true",
            "optimization.max_update=2", "task.stage2_start_update=1", "dataset.num_workers=0",
            "dataset.required_batch_size_multiple=1", "checkpoint.save_dir=ck"]
    args += [f"model.{key}={value}" for key, value in sizes.items()]
    output = _check(fixtures.run_fairseq(args, stand_in, module="hydra_train", cwd=tmp_path))
    assert (tmp_path / "ck" / "checkpoint_last.pt").is_file() and not (tmp_path / "outputs").exists()
    params = int(output.split("num. shared model params: ")[1].split(" ")[0].replace(",", ""))
    assert params < 100_000, "the size overrides must reach the model"

