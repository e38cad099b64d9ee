"""Model ``slam_s2t``, built the way fairseq-train builds it (fairseq's option parser, the
``speech_to_text`` task, ``task.build_model``), on espeak-ng speech: pre-trained encoder loading,
encoder freezing through fairseq's Trainer, padding, beam-search reordering and the CTC loss."""
from __future__ import annotations

import math

import pytest
import torch

import slam_fairseq  # noqa: F401  (registers slam, slam_s2t)
from s2t_fixtures import s2t_cfg_and_task as setup  # noqa: E402
from s2t_fixtures import (
    build_asr,
    build_multilingual_st,
    build_slam_model,
    save_fairseq_checkpoint,
    save_slam_checkpoint,
    single_thread,
    synthesize_features,
)
from slam_fairseq.models.pretrained_loading import PretrainedSlamError, copy_pretrained_encoder
from slam_fairseq.models.slam_s2t import CTC_BLANK_INDEX, PRETRAINED_PARTS, SlamS2TModel


ENCODER_PREFIXES = tuple(f"encoder.{part}." for part in PRETRAINED_PARTS)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("slam_s2t")
    features = synthesize_features(root)
    st_task = build_multilingual_st(root / "st", features)
    asr_task = build_asr(root / "asr", features, specaugment=True)
    checkpoint, checkpoint_state = save_slam_checkpoint(root / "slam_tiny.pt", seed=3)
    return dict(root=root, st=root / "st", st_task=st_task, asr=root / "asr", asr_task=asr_task,
                checkpoint=checkpoint, checkpoint_state=checkpoint_state)


def batch_of(task, split: str, count: int = 6):
    task.load_dataset(split)
    dataset = task.dataset(split)
    return dataset.collater([dataset[index] for index in range(count)])


def test_pretrained_encoder_equals_checkpoint_tensor_for_tensor(data, tmp_path):
    cfg, task = setup(data["st"], data["st_task"], tmp_path, "--load-pretrained-slam-from", str(data["checkpoint"]))
    model = task.build_model(cfg.model)
    assert isinstance(model, SlamS2TModel)
    model_state = model.state_dict()
    checkpoint_encoder = {key: value for key, value in data["checkpoint_state"].items()
                          if key.startswith(ENCODER_PREFIXES)}
    model_encoder = {key for key in model_state if key.startswith(ENCODER_PREFIXES)}
    assert model_encoder == set(checkpoint_encoder)
    for key, value in checkpoint_encoder.items():
        assert torch.equal(model_state[key], value), key
    # the saved fine-tuning config records it, so a fine-tuning checkpoint never copies again
    assert cfg.model.pretrained_slam_loaded is True


def test_load_report_names_unused_and_missing_keys(data):
    from slam_fairseq.models.slam_s2t import SlamSpeechEncoder

    slam_model, _ = build_slam_model(seed=5)
    encoder = SlamSpeechEncoder(slam_model.encoder, output_dim=64)
    checkpoint_state = dict(data["checkpoint_state"])
    dropped = "encoder.multimodal_encoder.modality_embedding.weight"
    del checkpoint_state[dropped]
    report = copy_pretrained_encoder(encoder, checkpoint_state, PRETRAINED_PARTS, "x.pt", "slam",
                                     allow_partial=True)
    assert report.missing_model_keys == [dropped]
    assert "msm_head.weight" in report.unused_checkpoint_keys
    assert any(key.startswith("encoder.text_encoder.") for key in report.unused_checkpoint_keys)
    assert not any(key.startswith(ENCODER_PREFIXES) for key in report.unused_checkpoint_keys)
    assert report.num_loaded_elements == sum(checkpoint_state[key].numel() for key in report.loaded_keys)
    summary = report.summary()
    assert f"loaded {len(report.loaded_keys)} tensors" in summary and "encoder.text_encoder.*" in summary


def test_shape_mismatch_names_key_and_both_shapes(data, tmp_path):
    checkpoint, _ = save_slam_checkpoint(tmp_path / "wide.pt", encoder_ffn_embed_dim=96)
    cfg, task = setup(data["st"], data["st_task"], tmp_path, "--load-pretrained-slam-from", str(checkpoint))
    with pytest.raises(PretrainedSlamError) as error:
        task.build_model(cfg.model)
    message = str(error.value)
    assert "encoder.speech_encoder.conformer.layers.0." in message
    assert "(96, 64)" in message and "(128, 64)" in message


