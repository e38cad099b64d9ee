"""SpecAugment (and fairseq's other training-time augmentations) drawn per example from (seed,
epoch, index) (``slam_fairseq.compat.augmentation_seeds``): a fine-tuning run killed and resumed
ends with the weights of the run that was never stopped, and ``--num-workers`` does not change what
is trained. fairseq 0.12 alone draws the masks from NumPy's global generator, whose state no
checkpoint keeps: the resumed run drew other masks from the resume on."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slam_fairseq  # noqa: E402,F401  (installs the compat patches)
from s2t_fixtures import random_asr_dir, run_fairseq, s2t_cfg_and_task  # noqa: E402

USER_DIR = str(Path(__file__).resolve().parents[1] / "slam_fairseq")


def test_an_example_s_masks_depend_on_the_seed_the_epoch_and_the_example_alone(tmp_path):
    data_dir = random_asr_dir(tmp_path / "data")

    def training(seed: int):
        cfg, task = s2t_cfg_and_task(data_dir, "asr", tmp_path / "save", "--user-dir", USER_DIR, "--seed", str(seed))
        task.load_dataset("train_asr")
        return task.datasets["train_asr"]

    dataset = training(1)
    assert "SpecAugment" in repr(dataset.feature_transforms)
    np.random.seed(5)
    expected_draw = np.random.rand()
    np.random.seed(5)
    first = dataset[3].source
    assert np.random.rand() == expected_draw, "the global generator's stream is left as it was"
    np.random.seed(123)  # whatever was drawn before
    assert torch.equal(dataset[3].source, first)
    by_epoch = []
    for epoch in (1, 2, 3, 4):
        dataset.set_epoch(epoch)
        by_epoch.append(dataset[3].source)
    assert torch.equal(by_epoch[0], first)
    assert len({row.numpy().tobytes() for row in by_epoch}) > 1, "other masks in other epochs"
    dataset.set_epoch(1)
    other_seed = training(2)
    assert any(not torch.equal(other_seed[index].source, dataset[index].source) for index in range(6))

    # an evaluation view of the training split (--valid-subset valid,train) does not move its epoch
    from slam_fairseq.compat.training_split_validation import speech_to_text_evaluation_view

    dataset.set_epoch(3)
    in_epoch_3 = dataset[3].source
    speech_to_text_evaluation_view(dataset).set_epoch(1)
    assert torch.equal(dataset[3].source, in_epoch_3)

    # the splits of --train-subset a,b: example i of each draws its own masks
    (data_dir / "train_asr_copy.tsv").write_bytes((data_dir / "train_asr.tsv").read_bytes())
    cfg, task = s2t_cfg_and_task(data_dir, "asr", tmp_path / "save", "--user-dir", USER_DIR, "--seed", "1")
    task.load_dataset("train_asr,train_asr_copy")
    first_split, second_split = task.datasets["train_asr,train_asr_copy"].datasets
    assert torch.equal(first_split[3].source, first)  # the first split draws what it draws alone
    assert any(not torch.equal(first_split[index].source, second_split[index].source) for index in range(6))


def _train(data_dir: Path, save_dir: Path, max_update: int, workers: int = 0) -> str:
    return run_fairseq(
        "fairseq-train", data_dir, "--user-dir", USER_DIR, "--task", "speech_to_text", "--cpu",
        "--config-yaml", "config_asr.yaml", "--train-subset", "train_asr", "--disable-validation",
        "--save-dir", save_dir, "--max-tokens", "250", "--required-batch-size-multiple", "1",
        "--num-workers", str(workers), "--seed", "1", "--optimizer", "adam", "--lr", "1e-3",
        "--arch", "slam_s2t_tiny", "--criterion", "label_smoothed_cross_entropy", "--max-update", str(max_update),
        "--save-interval-updates", "4", "--no-epoch-checkpoints", "--max-source-positions", "200",
        "--log-format", "json", "--log-interval", "1").stdout


def _update_losses(log: str) -> Dict[int, str]:
    """num_updates -> loss of fairseq-train's per-update json records."""
    records = [json.loads(body) for body in re.findall(r"\| train_inner \| (\{.*\})\s*$", log, re.MULTILINE)]
    return {int(record["num_updates"]): record["loss"] for record in records}


def _weights(checkpoint: Path):
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state["model"], state["last_optimizer_state"]["state"]


def test_fine_tuning_with_specaugment_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    data_dir = random_asr_dir(tmp_path / "data")
    straight = _train(data_dir, tmp_path / "straight", 9)
    first_half = _train(data_dir, tmp_path / "resumed", 4)
    assert "begin training epoch 2" not in first_half, "the run stops inside its first epoch"
    resumed = _train(data_dir, tmp_path / "resumed", 9)
    assert "begin training epoch 2" in resumed, "the resumed run crosses into the next epoch"
    losses = _update_losses(straight)
    assert sorted(losses) == list(range(1, 10))
    assert {**_update_losses(first_half), **_update_losses(resumed)} == losses
    (model, moments), (resumed_model, resumed_moments) = (_weights(tmp_path / name / "checkpoint_last.pt")
                                                          for name in ("straight", "resumed"))
    assert model.keys() == resumed_model.keys()
    assert all(torch.equal(model[key], resumed_model[key]) for key in model)
    assert all(torch.equal(moments[k]["exp_avg_sq"], resumed_moments[k]["exp_avg_sq"]) for k in moments)
    # masks drawn in a loader process are those drawn in the training process
    assert _update_losses(_train(data_dir, tmp_path / "worker", 9, workers=1)) == losses
