"""Validating on the training split (``--valid-subset ...,train``) trains exactly what a run without
that validation trains (``slam_fairseq.compat.training_split_validation``): the same losses at every
update, the same epochs, the same iterator position in the checkpoints. fairseq 0.12 alone hands
the validation the training iterator, and every validation of the training split restarted the
epoch (epoch 2 at the first update, two epochs counted per epoch, other losses)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretraining_fixtures as fixtures  # noqa: E402
import slam_fairseq  # noqa: E402,F401  (installs the compat patches)
from fairseq import options, tasks  # noqa: E402
from fairseq.data import ConcatDataset  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from s2t_fixtures import random_asr_dir, run_fairseq, s2t_cfg_and_task  # noqa: E402
from slam_formats.manifest import write_s2t_manifest  # noqa: E402

USER_DIR = str(Path(__file__).resolve().parents[1] / "slam_fairseq")
_RECORD = re.compile(r"\| (train_inner|[\w,]+) \| (\{.*\})\s*$", re.MULTILINE)


def _records(log: str) -> Dict[str, List[dict]]:
    """fairseq-train's json log records by tag (``train_inner``, ``train``, a validated subset)."""
    records: Dict[str, List[dict]] = {}
    for tag, body in _RECORD.findall(log):
        records.setdefault(tag, []).append(json.loads(body))
    return records


def _updates(records: List[dict]) -> Dict[int, Tuple[str, str]]:
    return {int(r["num_updates"]): (str(r["epoch"]), str(r["loss"])) for r in records}


