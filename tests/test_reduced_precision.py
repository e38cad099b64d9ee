"""Loss scaling and non-finite losses with ``slam_pretraining``'s one backward pass per modality.

fairseq 0.12 cannot run ``--fp16``/``--bf16`` on CPU (a CUDA assert; bf16 takes the TPU path), so
the FP16 path is driven here by hand, honestly: the real task ``train_step`` with the real
``slam_tiny`` model and ``slam_multitask`` criterion, under fairseq's own
``MemoryEfficientFP16Optimizer`` and ``FP16Optimizer`` (unflattened: its flat buffer is the one
CUDA-only allocation) and their ``DynamicLossScaler``. :func:`fairseq_update` repeats what
``Trainer.train_step`` does around the task (multiply the gradients, clip, where the scaler looks
for overflow, ``task.optimizer_step``; an ``OverflowError`` skips the update), leaving out only the
trainer's ``torch.tensor(0.0).cuda()`` for the logged norm. The model stays in float32: what is
tested is the scaling and skipping logic, not half-precision arithmetic (that is the GPU check).

A real ``fairseq-train`` run then meets a NaN loss in one modality at update 3 and goes on, with the
update skipped (weights and Adam state equal before and after it) and ``nonfinite_updates`` logged.
"""
from __future__ import annotations

import math

import argparse
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures as fixtures  # noqa: E402

import slam_fairseq  # noqa: E402,F401
from slam_fairseq.criterions.slam_multitask import (SlamMultitaskCriterion,  # noqa: E402
                                                    SlamMultitaskCriterionConfig)
from slam_fairseq.encoders.config import config_from  # noqa: E402
from slam_fairseq.encoders.slam_encoder import build_slam_encoder  # noqa: E402
from slam_fairseq.models.slam import SlamConfig, SlamModel, slam_tiny  # noqa: E402
from slam_fairseq.tasks.slam_pretraining import SlamPretrainingConfig, SlamPretrainingTask  # noqa: E402