def test_not_a_slam_checkpoint_is_refused(data, tmp_path):
    slam_model, slam_cfg = build_slam_model()
    other = save_fairseq_checkpoint(tmp_path / "other.pt", slam_model.state_dict(),
                                    {"_name": "s2t_transformer"}, task_name="speech_to_text")
    headless = save_fairseq_checkpoint(tmp_path / "headless.pt", {"decoder.weight": torch.zeros(2)},
                                       {"encoder_embed_dim": 64})
    for path in (other, headless):
        cfg, task = setup(data["st"], data["st_task"], tmp_path, "--load-pretrained-slam-from", str(path))
        with pytest.raises(PretrainedSlamError, match="not a SLAM model"):
            task.build_model(cfg.model)
    cfg, task = setup(data["st"], data["st_task"], tmp_path, "--load-pretrained-slam-from", str(tmp_path / "no.pt"))
    with pytest.raises(PretrainedSlamError, match="no such file"):
        task.build_model(cfg.model)


def test_no_copy_when_fairseq_restores_a_checkpoint(data, tmp_path):
    # fairseq-train resuming: checkpoint_last.pt in --save-dir
    (tmp_path / "checkpoint_last.pt").write_bytes(data["checkpoint"].read_bytes())  # readable: not repaired
    cfg, task = setup(data["st"], data["st_task"], tmp_path, "--load-pretrained-slam-from", "/missing/slam.pt")
    task.build_model(cfg.model)  # the (missing) pre-trained file is not even opened
    assert cfg.model.pretrained_slam_loaded is True
    # a fine-tuning checkpoint's own config
    cfg, task = setup(data["st"], data["st_task"], tmp_path / "fresh", "--load-pretrained-slam-from",
                      "/missing/slam.pt", "--pretrained-slam-loaded")
    task.build_model(cfg.model)  # the (missing) file is not opened: the config says it was copied
    assert cfg.model.pretrained_slam_loaded is True


def test_freeze_encoder_updates_through_fairseq_trainer(data, tmp_path):
    from fairseq.trainer import Trainer

    cfg, task = setup(data["st"], data["st_task"], tmp_path, "--load-pretrained-slam-from", str(data["checkpoint"]),
                      "--freeze-encoder-updates", "2", "--criterion", "label_smoothed_cross_entropy",
                      "--ignore-prefix-size", "1", "--optimizer", "adam", "--lr", "1e-3", "--weight-decay", "0.01")
    model = task.build_model(cfg.model)
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    batch = batch_of(task, f"train_{data['st_task']}")

    def snapshot(prefixes):
        return {key: value.clone() for key, value in model.state_dict().items() if key.startswith(prefixes)}

    encoder_before = snapshot(ENCODER_PREFIXES)
    trained_before = snapshot(("decoder.", "encoder.output_projection."))
    for _ in range(2):
        trainer.train_step([batch])
    assert trainer.get_num_updates() == 2
    for key, value in snapshot(ENCODER_PREFIXES).items():
        assert torch.equal(value, encoder_before[key]), f"{key} changed while frozen"
    changed = [key for key, value in snapshot(("decoder.", "encoder.output_projection.")).items()
               if not torch.equal(value, trained_before[key])]
    assert "encoder.output_projection.weight" in changed
    assert any(key.startswith("decoder.layers.") for key in changed)
    trainer.train_step([batch])  # update 3: the encoder trains
    changed_encoder = [key for key, value in snapshot(ENCODER_PREFIXES).items()
                       if not torch.equal(value, encoder_before[key])]
    assert any(key.startswith("encoder.speech_encoder.conformer.") for key in changed_encoder)
    assert any(key.startswith("encoder.multimodal_encoder.conformer.") for key in changed_encoder)


def test_padding_does_not_change_outputs_and_reorder_matches(data, tmp_path):
    cfg, task = setup(data["st"], data["st_task"], tmp_path)
    model = task.build_model(cfg.model).eval()
    batch = batch_of(task, f"train_{data['st_task']}")
    net_input = batch["net_input"]
    lengths = net_input["src_lengths"]
    assert int(lengths.min()) < int(lengths.max())
    with torch.no_grad():
        logits, extra = model(**net_input)
        encoder_out = extra["encoder_out"]
        states = encoder_out["encoder_out"][0]
        assert states.shape[1] == len(lengths) and states.shape[2] == cfg.model.decoder_embed_dim
        row = int(lengths.argmin())
        alone = {key: value[row:row + 1] for key, value in net_input.items()}
        alone["src_tokens"] = alone["src_tokens"][:, : int(lengths[row])]
        logits_alone, extra_alone = model(**alone)
        frames = extra_alone["encoder_out"]["encoder_out"][0].shape[0]
        torch.testing.assert_close(extra_alone["encoder_out"]["encoder_out"][0][:, 0], states[:frames, row],
                                   atol=1e-5, rtol=1e-4)
        target_length = int((batch["target"][row] != task.target_dictionary.pad()).sum())
        torch.testing.assert_close(logits_alone[0, :target_length], logits[row, :target_length],
                                   atol=1e-4, rtol=1e-4)
        new_order = torch.tensor([2, 0, 0, 1])
        reordered = model.encoder.reorder_encoder_out(encoder_out, new_order)
        assert torch.equal(reordered["encoder_out"][0], states.index_select(1, new_order))
        assert torch.equal(reordered["encoder_padding_mask"][0],
                           encoder_out["encoder_padding_mask"][0].index_select(0, new_order))


