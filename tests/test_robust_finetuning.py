"""Fine-tuning that fails loudly or not at all: utterances shorter than the subsampling needs
(``slam_fairseq.modules.short_inputs``), and a pre-trained encoder that does not cover the model
(``--load-pretrained-slam-from`` is strict unless ``--allow-partial-pretrained-slam``).

Features are random frames (no espeak-ng needed): these tests are about shapes, masks, messages
and exit codes, not about what the model learns.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import slam_fairseq  # noqa: F401  (registers slam_s2t; allow-lists fairseq's checkpoint types)
from s2t_fixtures import s2t_cfg_and_task as _setup  # noqa: E402
from s2t_fixtures import (SENTENCES, USER_DIR, build_asr, build_slam_model, hypotheses, run_fairseq,
                          save_slam_checkpoint)
from slam_fairseq.models.pretrained_loading import PretrainedSlamError
from slam_fairseq.models.slam_s2t import PRETRAINED_PARTS, SlamSpeechEncoder
from slam_fairseq.modules.padding import sync_free_paths
from slam_fairseq.modules.short_inputs import ShortInputCounter, extend_short_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_syncs import SyncCounter  # noqa: E402

ENCODER_PREFIXES = tuple(f"encoder.{part}." for part in PRETRAINED_PARTS)
SHORT_ID, SHORT_FRAMES = "s2_4", 4


@pytest.fixture(scope="module")
def asr(tmp_path_factory):
    """ASR data: one random-feature utterance per sentence plus one of 4 frames."""
    root = tmp_path_factory.mktemp("robust_finetuning")
    rng = np.random.default_rng(0)
    features = {f"s{index}_150": rng.normal(size=(40 + 10 * index, 80)).astype(np.float32)
                for index in range(len(SENTENCES))}
    features[SHORT_ID] = rng.normal(size=(SHORT_FRAMES, 80)).astype(np.float32)
    task = build_asr(root / "asr", features, specaugment=False)
    checkpoint, _ = save_slam_checkpoint(root / "slam_tiny.pt", seed=1)
    return dict(root=root, data=root / "asr", task=task, features=features, checkpoint=checkpoint)


# -- short utterances ---------------------------------------------------------------------------------
@pytest.mark.parametrize("paths", [contextlib.nullcontext, sync_free_paths], ids=["cpu", "accelerator"])
def test_extend_short_inputs_appends_zero_frames_up_to_seven_and_leaves_the_rest(paths):
    features = torch.randn(3, 10, 4)
    features[0, 3:] = 5.0  # padding that is not zero: the extended frames are zeros all the same
    lengths = torch.tensor([3, 10, 0])
    tiny, same = torch.randn(2, 4, 4), torch.randn(2, 9, 4)
    tiny_lengths, same_lengths = torch.tensor([4, 2]), torch.tensor([9, 7])
    with paths(), SyncCounter() as counter:
        extended, new_lengths, short = extend_short_inputs(features, lengths)
        padded, tiny_lengths, tiny_short = extend_short_inputs(tiny, tiny_lengths)
        unchanged, unchanged_lengths, none_short = extend_short_inputs(same, same_lengths)
    assert short.tolist() == [True, False, True] and new_lengths.tolist() == [7, 10, 7]
    assert torch.equal(extended[0, :3], features[0, :3]) and torch.equal(extended[0, 3:7], torch.zeros(4, 4))
    assert torch.equal(extended[0, 7:], features[0, 7:]), "beyond 7 frames the padding is untouched"
    assert torch.equal(extended[1], features[1]) and torch.equal(extended[2, :7], torch.zeros(7, 4))

    assert padded.shape == (2, 7, 4) and tiny_lengths.tolist() == [7, 7] and tiny_short.all()
    assert torch.equal(padded[0, :4], tiny[0]) and torch.equal(padded[1, 2:], torch.zeros(5, 4))

    assert not none_short.any() and torch.equal(unchanged, same) and unchanged_lengths.tolist() == [9, 7]
    if paths is contextlib.nullcontext:
        assert unchanged is same, "on a CPU a batch without short utterances is not copied"
    else:
        assert counter.total == 0, dict(counter.counts)  # nothing read from the device


@pytest.mark.parametrize("paths", [contextlib.nullcontext, sync_free_paths], ids=["cpu", "accelerator"])
def test_short_input_counter_warns_at_powers_of_two_and_training_on_an_accelerator_reads_rarely(paths):
    warnings = []
    counter = ShortInputCounter(warnings.append)
    one_short = torch.tensor([True, False])
    with paths(), SyncCounter() as syncs:
        for _ in range(5):
            counter.add(one_short, training=True)
    on_accelerator = paths is sync_free_paths
    assert syncs.counts["_local_scalar_dense"] == (0 if on_accelerator else 5), dict(syncs.counts)
    assert (counter.total, warnings) == ((0, []) if on_accelerator else (5, [1, 2, 4]))
    with paths():
        counter.flush(3)  # not a power of two: nothing read
        assert counter.total == (0 if on_accelerator else 5)
        counter.flush(4)
        assert counter.total == 5 and warnings == ([5] if on_accelerator else [1, 2, 4])
        counter.add(torch.tensor([True, True, True]), training=False)  # validation / generation: read at once
        assert counter.total == 8 and warnings[-1] == 8
        for _ in range(3):
            counter.add(one_short, training=True)
        counter.flush(ShortInputCounter.FLUSH_EVERY + 1)  # past 1024, only every 1024th update reads
        assert counter.total == (8 if on_accelerator else 11)
        counter.flush(3 * ShortInputCounter.FLUSH_EVERY)
        assert counter.total == 11
        counter.add(one_short, training=True)  # --update-freq 2: two micro-batches of one update
        counter.flush(4 * ShortInputCounter.FLUSH_EVERY)
        counter.add(one_short, training=True)
        with SyncCounter() as syncs:
            counter.flush(4 * ShortInputCounter.FLUSH_EVERY)
        assert counter.total == (12 if on_accelerator else 13) and syncs.total == 0, "one read per update"
        counter.add(torch.tensor([False]), training=False)  # the end of a run: validation reads what is left
        assert counter.total == 13


def test_encoder_gives_a_short_utterance_one_frame_and_leaves_the_others_alone(caplog):
    slam_model, _ = build_slam_model(seed=2)
    encoder = SlamSpeechEncoder(slam_model.encoder, output_dim=64).eval()
    long = torch.randn(1, 30, 80)
    batch = torch.zeros(2, 30, 80)
    batch[0] = long[0]
    batch[1, :SHORT_FRAMES] = torch.randn(SHORT_FRAMES, 80)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        alone = encoder(long, torch.tensor([30]))
        both = encoder(batch, torch.tensor([30, SHORT_FRAMES]))
    padding = both["encoder_padding_mask"][0]
    assert (~padding).sum(dim=1).tolist() == [6, 1], "30 frames -> 6 encoder frames; the short one gets 1"
    assert torch.isfinite(both["encoder_out"][0]).all()
    torch.testing.assert_close(both["encoder_out"][0][:, 0], alone["encoder_out"][0][:, 0])
    assert "1 utterance(s) shorter than 7 feature frames so far were extended" in caplog.text
    assert encoder.num_short_inputs == 1


def test_a_fine_tuning_step_on_the_accelerator_paths_is_the_cpu_step_and_reads_nothing_itself(asr, tmp_path, caplog):
    """A batch with a 4-frame utterance, the CTC criterion: the same loss and gradients on both
    paths, and on the accelerator paths no device read is made by this package's code (those left
    are fairseq's own: its decoder's positions, its criterion's CTC and logging)."""
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--criterion", "label_smoothed_cross_entropy_with_ctc",
                       "--ctc-weight", "0.5", "--label-smoothing", "0.1", "--dropout", "0.0")
    split = f"train_{asr['task']}"
    task.load_dataset(split)
    dataset = task.dataset(split)
    batch = dataset.collater([dataset[index] for index in range(len(dataset))])
    assert int(batch["net_input"]["src_lengths"].min()) == SHORT_FRAMES
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    results = []
    for paths in (contextlib.nullcontext, sync_free_paths):
        model.zero_grad()
        with paths(), _SyncSites() as sites:
            loss, _, _ = criterion(model, batch)
            loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                        if p.grad is not None}, sites.ours))
    (cpu_loss, cpu_grads, _), (loss, grads, ours) = results
    assert ours == [], ours
    encoder = model.encoder
    assert encoder.num_short_inputs == 1, "the accelerator step's short utterance is still on the device"
    with caplog.at_level(logging.WARNING):
        model.set_num_updates(1)  # what fairseq's task.train_step calls: the encoder reads it
    assert encoder.num_short_inputs == 2 and "2 utterance(s) shorter than 7 feature frames" in caplog.text
    torch.testing.assert_close(loss, cpu_loss)
    assert cpu_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, cpu_grads[name], msg=name)

    widened = dict(batch, target=torch.nn.functional.pad(batch["target"], (0, 2), value=task.target_dictionary.pad()))
    assert torch.equal(model.get_ctc_target(widened)[0], model.get_ctc_target(batch)[0])  # the width read
    with sync_free_paths(), pytest.raises(RuntimeError, match="wider than its longest"):  # the device assert
        model.get_ctc_target(widened)