INIT_SCALE = 2.0 ** 15
USER_DIR = str(fixtures.REPO_ROOT / "slam_fairseq")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(task, one round-robin sample with all three modalities)."""
    data_dir = fixtures.build_data_dir(tmp_path_factory.mktemp("precision") / "data", real_speech=False)
    task = SlamPretrainingTask.setup_task(SlamPretrainingConfig(
        data=str(data_dir), seed=1, max_update=10, train_subset="train", stage2_start_update=0,
        max_sentences_speech=2, max_sentences_text=3, max_sentences_pair=2))
    task.load_dataset("train")
    iterator = task.get_batch_iterator(task.dataset("train"), max_sentences=4, seed=1, epoch=1)
    sample = next(iter(iterator.next_epoch_itr(shuffle=False)))
    assert set(sample) == {"speech", "text", "pair"}
    return task, sample


def make_model(task, seed: int = 0) -> SlamModel:
    torch.manual_seed(seed)
    namespace = argparse.Namespace(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    slam_tiny(namespace)
    cfg = config_from(namespace, SlamConfig)
    dictionary = task.source_dictionary
    return SlamModel(cfg, build_slam_encoder(cfg, len(dictionary), dictionary.pad()), symbols=dictionary.symbols)


class _GradientBlowUp(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by 1e37, so a scaled loss overflows."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e37


class _Faulty:
    """``slam_multitask`` with one modality's loss altered: ``overflow`` (finite value, backward
    overflows once scaled) or ``nan`` (the loss itself is NaN)."""

    def __init__(self, criterion, modality: str, fault: str) -> None:
        self.criterion, self.modality, self.fault = criterion, modality, fault
        self.active = True

    def __call__(self, model, sample):
        loss, sample_size, logs = self.criterion(model, sample)
        if self.active and self.modality in sample:
            loss = _GradientBlowUp.apply(loss) if self.fault == "overflow" else loss * float("nan")
        return loss, sample_size, logs


def _adam_cfg():
    from fairseq.optim.adam import FairseqAdamConfig
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(FairseqAdamConfig(lr=[1e-3], tpu=False))
    cfg._name = "adam"
    return cfg


def _adam(params):
    from fairseq import optim

    return optim.build_optimizer(_adam_cfg(), params)


def _fp16_cfg():
    common = SimpleNamespace(fp16_scale_window=None, fp16_init_scale=INIT_SCALE, fp16_scale_tolerance=0.0,
                             threshold_loss_scale=None, min_loss_scale=1e-4, bf16=False, model_parallel_size=1,
                             fp16_no_flatten_grads=True)
    return SimpleNamespace(common=common, optimization=SimpleNamespace(update_freq=[1]),
                           distributed_training=SimpleNamespace(distributed_world_size=1), optimizer=_adam_cfg())


def build_optimizer(kind: str, model):
    from fairseq.optim.fp16_optimizer import FP16Optimizer, MemoryEfficientFP16Optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "fp32":
        return _adam(params)
    if kind == "memory_efficient_fp16":
        return MemoryEfficientFP16Optimizer(_fp16_cfg(), params, _adam(params))
    assert kind == "fp16"
    return FP16Optimizer.build_optimizer(_fp16_cfg(), params)  # unflattened: no CUDA buffer


def fairseq_update(task, sample, model, criterion, optimizer, update_num: int) -> str:
    """One update as ``Trainer.train_step`` makes it; "stepped" or "overflow" (skipped by the
    trainer's OverflowError handler)."""
    optimizer.zero_grad()
    torch.manual_seed(100 + update_num)
    _, sample_size, _ = task.train_step(sample, model, criterion, optimizer, update_num)
    try:
        optimizer.multiply_grads(1.0 / (float(sample_size) or 1.0))
        grad_norm = optimizer.clip_grad_norm(0.0)
        if not torch.isfinite(torch.as_tensor(grad_norm)).all():
            raise FloatingPointError("gradients are Nan/Inf")  # what fairseq raises in FP32
        task.optimizer_step(optimizer, model, update_num)
    except OverflowError:
        optimizer.zero_grad()
        return "overflow"
    return "stepped"


def _parameters(model):
    return {name: value.detach().clone() for name, value in model.named_parameters()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_state(optimizer):
    return copy.deepcopy(optimizer.state_dict())


def _same_state(a, b) -> bool:
    def flat(value):
        if isinstance(value, dict):
            return {k: flat(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [flat(v) for v in value]
        return value.tolist() if torch.is_tensor(value) else value
    return flat(a) == flat(b)


def test_the_loss_scale_is_applied_once_per_modality_backward(setting):
    task, sample = setting
    criterion = SlamMultitaskCriterion(SlamMultitaskCriterionConfig(), task=None)

    class _PlainBackward:
        def backward(self, loss):
            loss.backward()

    reference = make_model(task)
    torch.manual_seed(5)
    task.train_step(sample, reference, criterion, _PlainBackward(), update_num=0)
    expected = {name: p.grad.clone() for name, p in reference.named_parameters() if p.grad is not None}

    model = make_model(task)
    optimizer = build_optimizer("memory_efficient_fp16", model)
    scaled = []
    original_scale = optimizer.scaler.scale
    optimizer.scaler.scale = lambda loss: scaled.append(float(loss.detach())) or original_scale(loss)
    optimizer.zero_grad()  # as the trainer does first: the wrapper sets its unscale factor here
    torch.manual_seed(5)
    task.train_step(sample, model, criterion, optimizer, update_num=0)
    assert len(scaled) == 3, "one scaled backward per modality"
    for name, parameter in model.named_parameters():
        if name in expected:
            # the same sums in another thread order: tolerance relative to the tensor's size
            scale = float(expected[name].abs().max()) * INIT_SCALE + 1e-30
            torch.testing.assert_close(parameter.grad, expected[name] * INIT_SCALE, rtol=1e-3, atol=1e-5 * scale,
                                       msg=f"{name}: gradient is not the sum of the once-scaled modality gradients")
    # the wrapper takes the scale out once: the norm it reports is the unscaled gradient's
    optimizer.multiply_grads(1.0)
    reference_norm = torch.sqrt(sum((grad.double() ** 2).sum() for grad in expected.values()))
    torch.testing.assert_close(float(optimizer.clip_grad_norm(0.0)), float(reference_norm), rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("kind", ["memory_efficient_fp16", "fp16"])
def test_an_overflow_in_one_modality_backward_skips_the_update_and_lowers_the_scale(setting, kind):
    task, sample = setting
    model = make_model(task)
    optimizer = build_optimizer(kind, model)
    criterion = _Faulty(SlamMultitaskCriterion(SlamMultitaskCriterionConfig(), task=None), "text", "overflow")
    before, state_before = _parameters(model), _optimizer_state(optimizer)

    assert fairseq_update(task, sample, model, criterion, optimizer, update_num=0) == "overflow"
    assert _same(before, _parameters(model)), "a skipped update changes no weight"
    assert _same_state(state_before["state"] if "state" in state_before else {},
                       _optimizer_state(optimizer).get("state", {}))
    assert optimizer.scaler.loss_scale == INIT_SCALE / 2

    criterion.active = False
    assert fairseq_update(task, sample, model, criterion, optimizer, update_num=0) == "stepped"
    assert not _same(before, _parameters(model)) and optimizer.scaler.loss_scale == INIT_SCALE / 2


@pytest.mark.parametrize("kind", ["fp32", "memory_efficient_fp16"])
def test_a_nan_loss_in_one_modality_skips_the_whole_update_and_is_counted(setting, kind):
    from fairseq import metrics

    task, sample = setting
    model = make_model(task)
    optimizer = build_optimizer(kind, model)
    criterion = _Faulty(SlamMultitaskCriterion(SlamMultitaskCriterionConfig(), task=None), "pair", "nan")
    criterion.active = False
    skipped_before = task.update_guard.num_skipped_updates
    assert fairseq_update(task, sample, model, criterion, optimizer, update_num=0) == "stepped"
    before, state_before = _parameters(model), _optimizer_state(optimizer)

    criterion.active = True
    with metrics.aggregate(new_root=True) as aggregate:
        result = fairseq_update(task, sample, model, criterion, optimizer, update_num=1)
    assert result == "stepped", "no FloatingPointError, no overflow: the task skipped the step itself"
    assert _same(before, _parameters(model)), "no weight moved"
    assert _same_state(state_before, _optimizer_state(optimizer)), "Adam's moments and step count unchanged"
    if kind != "fp32":
        assert optimizer.scaler.loss_scale == INIT_SCALE, "a NaN loss is not mistaken for an overflow"
    assert task.update_guard.num_skipped_updates == skipped_before + 1
    assert aggregate.get_smoothed_values()["nonfinite_updates"] == skipped_before + 1

    criterion.active = False
    fairseq_update(task, sample, model, criterion, optimizer, update_num=2)
    assert not _same(before, _parameters(model)), "the next update trains again"


# -- a real run ---------------------------------------------------------------------------------------------
_NAN_AT_UPDATE_3 = (
    "import sys, torch\n"
    "import slam_fairseq\n"
    "from slam_fairseq.criterions.slam_multitask import SlamMultitaskCriterion\n"
    "original, text_calls = SlamMultitaskCriterion.forward, []\n"
    "def forward(self, model, sample, reduce=True):\n"
    "    loss, size, logs = original(self, model, sample)\n"
    "    if 'text' in sample:  # one text batch per update, no validation: the 3rd is update 3\n"
    "        text_calls.append(1)\n"
    "        if len(text_calls) == 3:  # the loss and its logged values, as a real NaN gives\n"
    "            loss = loss * float('nan')\n"
    "            logs = {k: v * float('nan') if torch.is_tensor(v) and v.is_floating_point() else v\n"
    "                    for k, v in logs.items()}\n"
    "    return loss, size, logs\n"
    "SlamMultitaskCriterion.forward = forward\n"
    "from fairseq_cli.train import cli_main; sys.argv[0] = 'fairseq-train'; cli_main()\n"
)


def test_cli_nan_loss_in_one_modality_is_skipped_and_counted(tmp_path):
    import os
    import subprocess

    data_dir = fixtures.build_data_dir(tmp_path / "data", real_speech=False)
    save_dir = tmp_path / "checkpoints"
    args = [str(data_dir), "--user-dir", USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny",
            "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8",
            "--max-sentences-speech", "2", "--max-sentences-text", "4", "--max-sentences-pair", "3",
            "--stage2-start-update", "0", "--max-update", "4", "--save-dir", str(save_dir),
            "--save-interval-updates", "1", "--no-epoch-checkpoints", "--disable-validation", "--cpu",
            "--seed", "2", "--log-format", "json", "--log-interval", "1", "--ddp-backend", "legacy_ddp"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fixtures.REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _NAN_AT_UPDATE_3, *args], capture_output=True, text=True,
                         env=env, cwd=str(fixtures.REPO_ROOT), timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-5000:]
    assert "update 3 skipped: non-finite loss in text (1 skipped so far)" in output
    records = {int(r["num_updates"]): r for r in fixtures.json_log_records(output)}
    assert sorted(records) == [1, 2, 3, 4]
    assert "nonfinite_updates" not in records[2] and int(records[3]["nonfinite_updates"]) == 1
    assert int(records[4]["nonfinite_updates"]) == 1
    # the skipped update's text objective is left out of the logs, not logged as NaN (which
    # made the epoch's summed losses NaN to its end)
    assert records[3].get("span_masking_loss") is None  # fairseq writes null for a meter left empty
    assert math.isfinite(float(records[3]["loss"]))
    summary = fixtures.json_log_records(output, kind="train")
    assert summary and all(math.isfinite(float(value)) for record in summary
                           for key, value in record.items() if key.endswith("loss")), summary

    def state(name):
        return torch.load(str(save_dir / name), map_location="cpu", weights_only=True)

    second, third, fourth = state("checkpoint_1_2.pt"), state("checkpoint_1_3.pt"), state("checkpoint_last.pt")
    assert _same(second["model"], third["model"]), "the skipped update 3 moved no weight"
    assert _same_state(second["last_optimizer_state"], third["last_optimizer_state"])
    assert not _same(third["model"], fourth["model"]), "update 4 trained"