def _ctc_setup(data, tmp_path, weight: str, *extra: str):
    return setup(data["asr"], data["asr_task"], tmp_path, "--criterion", "label_smoothed_cross_entropy_with_ctc",
                 "--ctc-weight", weight, "--label-smoothing", "0.1", *extra)


def test_ctc_weight_zero_equals_label_smoothed_cross_entropy(data, tmp_path):
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    cfg, task = _ctc_setup(data, tmp_path, "0")
    model = task.build_model(cfg.model).eval()
    assert model.ctc_projection is None  # weight 0: no head
    with_ctc = task.build_criterion(cfg.criterion)
    plain = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.1)
    batch = batch_of(task, f"train_{data['asr_task']}")
    with torch.no_grad():
        loss_with_ctc, size_a, _ = with_ctc(model, batch)
        loss_plain, size_b, _ = plain(model, batch)
    assert size_a == size_b
    assert torch.equal(loss_with_ctc, loss_plain)


def test_ctc_targets_blank_and_loss_decreases(data, tmp_path):
    import torch.nn.functional as F

    cfg, task = _ctc_setup(data, tmp_path, "1.0", "--dropout", "0.0")
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    assert model.ctc_projection is not None and cfg.model.ctc_head is True
    criterion = task.build_criterion(cfg.criterion)
    batch = batch_of(task, f"train_{data['asr_task']}")
    dictionary = task.target_dictionary

    targets, target_lengths = model.get_ctc_target(batch)
    assert torch.equal(target_lengths, batch["target_lengths"] - 1)
    for row, length in enumerate(target_lengths.tolist()):
        assert torch.equal(targets[row, :length], batch["target"][row, :length])
        assert dictionary.eos() not in targets[row, :length].tolist()
    assert CTC_BLANK_INDEX == dictionary.bos()

    model.eval()
    with torch.no_grad():
        net_output = model(**batch["net_input"])
        log_probs, output_lengths = model.get_ctc_output(net_output, batch)
        mask = torch.arange(targets.shape[1])[None, :] < target_lengths[:, None]
        expected = F.ctc_loss(log_probs, targets[mask], output_lengths, target_lengths, blank=CTC_BLANK_INDEX,
                              reduction="sum", zero_infinity=True)
        _, _, logging_output = criterion(model, batch)
    assert math.isclose(logging_output["ctc_loss"], expected.item(), rel_tol=1e-5)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, ctc_losses = [], []
    for _ in range(25):
        optimizer.zero_grad()
        loss, _, logging_output = criterion(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        ctc_losses.append(logging_output["ctc_loss"])
    assert losses[-1] < 0.6 * losses[0], losses
    assert ctc_losses[-1] < 0.6 * ctc_losses[0], ctc_losses


def test_ctc_target_leaves_out_the_language_tag(data, tmp_path):
    cfg, task = setup(data["st"], data["st_task"], tmp_path, "--ctc-head")
    model = task.build_model(cfg.model)
    batch = batch_of(task, f"train_{data['st_task']}")
    targets, lengths = model.get_ctc_target(batch)
    tags = {index for symbol, index in task.target_dictionary.indices.items() if symbol.startswith("<lang:")}
    assert {int(token) for token in batch["target"][:, 0]} <= tags
    for row, length in enumerate(lengths.tolist()):
        assert not tags & set(targets[row, :length].tolist())
        assert torch.equal(targets[row, :length], batch["target"][row, 1:1 + length])


def test_presets_sizes():
    from argparse import Namespace

    from slam_fairseq.models.slam_s2t import slam_s2t_covost, slam_s2t_tiny

    paper = Namespace()
    slam_s2t_covost(paper)
    assert (paper.encoder_embed_dim, paper.speech_encoder_layers, paper.multimodal_encoder_layers) == (1024, 8, 16)
    assert (paper.decoder_layers, paper.decoder_embed_dim, paper.decoder_ffn_embed_dim,
            paper.decoder_attention_heads) == (4, 384, 1536, 4)
    tiny = Namespace(decoder_layers=1)
    slam_s2t_tiny(tiny)
    assert (tiny.encoder_embed_dim, tiny.decoder_embed_dim, tiny.decoder_layers) == (64, 64, 1)