class _SyncSites(SyncCounter):
    """:class:`SyncCounter` that also keeps where each device read made by this package is."""

    def __init__(self) -> None:
        super().__init__()
        self.ours: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.total
        result = super().__torch_dispatch__(func, types, args, kwargs)
        if self.total > before:
            caller = next(frame for frame in reversed(traceback.extract_stack()[:-1])
                          if "/torch/" not in frame.filename and frame.filename != __file__)
            if f"{os.sep}slam_fairseq{os.sep}" in caller.filename:
                self.ours.append(f"{caller.filename}:{caller.lineno} {func}")
        return result


def test_fine_tuning_replaces_an_unreadable_checkpoint_last_before_fairseq_loads_it(asr, tmp_path, caplog):
    save_dir = tmp_path / "checkpoints"
    save_dir.mkdir()
    intact = save_dir / "checkpoint_3_30.pt"
    intact.write_bytes(asr["checkpoint"].read_bytes())
    last = save_dir / "checkpoint_last.pt"
    last.write_bytes(asr["checkpoint"].read_bytes()[:-4000])  # a kill during fairseq's copy
    cfg, task = _setup(asr["data"], asr["task"], save_dir)
    with caplog.at_level(logging.WARNING):
        task.build_model(cfg.model)
    assert last.read_bytes() == intact.read_bytes() and (save_dir / "checkpoint_last.pt.corrupt").is_file()
    assert f"moved it to {last}.corrupt and resuming from {intact}" in caplog.text


