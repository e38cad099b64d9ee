"""Every rank logs the same keys, in the same order and of the same kind, whatever its step held
(``slam_fairseq/tasks/logging_schema.py``): the condition for fairseq's summed all-reduce."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures  # noqa: E402

from slam_fairseq.criterions import slam_multitask  # noqa: E402
from slam_fairseq.tasks.logging_schema import (complete_logging_output, logging_keys_of,  # noqa: E402
                                               multitask_logging_keys)
from slam_fairseq.tasks.slam_pretraining import SlamPretrainingConfig, SlamPretrainingTask  # noqa: E402


def test_multitask_schema_covers_every_objective_and_count():
    keys = multitask_logging_keys()
    assert len(keys) == len(set(keys))
    for name in slam_multitask.OBJECTIVE_WEIGHTS:
        assert f"_{name}_loss_sum" in keys and f"_{name}_count" in keys
    assert "_stm_correct" in keys and "_diversity_correct" not in keys and "_pair_ctc_correct" not in keys
    assert set(slam_multitask._COUNTS) <= set(keys)
    assert keys[:4] == ("loss", "sample_size", "ntokens", "nsentences")


def test_complete_fills_zeros_in_schema_order_and_unifies_value_kinds():
    keys = ("loss", "sample_size", "_a_count", "_b_count")
    speech_step = {"_b_count": torch.tensor(3), "loss": 1.5, "sample_size": 1}
    text_step = {"_a_count": 7, "loss": torch.tensor(0.25, dtype=torch.float32), "sample_size": 1}
    completed = [complete_logging_output(step, keys, torch.device("cpu")) for step in (speech_step, text_step)]
    for output in completed:
        assert list(output) == list(keys)
        assert all(torch.is_tensor(v) and v.dtype == torch.float64 and v.dim() == 0 for v in output.values())
    assert [float(v) for v in completed[0].values()] == [1.5, 1.0, 0.0, 3.0]
    assert [float(v) for v in completed[1].values()] == [0.25, 1.0, 7.0, 0.0]


def test_complete_rejects_a_key_outside_the_schema():
    with pytest.raises(ValueError, match=r"SomeCriterion logged \['_new_thing'\].*logging_schema\.py"):
        complete_logging_output({"loss": 1.0, "_new_thing": 2.0}, ("loss",), torch.device("cpu"), "SomeCriterion")
    with pytest.raises(ValueError, match="must be a scalar"):
        complete_logging_output({"loss": torch.ones(2)}, ("loss",), torch.device("cpu"))


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def set_num_updates(self, num_updates) -> None:
        pass


class _SchemaCriterion:
    """Logs one count per modality it saw, a float for speech, a tensor for the others."""

    KEYS = ("loss", "sample_size", "speech_rows", "text_rows", "pair_rows")

    def logging_keys(self):
        return self.KEYS

    def __call__(self, model, sample):
        (name,) = sample.keys()
        position = ("speech", "text", "pair").index(name)
        loss = model.weight[position] * (1 + position)
        rows = 2.0 if name == "speech" else torch.tensor(2 + position)
        return loss, 1, {"loss": loss.detach(), "sample_size": 1, f"{name}_rows": rows}


class _Optimizer:
    def backward(self, loss) -> None:
        loss.backward()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    data = pretraining_fixtures.build_data_dir(tmp_path_factory.mktemp("schema") / "data", real_speech=False,
                                               num_speech=2, num_pairs=2, num_text=2)
    return SlamPretrainingTask.setup_task(SlamPretrainingConfig(
        data=str(data), seed=1, max_update=10, train_subset="train", stage2_start_update=0))


def test_steps_with_different_modalities_log_the_same_keys(task):
    model, criterion = _Model(), _SchemaCriterion()
    batch = {"id": torch.tensor([0])}
    full = {"speech": batch, "text": batch, "pair": batch}
    only_speech = {"speech": batch}
    outputs = [task.valid_step(full, model, criterion)[2], task.valid_step(only_speech, model, criterion)[2],
               task.valid_step({}, model, criterion)[2],
               task.train_step(only_speech, model, criterion, _Optimizer(), update_num=1)[2]]
    for output in outputs:
        assert list(output) == list(_SchemaCriterion.KEYS)
        assert all(torch.is_tensor(value) and value.dtype == torch.float64 for value in output.values())
    assert [float(v) for v in outputs[0].values()] == [1 + 2 + 3, 1, 2, 3, 4]
    assert [float(v) for v in outputs[1].values()] == [1, 1, 2, 0, 0]
    assert [float(v) for v in outputs[2].values()] == [0, 0, 0, 0, 0]


def test_slam_multitask_is_completed_to_its_schema_and_others_are_left_alone(task):
    criterion = slam_multitask.SlamMultitaskCriterion(slam_multitask.SlamMultitaskCriterionConfig(), task)
    assert logging_keys_of(criterion) == multitask_logging_keys()
    assert logging_keys_of(object()) is None
