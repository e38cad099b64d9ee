"""The ``slam`` model's pre-training heads and the ``slam_multitask`` criterion, on hand-built batches
that follow docs/pretraining_batches.md, with the ``slam_tiny`` sizes."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
from fairseq.data import Dictionary

import slam_fairseq  # noqa: F401  (registers model, criterion)
from slam_fairseq.criterions.slam_multitask import (
    SlamMultitaskCriterion,
    SlamMultitaskCriterionConfig,
)
from slam_fairseq.encoders.config import config_from
from slam_fairseq.encoders.slam_encoder import build_slam_encoder
from slam_fairseq.models.slam import SlamConfig, SlamModel, slam_tiny
from slam_fairseq.modules.subsampling import subsampled_lengths

SPEECH_FEATURE_LENGTHS = (240, 200, 160)  # 59, 49, 39 subsampled frames
PAIR_FEATURE_LENGTHS = (72, 57, 40)
TEXT_LENGTHS = (9, 14, 6)


def make_dictionary() -> Dictionary:
    dictionary = Dictionary()
    for index in range(24):
        dictionary.add_symbol(f"w{index}")
    dictionary.add_symbol("<mask>")
    return dictionary


def make_model(seed: int = 0, dropout: float = 0.0, **overrides) -> SlamModel:
    torch.manual_seed(seed)
    namespace = argparse.Namespace(dropout=dropout, **overrides)
    slam_tiny(namespace)
    cfg = config_from(namespace, SlamConfig)
    dictionary = make_dictionary()
    return SlamModel(cfg, build_slam_encoder(cfg, len(dictionary), dictionary.pad()), symbols=dictionary.symbols)


def make_criterion(**overrides) -> SlamMultitaskCriterion:
    return SlamMultitaskCriterion(SlamMultitaskCriterionConfig(**overrides), task=None)


def _span_mask(length: int, width: int, probability: float, span: int, generator) -> torch.Tensor:
    mask = torch.zeros(width, dtype=torch.bool)
    starts = (torch.rand(length, generator=generator) < probability).nonzero().flatten()
    for start in starts.tolist():
        mask[start:min(start + span, length)] = True
    if not mask[:length].any():
        mask[0] = True
    return mask


def _speech_part(generator, lengths, frame_probability: float, span: int):
    lengths = torch.tensor(lengths)
    features = torch.zeros(len(lengths), int(lengths.max()), 80)
    for row, length in enumerate(lengths.tolist()):
        features[row, :length] = torch.randn(length, 80, generator=generator)
    sub_lengths = subsampled_lengths(lengths)
    width = int(sub_lengths.max())
    frame_mask = torch.stack([_span_mask(int(n), width, frame_probability, span, generator)
                              for n in sub_lengths])
    return {"id": torch.arange(len(lengths)), "features": features, "feature_lengths": lengths,
            "frame_mask": frame_mask, "nframes": int(sub_lengths.sum())}


def _text_part(generator, dictionary: Dictionary, lengths, mask_probability: float):
    rows = len(lengths)
    clean = torch.full((rows, max(lengths)), dictionary.pad())
    for row, length in enumerate(lengths):
        clean[row, :length] = torch.randint(dictionary.nspecial, len(dictionary) - 1, (length,),
                                            generator=generator)
    masked = torch.stack([_span_mask(length, clean.shape[1], mask_probability, 2, generator)
                          for length in lengths])
    tokens = clean.masked_fill(masked, dictionary.index("<mask>"))
    target = clean.masked_fill(~masked, dictionary.pad())
    return clean, tokens, target


def make_sample(seed: int = 0) -> dict:
    """One batch of each modality, as ``slam_pretraining`` yields them."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = make_dictionary()
    speech = _speech_part(generator, SPEECH_FEATURE_LENGTHS, 0.065, 10)  # w2v-BERT: about 50%
    _, tokens, target = _text_part(generator, dictionary, TEXT_LENGTHS, 0.1)
    text = {"id": torch.arange(len(TEXT_LENGTHS)), "tokens": tokens, "target": target,
            "ntokens": sum(TEXT_LENGTHS)}
    pair = _speech_part(generator, PAIR_FEATURE_LENGTHS, 0.4, 3)
    clean, tokens, target = _text_part(generator, dictionary, TEXT_LENGTHS, 0.3)
    stm_text_index = torch.tensor([0, 2, 1])
    pair.update(tokens=tokens, target=target, clean_tokens=clean, stm_text_index=stm_text_index,
                stm_label=(stm_text_index == torch.arange(3)).long(), ntokens=sum(TEXT_LENGTHS))
    return {"speech": speech, "text": text, "pair": pair}


def gradients(model) -> dict:
    return {name: (parameter.grad.clone() if parameter.grad is not None else torch.zeros_like(parameter))
            for name, parameter in model.named_parameters()}