def test_cli_finetune_and_generate_over_a_manifest_with_a_short_utterance(asr, tmp_path):
    save_dir = tmp_path / "checkpoints"
    log = run_fairseq(
        "fairseq-train", asr["data"], "--user-dir", USER_DIR, "--task", "speech_to_text",
        "--config-yaml", f"config_{asr['task']}.yaml", "--train-subset", f"train_{asr['task']}",
        "--valid-subset", f"train_{asr['task']}", "--save-dir", save_dir, "--max-tokens", "4000",
        "--required-batch-size-multiple", "1", "--num-workers", "0", "--seed", "1", "--optimizer", "adam",
        "--lr", "1e-3", "--arch", "slam_s2t_tiny", "--criterion", "label_smoothed_cross_entropy_with_ctc",
        "--ctc-weight", "0.3", "--max-update", "3", "--no-epoch-checkpoints", "--log-format", "simple",
        "--log-interval", "1").stdout
    assert "utterance(s) shorter than 7 feature frames so far were extended" in log
    assert "valid on" in log, "validation over the same manifest ran"
    generated = run_fairseq(
        "fairseq-generate", asr["data"], "--user-dir", USER_DIR, "--task", "speech_to_text",
        "--config-yaml", f"config_{asr['task']}.yaml", "--gen-subset", f"train_{asr['task']}",
        "--path", save_dir / "checkpoint_last.pt", "--max-tokens", "4000", "--required-batch-size-multiple",
        "1", "--num-workers", "0", "--beam", "2", "--max-len-b", "10").stdout
    results = hypotheses(generated)
    assert len(results) == len(asr["features"]), "a hypothesis for every utterance, the short one included"
    short_index = list(asr["features"]).index(SHORT_ID)  # fairseq-generate numbers rows by position
    assert results[short_index][0] == SENTENCES[2][0]


# -- strict pre-trained loading -------------------------------------------------------------------------
def test_finetune_from_model_or_restore_file_with_a_pretraining_checkpoint_points_to_load_pretrained_slam_from(
        asr, tmp_path):
    """fairseq would load the slam checkpoint as a whole slam_s2t model and fail on the decoder
    ("Cannot load model parameters"); the build names the option that copies the encoder."""
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--finetune-from-model", str(asr["checkpoint"]))
    with pytest.raises(PretrainedSlamError, match=f"--finetune-from-model {asr['checkpoint']} is a slam "
                                                  r"pre-training checkpoint \(slam_tiny\).*--load-pretrained-slam-from"):
        task.build_model(cfg.model)
    for option in ("--restore-file", "--continue-once"):  # the other options that load a whole model
        cfg, task = _setup(asr["data"], asr["task"], tmp_path, option, str(asr["checkpoint"]))
        with pytest.raises(PretrainedSlamError, match=f"{option} {asr['checkpoint']} is a slam pre-training "
                                                      r"checkpoint \(slam_tiny\); " + option):
            task.build_model(cfg.model)
    resumed_dir = tmp_path / "resumed"  # with checkpoint_last.pt to resume, fairseq ignores the option
    resumed_dir.mkdir()
    (resumed_dir / "checkpoint_last.pt").write_bytes(asr["checkpoint"].read_bytes())
    cfg, task = _setup(asr["data"], asr["task"], resumed_dir, "--finetune-from-model", str(asr["checkpoint"]))
    from slam_fairseq.compat.fairseq_internals import weights_restored_by_fairseq

    task.build_model(cfg.model)  # not refused: fairseq resumes checkpoint_last.pt instead
    assert weights_restored_by_fairseq(task) == f"fairseq-train resumes from {resumed_dir / 'checkpoint_last.pt'}"


