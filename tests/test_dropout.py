"""The CPU dropout: its drop rate, scaling, gradient, independence of the elements that share a
64-bit draw, reproducibility, and where it hands over to ``F.dropout``."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slam_fairseq.modules.dropout as dropout_module
from slam_fairseq.modules.dropout import Dropout, cpu_dropout, rounded_drop_probability

NUM_ELEMENTS = 1 << 20


def _tolerance(probability: float, count: int) -> float:
    """Six binomial standard deviations of a frequency over ``count`` trials."""
    return 6.0 * math.sqrt(probability * (1.0 - probability) / count)


def test_rounded_drop_probability_is_a_multiple_of_two_to_the_minus_sixteen():
    assert rounded_drop_probability(0.1) == 6554 / 65536
    assert abs(rounded_drop_probability(0.1) - 0.1) < 2 ** -17
    assert rounded_drop_probability(0.5) == 0.5


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_scaling_and_expectation(p):
    torch.manual_seed(0)
    x = torch.rand(NUM_ELEMENTS) + 0.5  # no zeros in the input
    output = cpu_dropout(x, p)
    dropped = output == 0
    rate = rounded_drop_probability(p)
    assert abs(dropped.double().mean().item() - rate) < _tolerance(rate, NUM_ELEMENTS)
    scale = 1.0 / (1.0 - rate)
    torch.testing.assert_close(output[~dropped], x[~dropped] * scale)
    ones = cpu_dropout(torch.ones(NUM_ELEMENTS), p)  # unbiased: the mean of the output is 1
    assert abs(ones.double().mean().item() - 1.0) < scale * _tolerance(rate, NUM_ELEMENTS)


def test_elements_sharing_a_draw_are_independent():
    """Four elements come from one 64-bit word; each position in the word drops at the same rate,
    and two neighbours are dropped together at the rate squared."""
    torch.manual_seed(1)
    p = 0.3
    dropped = (cpu_dropout(torch.ones(NUM_ELEMENTS), p) == 0).view(-1, 4).double()
    count = dropped.shape[0]
    for position in range(4):
        assert abs(dropped[:, position].mean().item() - p) < _tolerance(p, count)
    for first, second in ((0, 1), (1, 2), (2, 3), (3, 0)):
        both = (dropped[:, first] * dropped[:, second]).mean().item()
        assert abs(both - p * p) < _tolerance(p * p, count)


def test_every_bit_of_every_draw_is_uniform():
    """All 16 bits of each int16 decide (a drop rate only tests the high ones): each bit is set
    half the time, at each of the four positions in a 64-bit word."""
    torch.manual_seed(7)
    draws = dropout_module._keep_draws(NUM_ELEMENTS, torch.device("cpu")).view(-1, 4).to(torch.int32)
    count = draws.shape[0]
    for bit in range(16):
        frequency = ((draws >> bit) & 1).double().mean(dim=0)
        assert ((frequency - 0.5).abs() < _tolerance(0.5, count)).all(), (bit, frequency)


def test_inplace_multiplies_the_input_itself():
    torch.manual_seed(8)
    x = torch.rand(64, 64) + 0.5
    expected = x.clone()
    torch.manual_seed(9)
    output = Dropout(0.3, inplace=True).train()(x)
    torch.manual_seed(9)
    assert output is x
    assert torch.equal(x, cpu_dropout(expected, 0.3))
    assert (x == 0).any()


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    x = torch.randn(8, 149, 64, requires_grad=True)
    output = cpu_dropout(x, 0.1)
    weight = torch.randn_like(output)
    (output * weight).sum().backward()
    kept = output.detach() != 0
    expected = torch.where(kept, weight / (1.0 - rounded_drop_probability(0.1)), torch.zeros_like(weight))
    torch.testing.assert_close(x.grad, expected)


def test_same_seed_same_mask_and_other_seeds_other_masks():
    x = torch.randn(4, 33, 7)  # an element count that is not a multiple of four
    torch.manual_seed(3)
    first = cpu_dropout(x, 0.1)
    torch.manual_seed(3)
    again = cpu_dropout(x, 0.1)
    torch.manual_seed(4)
    other = cpu_dropout(x, 0.1)
    assert first.shape == x.shape
    assert torch.equal(first, again)
    assert not torch.equal(first == 0, other == 0)


def test_half_precision_inputs_keep_their_dtype():
    torch.manual_seed(5)
    x = torch.randn(64, 64).bfloat16()
    output = cpu_dropout(x, 0.1)
    assert output.dtype == torch.bfloat16
    kept = output != 0
    scale = torch.tensor(1.0 / (1.0 - rounded_drop_probability(0.1))).bfloat16()
    assert torch.equal(output[kept], x[kept] * scale)


def test_module_is_identity_in_evaluation_and_at_zero_and_zeroes_at_one():
    x = torch.randn(16, 16)
    module = Dropout(0.5).eval()
    assert torch.equal(module(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_module_uses_the_cpu_draw_in_training_and_f_dropout_under_compile(monkeypatch):
    x = torch.randn(32, 32)
    module = Dropout(0.1).train()
    torch.manual_seed(6)
    ours = module(x)
    torch.manual_seed(6)
    assert torch.equal(ours, cpu_dropout(x, 0.1))
    monkeypatch.setattr(dropout_module, "_is_compiling", lambda: True)
    torch.manual_seed(6)
    traced = module(x)
    torch.manual_seed(6)
    assert torch.equal(traced, F.dropout(x, 0.1, True))


def test_every_dropout_of_the_encoder_is_the_cpu_dropout():
    from slam_fairseq.encoders.config import SlamEncoderConfig
    from slam_fairseq.encoders.slam_encoder import build_slam_encoder

    encoder = build_slam_encoder(SlamEncoderConfig(encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                                                   encoder_attention_heads=2, speech_encoder_layers=1,
                                                   multimodal_encoder_layers=1),
                                 vocab_size=20, padding_idx=1)
    dropouts = [module for module in encoder.modules() if isinstance(module, nn.Dropout)]
    assert dropouts and all(isinstance(module, Dropout) for module in dropouts)


def test_retain_dropout_keeps_the_encoders_dropout_on_in_generation(caplog):
    """fairseq-generate --retain-dropout calls the model's make_generation_fast_, which reaches
    every module's hook: the encoder's dropout then stays on in evaluation, as FairseqDropout does."""
    from fairseq.models import BaseFairseqModel

    from slam_fairseq.encoders.config import SlamEncoderConfig
    from slam_fairseq.encoders.slam_encoder import build_slam_encoder

    def encoder_in_a_model():
        encoder = build_slam_encoder(SlamEncoderConfig(encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                                                       encoder_attention_heads=2, speech_encoder_layers=1,
                                                       multimodal_encoder_layers=1, dropout=0.5),
                                     vocab_size=20, padding_idx=1)
        model = BaseFairseqModel()
        model.encoder = encoder
        return model

    retained, plain, listed = encoder_in_a_model(), encoder_in_a_model(), encoder_in_a_model()
    retained.make_generation_fast_(retain_dropout=True)
    plain.make_generation_fast_()
    with caplog.at_level(logging.WARNING):
        listed.make_generation_fast_(retain_dropout=True, retain_dropout_modules=["ConformerLayer"])
    assert "Cannot enable dropout during inference for module encoder." in caplog.text
    for model, expected in ((retained, True), (plain, False), (listed, False)):
        dropouts = [module for module in model.modules() if isinstance(module, Dropout) and module.p > 0]
        assert dropouts and all(module.apply_during_inference == expected for module in dropouts)
        assert not model.training
    x = torch.randn(16, 16)
    module = Dropout(0.5).eval()
    module.make_generation_fast_(name="d", retain_dropout=True)
    assert not torch.equal(module(x), x)
    assert 0.3 < float((module(x) == 0).float().mean()) < 0.7