def _iterator_state(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["extra_state"]["train_iterator"]
    return {key: state[key] for key in ("epoch", "iterations_in_epoch")}


def test_fine_tuning_validated_on_its_training_split_trains_what_it_trains_without(tmp_path):
    """With SpecAugment in training (NumPy's global generator) and one utterance too long for
    ``--max-source-positions``, which training skips."""
    data_dir = random_asr_dir(tmp_path / "data")

    def train(name: str, *validation: str) -> str:
        return run_fairseq(
            "fairseq-train", data_dir, "--user-dir", USER_DIR, "--task", "speech_to_text", "--cpu",
            "--config-yaml", "config_asr.yaml", "--train-subset", "train_asr", *validation,
            "--save-dir", tmp_path / name, "--max-tokens", "250", "--required-batch-size-multiple", "1",
            "--num-workers", "0", "--seed", "1", "--optimizer", "adam", "--lr", "1e-3", "--arch", "slam_s2t_tiny",
            "--criterion", "label_smoothed_cross_entropy", "--max-update", "8", "--no-epoch-checkpoints",
            "--max-source-positions", "100", "--log-format", "json", "--log-interval", "1").stdout

    alone = _records(train("alone", "--disable-validation"))
    (data_dir / "train_asr_copy.tsv").write_bytes((data_dir / "train_asr.tsv").read_bytes())
    validated_log = train("validated", "--valid-subset", "train_asr,train_asr_copy", "--validate-interval-updates", "3",
                          "--validate-interval", "1000")
    validated = _records(validated_log)
    epochs = {epoch for epoch, _ in _updates(alone["train_inner"]).values()}
    assert len(epochs) == 2, "the run crosses an epoch boundary, with validations inside epochs"
    assert _updates(validated["train_inner"]) == _updates(alone["train_inner"])
    assert [r["train_asr_num_updates"] for r in validated["train_asr"]] == ["3", "6", "8"]
    # another subset named train*: fairseq reads it as a training split (SpecAugment) as well
    assert [r["train_asr_copy_loss"] for r in validated["train_asr_copy"]] == \
        [r["train_asr_loss"] for r in validated["train_asr"]]
    # the utterance too long for training is skipped by the validation of the training split too
    # (fairseq would raise, --skip-invalid-size-inputs-valid-test not being given)
    assert validated_log.count("1 samples have invalid sizes and will be skipped") == 2 + 1
    assert "begin training epoch 1" in validated_log and "begin training epoch 2" in validated_log
    assert _iterator_state(tmp_path / "validated" / "checkpoint_last.pt") == \
        _iterator_state(tmp_path / "alone" / "checkpoint_last.pt")


def test_pretraining_validated_on_its_training_split_trains_what_it_trains_without(tmp_path):
    data_dir = fixtures.build_data_dir(tmp_path / "data", real_speech=False)

    def train(name: str, valid_subset: str) -> str:
        run = fixtures.run_fairseq([
            str(data_dir), "--user-dir", USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny",
            "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler",
            "inverse_sqrt", "--warmup-updates", "2", "--batch-size", "8", "--max-sentences-speech", "2",
            "--max-sentences-text", "4", "--max-sentences-pair", "3", "--stage2-start-update", "3",
            "--max-update", "8", "--save-dir", str(tmp_path / name), "--no-epoch-checkpoints", "--cpu",
            "--seed", "7", "--log-format", "json", "--log-interval", "1", "--ddp-backend", "legacy_ddp",
            "--valid-subset", valid_subset, "--validate-interval-updates", "3", "--validate-interval", "1000"], stand_in=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        return run.stdout + run.stderr

    alone = _records(train("alone", "valid"))
    both = _records(train("both", "valid,train"))
    assert _updates(both["train_inner"]) == _updates(alone["train_inner"])
    assert len({epoch for epoch, _ in _updates(alone["train_inner"]).values()}) == 2
    assert [r["valid_loss"] for r in both["valid"]] == [r["valid_loss"] for r in alone["valid"]]
    # the training split is validated as a validation split is: every batch once, fixed masks
    on_train = [r for r in both["train"] if "train_loss" in r and "train_lr" not in r]
    assert [r["train_num_updates"] for r in on_train] == ["3", "6", "8"]
    assert all(r["train_nsentences_speech"] == "2" for r in on_train)
    assert _iterator_state(tmp_path / "both" / "checkpoint_last.pt") == \
        _iterator_state(tmp_path / "alone" / "checkpoint_last.pt")


def test_generate_and_validate_read_a_training_split_as_an_evaluation_split(tmp_path):
    """fairseq-generate / fairseq-validate load their split with the checkpoint's task config: a
    ``train*`` split then has the evaluation transforms (no SpecAugment), so every read of an
    utterance gives the same features; fairseq-train's load keeps SpecAugment."""
    data_dir = random_asr_dir(tmp_path / "data")
    (data_dir / "train_asr_copy.tsv").write_bytes((data_dir / "train_asr.tsv").read_bytes())
    cfg, task = s2t_cfg_and_task(data_dir, "asr", tmp_path / "save", "--user-dir", USER_DIR)
    task.load_dataset("train_asr")
    training = task.datasets["train_asr"]
    task.load_dataset("train_asr", task_cfg=cfg.task)
    evaluation = task.datasets["train_asr"]
    assert training.is_train_split and "SpecAugment" in repr(training.feature_transforms)
    assert not evaluation.is_train_split and "SpecAugment" not in repr(evaluation.feature_transforms)
    first, again = evaluation[3].source, evaluation[3].source
    assert torch.equal(first, again)
    rows = []
    for epoch in range(1, 5):  # masks drawn per (seed, epoch, example): compat.augmentation_seeds
        training.set_epoch(epoch)
        rows.append(training[3].source)
    assert any(not torch.equal(row, first) for row in rows), "training reads are augmented"
    # --gen-subset a,b: each part of the concatenation
    task.load_dataset("train_asr,train_asr_copy", task_cfg=cfg.task)
    joined = task.datasets["train_asr,train_asr_copy"]
    assert isinstance(joined, ConcatDataset) and not any(part.is_train_split for part in joined.datasets)
    # ... also where fairseq resampled the parts of a training concatenation (sampling_alpha != 1)
    task.data_cfg.config["sampling_alpha"] = 0.5
    task.load_dataset("train_asr,train_asr_copy", task_cfg=cfg.task)
    resampled = task.datasets["train_asr,train_asr_copy"]
    assert [type(part).__name__ for part in resampled.datasets] == ["SpeechToTextDataset"] * 2
    assert not any(part.is_train_split for part in resampled.datasets) and len(resampled) == 2 * len(training)

    pretraining_dir = fixtures.build_data_dir(tmp_path / "pretraining", real_speech=False)
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(pretraining_dir), "--user-dir", USER_DIR, "--task",
                                                "slam_pretraining", "--arch", "slam_tiny", "--criterion",
                                                "slam_multitask"])
    pretraining_cfg = convert_namespace_to_omegaconf(args)
    pretraining = tasks.setup_task(pretraining_cfg.task)
    pretraining.load_dataset("train")
    assert pretraining.datasets["train"].cycle
    pretraining.load_dataset("train", combine=False, epoch=1, task_cfg=pretraining_cfg.task)
    assert not pretraining.datasets["train"].cycle