def test_a_missing_continue_once_file_is_said_and_the_pretrained_encoder_is_copied(asr, tmp_path, caplog):
    """fairseq starts without a --continue-once file that is not there ("No existing checkpoint
    found"): the plugin must not take it for a restore that holds the encoder already."""
    from slam_fairseq.compat.fairseq_internals import weights_restored_by_fairseq, whole_model_restore

    missing = tmp_path / "typo.pt"
    cfg, task = _setup(asr["data"], asr["task"], tmp_path / "run", "--continue-once", str(missing))
    with caplog.at_level(logging.WARNING):
        assert whole_model_restore(task) is None and weights_restored_by_fairseq(task) is None
    assert f"--continue-once {missing}: no such file" in caplog.text


def test_a_checkpoint_with_or_without_the_ctc_head_loads_into_a_model_with_or_without_it(asr, tmp_path, caplog):
    """Fine-tuning on from a checkpoint trained with the CTC loss without it (or the other way
    round): fairseq's strict load failed on ctc_projection ("Unexpected key(s)" / "Missing key(s)")."""
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--ctc-head")
    with_head = task.build_model(cfg.model)
    cfg, task = _setup(asr["data"], asr["task"], tmp_path)
    without = task.build_model(cfg.model)
    assert with_head.ctc_projection is not None and without.ctc_projection is None
    own_head = with_head.ctc_projection.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        without.load_state_dict(with_head.state_dict(), strict=True)
        with_head.load_state_dict(without.state_dict(), strict=True)
    assert "the checkpoint has a ctc_projection (trained with --ctc-head or --ctc-weight)" in caplog.text
    assert "the checkpoint has no ctc_projection" in caplog.text
    assert torch.equal(with_head.ctc_projection.weight, own_head)
    assert torch.equal(with_head.decoder.embed_tokens.weight, without.decoder.embed_tokens.weight)


def test_a_decoding_score_as_best_checkpoint_metric_is_refused_before_training(asr, tmp_path):
    """fairseq's speech_to_text validation logs losses only: --best-checkpoint-metric wer ended the
    run with KeyError: 'wer' at the first validation, before any checkpoint was saved."""
    for metric, scorer in (("wer", "--scoring wer"), ("bleu", "--scoring sacrebleu")):
        cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--best-checkpoint-metric", metric,
                           "--maximize-best-checkpoint-metric")
        with pytest.raises(ValueError, match=rf"--best-checkpoint-metric {metric}: fairseq's speech_to_text "
                                             rf"validation logs losses .*{scorer}"):
            task.build_model(cfg.model)
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--best-checkpoint-metric", "nll_loss")
    assert task.build_model(cfg.model) is not None


def test_encoder_settings_no_shape_shows_are_compared_with_the_checkpoint(asr, tmp_path):
    """Heads share one fused projection and GroupNorm's affine size is the same for any number of
    groups: a checkpoint pre-trained with other ones loaded cleanly and was read as another model."""
    for name, value, flag in (("encoder_attention_heads", 2, "--encoder-attention-heads 2"),
                              ("conv_norm_groups", 4, "--conv-norm-groups 4")):
        other, _ = save_slam_checkpoint(tmp_path / f"{name}.pt", **{name: value})
        cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(other))
        with pytest.raises(PretrainedSlamError, match=rf"{name}\.pt: the checkpoint's encoder was built with other "
                                                      rf"settings than this one \({name} {value} there, "
                                                      rf"\d+ here\).*\({flag}\)"):
            task.build_model(cfg.model)
        cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(other), *flag.split())
        model = task.build_model(cfg.model)  # with the checkpoint's setting: its encoder is copied
        saved = torch.load(str(other), map_location="cpu", weights_only=True)["model"]
        own = model.state_dict()
        copied = [key for key in saved if key in own and key.endswith(".weight")]
        assert copied and all(torch.equal(own[key], saved[key]) for key in copied), copied[:3]