def test_batches_follow_the_contract():
    sample = make_sample()
    for name in ("speech", "pair"):
        batch = sample[name]
        sub_lengths = subsampled_lengths(batch["feature_lengths"])
        assert batch["frame_mask"].shape == (3, int(sub_lengths.max()))
        padding = torch.arange(batch["frame_mask"].shape[1]) >= sub_lengths[:, None]
        assert not batch["frame_mask"][padding].any()


def test_model_outputs_have_the_documented_shapes():
    model = make_model().eval()
    sample = make_sample()
    outputs = model(**sample)
    speech, text, pair = outputs["speech"], outputs["text"], outputs["pair"]
    num_masked = int(sample["speech"]["frame_mask"].sum())
    assert speech.contrastive_predictions.shape == (num_masked, 32)
    assert speech.codevectors.shape == (num_masked, 32)
    assert speech.code_ids.shape == (num_masked, 1)
    assert speech.code_logits.shape == (num_masked, 1, 64)
    assert torch.equal(speech.utterance_index, sample["speech"]["frame_mask"].nonzero()[:, 0])
    assert speech.num_frames == sample["speech"]["nframes"]
    num_masked_tokens = int(sample["text"]["target"].ne(1).sum())
    assert text.text_logits.shape == (num_masked_tokens, len(make_dictionary()))
    assert text.num_tokens == sample["text"]["ntokens"]
    assert pair.code_logits.shape[0] == int(sample["pair"]["frame_mask"].sum())
    assert pair.text_logits.shape[0] == int(sample["pair"]["target"].ne(1).sum())
    assert pair.stm_logits.shape == (3, 2)
    # the fine-tuning path still gives multimodal encoder states
    states = model(sample["speech"]["features"], sample["speech"]["feature_lengths"])
    assert states.output.shape[:2] == sample["speech"]["frame_mask"].shape


def test_text_head_is_tied_to_the_token_embedding():
    model = make_model()
    assert model.text_prediction_head.weight is model.encoder.text_encoder.embed_tokens.weight


def test_tlm_text_positions_are_read_after_each_rows_speech():
    """A pair's masked-token logits equal the head applied to the text part of the packed output."""
    model = make_model().eval()
    batch = make_sample()["pair"]
    output = model.forward_pair(batch)
    speech, joint = model.encoder.encode_pair(batch["features"], batch["feature_lengths"], batch["tokens"],
                                              batch["frame_mask"])
    text_states = joint.text_part()
    masked = batch["target"].ne(1)
    expected = model.text_prediction_head(text_states[masked])
    assert torch.allclose(output.text_logits, expected, atol=1e-5)


def test_summed_gradient_of_full_sample_equals_sum_of_single_modality_calls():
    model = make_model().eval()
    criterion = make_criterion()
    sample = make_sample()

    torch.manual_seed(123)
    loss, sample_size, _ = criterion(model, sample)
    loss.backward()
    full = gradients(model)
    assert sample_size == 1

    model.zero_grad()
    total_loss = 0.0
    for name in ("speech", "text", "pair"):
        torch.manual_seed(123)  # the speech call draws the same distractors as the full call
        single_loss, single_size, _ = criterion(model, {name: sample[name]})
        single_loss.backward()
        total_loss += single_loss.item()
        assert single_size == 1
    summed = gradients(model)
    assert loss.item() == pytest.approx(total_loss, rel=1e-5)
    for name in full:
        assert torch.allclose(full[name], summed[name], atol=1e-6, rtol=1e-4), name


def test_every_parameter_gets_a_gradient_from_the_full_sample():
    model = make_model().train()
    loss, _, _ = make_criterion()(model, make_sample())
    loss.backward()
    missing = [name for name, parameter in model.named_parameters()
               if parameter.grad is None or not parameter.grad.abs().sum() > 0]
    assert not missing


def test_logging_output_and_reduced_metrics():
    from fairseq import metrics

    model = make_model().train()
    criterion = make_criterion()
    sample = make_sample()
    _, _, logging_output = criterion(model, sample)
    assert logging_output["nframes_speech"] == sample["speech"]["nframes"]
    assert logging_output["ntokens_text"] == sample["text"]["ntokens"]
    assert logging_output["ntokens_pair"] == sample["pair"]["ntokens"]
    assert logging_output["nframes_pair"] == sample["pair"]["nframes"]
    assert 1.0 < logging_output["_code_perplexity_sum"] <= 64
    assert logging_output["_gumbel_temperature_sum"] == pytest.approx(2.0)
    assert SlamMultitaskCriterion.logging_outputs_can_be_summed()

    with metrics.aggregate() as aggregated:
        SlamMultitaskCriterion.reduce_metrics([logging_output, logging_output])
    values = aggregated.get_smoothed_values()
    for name in ("span_masking", "msm_contrastive", "msm_mlm", "tlm_text", "tlm_speech", "stm"):
        assert math.isfinite(values[f"{name}_loss"]) and values[f"{name}_loss"] > 0, name
        assert 0.0 <= values[f"{name}_accuracy"] <= 1.0, name
    assert 0.0 <= values["diversity_loss"] < 1.0
    assert 1.0 < values["code_perplexity"] <= 64
    assert 1.0 < values["prob_perplexity"] <= 64
    assert values["gumbel_temperature"] == pytest.approx(2.0)
    assert values["nframes_speech"] == 2 * sample["speech"]["nframes"]
    # the weighted total is the sum of the weighted parts
    # cross-entropies and the total are in base 2 (fairseq's convention); diversity is a fraction
    weighted = sum(criterion.weight(name) * values[f"{name}_loss"]
                   for name in ("span_masking", "msm_contrastive", "msm_mlm", "tlm_text", "tlm_speech",
                                "stm"))
    weighted += criterion.weight("diversity") * values["diversity_loss"] / math.log(2)
    assert values["loss"] == pytest.approx(weighted, rel=1e-2)