def test_fewer_or_more_layers_is_an_error_naming_the_file_and_the_layers(asr, tmp_path):
    deeper, _ = save_slam_checkpoint(tmp_path / "deeper.pt", speech_encoder_layers=3)
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(deeper))
    with pytest.raises(PretrainedSlamError) as error:
        task.build_model(cfg.model)
    message = str(error.value)
    assert message.startswith(f"--load-pretrained-slam-from {deeper}: ")
    assert "checkpoint tensors the model lacks" in message and "encoder.speech_encoder.conformer.layers.2.*" in message
    assert "missing from the checkpoint" not in message and "--allow-partial-pretrained-slam" in message

    shallower, _ = save_slam_checkpoint(tmp_path / "shallower.pt", speech_encoder_layers=1)
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(shallower))
    with pytest.raises(PretrainedSlamError, match=r"shallower\.pt: .*model tensors missing from the checkpoint "
                                                  r"\(\d+\): encoder\.speech_encoder\.conformer\.layers\.1\.\*"):
        task.build_model(cfg.model)

    wide, _ = save_slam_checkpoint(tmp_path / "wide.pt", encoder_ffn_embed_dim=96)
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(wide))
    with pytest.raises(PretrainedSlamError, match=r"wide\.pt: .*shape mismatches \(\d+\): "
                                                  r"encoder\.speech_encoder\.conformer\.layers\.0\..* has shape "
                                                  r"\(96, 64\) in the checkpoint but \(128, 64\) in the model"):
        task.build_model(cfg.model)


def test_allow_partial_loads_what_fits_with_a_warning_listing_the_rest(asr, tmp_path, caplog):
    deeper, state = save_slam_checkpoint(tmp_path / "deeper.pt", speech_encoder_layers=3)
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(deeper),
                       "--allow-partial-pretrained-slam")
    with caplog.at_level(logging.WARNING):
        model = task.build_model(cfg.model)
    assert f"--allow-partial-pretrained-slam: {deeper} covers the encoder only in part" in caplog.text
    assert "encoder.speech_encoder.conformer.layers.2.*" in caplog.text
    model_state = model.state_dict()
    for key in model_state:
        if key.startswith(ENCODER_PREFIXES) and key in state:
            assert torch.equal(model_state[key], state[key]), key


def test_the_pretraining_checkpoint_is_read_memory_mapped(asr, tmp_path, monkeypatch):
    """Every rank reads the pre-training checkpoint: mapped, none holds the whole file (optimizer
    state included) in memory; the encoder gets the same weights."""
    path, state = save_slam_checkpoint(tmp_path / "slam.pt", seed=3)
    original, calls = torch.load, []

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(path))
    model = task.build_model(cfg.model)
    assert [call.get("mmap") for call in calls] == [True]
    copied = [key for key in model.state_dict() if key.startswith(ENCODER_PREFIXES) and key in state]
    assert copied and all(torch.equal(model.state_dict()[key], state[key]) for key in copied)


def test_unreadable_checkpoint_is_an_error_naming_the_file(asr, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(asr["checkpoint"].read_bytes()[:5000])
    cfg, task = _setup(asr["data"], asr["task"], tmp_path, "--load-pretrained-slam-from", str(broken))
    with pytest.raises(PretrainedSlamError, match=rf"--load-pretrained-slam-from {broken}: cannot be read"):
        task.build_model(cfg.model)


@pytest.mark.slow
def test_cli_layer_mismatch_exits_non_zero_with_the_message(asr, tmp_path):
    """fairseq-train itself stops (the in-process tests above take the same path, build_model)."""
    deeper, _ = save_slam_checkpoint(tmp_path / "deeper.pt", speech_encoder_layers=3)
    run = run_fairseq(
        "fairseq-train", asr["data"], "--user-dir", USER_DIR, "--task", "speech_to_text",
        "--config-yaml", f"config_{asr['task']}.yaml", "--train-subset", f"train_{asr['task']}",
        "--save-dir", tmp_path / "checkpoints", "--max-tokens", "4000", "--optimizer", "adam", "--lr", "1e-3",
        "--arch", "slam_s2t_tiny", "--criterion", "label_smoothed_cross_entropy", "--max-update", "1",
        "--load-pretrained-slam-from", deeper, check=False)
    assert run.returncode != 0
    assert f"PretrainedSlamError: --load-pretrained-slam-from {deeper}: the checkpoint" in run.stdout
    assert not (tmp_path / "checkpoints" / "checkpoint_last.pt").exists()