def test_gumbel_temperature_anneals_with_updates():
    model = make_model()
    model.set_num_updates(100_000)
    assert model.quantizer.curr_temp == pytest.approx(max(2 * 0.999995 ** 100_000, 0.5))
    model.set_num_updates(10_000_000)
    assert model.quantizer.curr_temp == pytest.approx(0.5)


def test_a_few_adam_steps_reduce_every_objective():
    """20 Adam steps on one fixed batch lower every objective (evaluated in eval mode, same draws).

    The diversity weight is raised to 1 here: on so small a batch, with the default 0.1, the
    contrastive loss reaches chance level fastest by sending every frame to the same code (the
    masked frames' predictions start nearly identical), and the codebook collapses within a few
    steps (code perplexity 1). The code-id losses chase targets that move with the quantizer, so
    with other seeds one of them can end slightly higher after so few steps.
    """
    model = make_model(seed=0)
    criterion = make_criterion(diversity_weight=1.0)
    sample = make_sample(seed=0)

    def evaluate():
        model.eval()
        torch.manual_seed(7)
        with torch.no_grad():
            objectives = criterion.compute_objectives(model(**sample))
        model.train()
        return {name: objective.loss.item() for name, objective in objectives.items()}

    before = evaluate()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    for step in range(20):
        torch.manual_seed(step)
        optimizer.zero_grad()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        optimizer.step()
    after = evaluate()
    assert set(before) == {"span_masking", "msm_contrastive", "diversity", "msm_mlm", "tlm_text",
                           "tlm_speech", "stm"}
    for name in before:
        assert after[name] < before[name], (name, before[name], after[name])


def test_losses_are_float32_under_a_bfloat16_model():
    model = make_model().to(torch.bfloat16).train()
    criterion = make_criterion()
    sample = make_sample()
    for batch in sample.values():
        batch["features"] = batch["features"].to(torch.bfloat16) if "features" in batch else None
    sample["text"].pop("features")
    objectives = criterion.compute_objectives(model(**sample))
    for name, objective in objectives.items():
        assert objective.loss.dtype == torch.float32, name
        assert torch.isfinite(objective.loss), name
    loss, _, _ = criterion(model, sample)
    assert loss.dtype == torch.float32
    loss.backward()


def test_checkpoint_activations_give_the_same_loss_and_gradients():
    sample = make_sample()
    results = []
    for checkpoint_activations in (False, True):
        model = make_model(checkpoint_activations=checkpoint_activations).train()
        torch.manual_seed(5)  # Gumbel noise and distractors; recomputation restores the RNG state
        loss, _, _ = make_criterion()(model, sample)
        loss.backward()
        results.append((loss.item(), gradients(model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name in results[0][1]:
        assert torch.allclose(results[0][1][name], results[1][1][name], atol=1e-6, rtol=1e-4), name


def test_frame_mask_wider_than_the_subsampled_features_is_trimmed_when_padding_only():
    model = make_model().eval()
    batch = dict(make_sample()["speech"])
    batch["frame_mask"] = torch.cat((batch["frame_mask"], torch.zeros(3, 2, dtype=torch.bool)), dim=1)
    assert model.forward_speech(batch).code_logits.shape[0] == int(batch["frame_mask"].sum())
    batch["frame_mask"][:, -1] = True
    with pytest.raises(ValueError, match="subsampled"):
        model.forward_speech(batch)


def test_an_empty_sample_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        make_criterion()(make_model(), {"speech": None})


def test_the_pretraining_model_under_a_task_without_a_text_dictionary_says_what_to_do():
    """fairseq-generate --task slam_speech_to_text --path PRETRAINING_CHECKPOINT builds ``slam``
    under a task without a source dictionary."""
    from types import SimpleNamespace

    from slam_fairseq.models.slam import SlamConfig, SlamModel
    with pytest.raises(ValueError, match="slam_s2t_.*--load-pretrained-slam-from"):
        SlamModel.build_model(SlamConfig(), SimpleNamespace(source_dictionary=None))
