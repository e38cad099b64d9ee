"""The SLAM encoder's properties: exact lengths, no padding leak, GroupNorm, sizes, gradients."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from slam_fairseq.encoders.config import SlamEncoderConfig, config_from
from slam_fairseq.encoders.slam_encoder import SlamEncoder, build_slam_encoder
from slam_fairseq.models.slam import SlamConfig, slam_base, slam_paper, slam_tiny
from slam_fairseq.modules.conformer import ConformerLayer
from slam_fairseq.modules.conformer import ConformerStack, MaskedGroupNorm
from slam_fairseq.modules.masked_group_norm import masked_group_norm
from slam_fairseq.modules.subsampling import Conv2dSubsampling, subsampled_lengths

PAD = 1
SLAM_BASE_ENCODER_PARAMETERS = 116_489_472  # the README's figure (32k vocabulary)


def tiny_encoder(**overrides) -> SlamEncoder:
    torch.manual_seed(0)
    sizes = dict(encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_kernel_size=5,
                 speech_encoder_layers=2, multimodal_encoder_layers=2, subsampling_conv_channels=8,
                 conv_norm_groups=4)
    sizes.update(overrides)
    return SlamEncoder(SlamEncoderConfig(**sizes), vocab_size=50, padding_idx=PAD).eval()


@pytest.mark.parametrize("length", [7, 8, 9, 10, 11, 50, 51, 52, 53, 400, 1001])
def test_subsampled_lengths_match_the_convolutions(length):
    subsampling = Conv2dSubsampling(80, 4, 16)
    output, output_lengths = subsampling(torch.randn(1, length, 80), torch.tensor([length]))
    assert output.shape[1] == output_lengths.item() == subsampled_lengths(torch.tensor(length)).item()
    # closed form: two floor((L - 3) / 2) + 1
    assert output.shape[1] == ((length - 3) // 2 + 1 - 3) // 2 + 1


def test_too_short_speech_is_refused():
    with pytest.raises(ValueError, match="too short"):
        Conv2dSubsampling(80, 4, 16)(torch.randn(1, 6, 80), torch.tensor([6]))


def _padded_speech(lengths):
    features = torch.randn(len(lengths), max(lengths), 80)
    for row, length in enumerate(lengths):
        features[row, length:] = 1e3 * torch.randn(max(lengths) - length, 80)  # loud garbage padding
    return features, torch.tensor(lengths)


def test_speech_alone_equals_speech_in_a_padded_batch():
    encoder = tiny_encoder()
    features, lengths = _padded_speech([143, 61, 97])
    speech_batch, joint_batch = encoder.encode_speech(features, lengths)
    for row in range(3):
        length = int(lengths[row])
        speech_alone, joint_alone = encoder.encode_speech(features[row:row + 1, :length], lengths[row:row + 1])
        real = joint_alone.output.shape[1]
        assert torch.allclose(joint_alone.output[0], joint_batch.output[row, :real], atol=1e-5)
        assert torch.allclose(speech_alone.output[0], speech_batch.output[row, :real], atol=1e-5)
        assert not joint_batch.padding_mask[row, :real].any() and joint_batch.padding_mask[row, real:].all()


def test_text_alone_equals_text_in_a_padded_batch():
    encoder = tiny_encoder()
    tokens = torch.randint(4, 50, (3, 17))
    lengths = [17, 5, 11]
    for row, length in enumerate(lengths):
        tokens[row, length:] = PAD
    batch = encoder.encode_text(tokens)
    for row, length in enumerate(lengths):
        alone = encoder.encode_text(tokens[row:row + 1, :length])
        assert torch.allclose(alone.output[0], batch.output[row, :length], atol=1e-5)


def test_pair_alone_equals_pair_in_a_padded_batch_and_parts_are_recovered():
    encoder = tiny_encoder()
    features, lengths = _padded_speech([90, 40, 70])
    tokens = torch.randint(4, 50, (3, 9))
    text_lengths = [3, 9, 6]
    for row, length in enumerate(text_lengths):
        tokens[row, length:] = PAD
    _, batch = encoder.encode_pair(features, lengths, tokens)
    text_part, speech_part = batch.text_part(), batch.speech_part()
    for row in range(3):
        _, alone = encoder.encode_pair(features[row:row + 1, :lengths[row]], lengths[row:row + 1],
                                       tokens[row:row + 1, :text_lengths[row]])
        real = alone.output.shape[1]
        assert real == int(batch.speech_lengths[row]) + text_lengths[row]
        assert torch.allclose(alone.output[0], batch.output[row, :real], atol=1e-5)
        assert torch.allclose(alone.text_part()[0], text_part[row, :text_lengths[row]], atol=1e-5)
        speech_length = int(batch.speech_lengths[row])
        assert torch.allclose(alone.speech_part()[0], speech_part[row, :speech_length], atol=1e-5)


def test_masked_group_norm_ignores_padding_and_matches_group_norm_without_it():
    norm = MaskedGroupNorm(4, 8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 30)
    no_padding = torch.zeros(2, 30, dtype=torch.bool)
    assert torch.allclose(norm(x, no_padding), nn.GroupNorm.forward(norm, x), atol=1e-5)
    padding = no_padding.clone()
    padding[:, 20:] = True
    garbage = x.clone()
    garbage[:, :, 20:] = 1e4
    assert torch.allclose(norm(garbage, padding)[:, :, :20], nn.GroupNorm.forward(norm, x[:, :, :20]), atol=1e-4)


@pytest.mark.parametrize("groups", [1, 4])
def test_masked_group_norm_gradients_pass_gradcheck(groups):
    """The written-out backward against finite differences (float64), for x, weight and bias,
    with rows of different padding (one with a single real step)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True
    padding[2, 1:] = True
    assert torch.autograd.gradcheck(lambda *inputs: masked_group_norm(inputs[0], padding, groups, *inputs[1:]),
                                    (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x: masked_group_norm(x, padding, groups), (x,))


def test_masked_group_norm_refuses_a_second_derivative_instead_of_getting_it_wrong():
    x = torch.randn(2, 4, 6, requires_grad=True)
    (gradient,) = torch.autograd.grad(masked_group_norm(x, torch.zeros(2, 6, dtype=torch.bool), 2).pow(2).sum(),
                                      x, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        gradient.sum().backward()


def test_masked_group_norm_matches_the_formula_of_its_real_frames_and_keeps_the_dtype():
    """Against the statistics written out over each row's real steps, in float32 and in bfloat16
    (output and input gradient keep bfloat16; the statistics stay float32)."""
    torch.manual_seed(0)
    norm = MaskedGroupNorm(2, 6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 6, 9)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 5:] = True
    expected = torch.empty_like(x)
    for row, real in enumerate((9, 5)):
        groups = x[row].view(2, 3, 9)
        mean = groups[:, :, :real].mean(dim=(1, 2), keepdim=True)
        variance = groups[:, :, :real].var(dim=(1, 2), unbiased=False, keepdim=True)
        expected[row] = ((groups - mean) / torch.sqrt(variance + norm.eps)).view(6, 9)
    expected = expected * norm.weight[None, :, None] + norm.bias[None, :, None]
    assert torch.allclose(norm(x, padding), expected, atol=1e-5)
    low = x.bfloat16().requires_grad_()
    output = norm(low, padding)
    output.float().sum().backward()
    assert output.dtype == low.grad.dtype == torch.bfloat16
    assert torch.allclose(output.float(), expected, atol=0.05)


def test_group_norm_in_every_convolution_module_and_no_batch_norm_anywhere():
    encoder = tiny_encoder()
    modules = list(encoder.modules())
    assert not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in modules)
    group_norms = [module for module in modules if isinstance(module, nn.GroupNorm)]
    assert len(group_norms) == 4  # one per Conformer layer: 2 speech + 2 multimodal
    assert all(isinstance(module, MaskedGroupNorm) for module in group_norms)


def _preset_config(preset) -> SlamConfig:
    namespace = argparse.Namespace()
    preset(namespace)
    return config_from(namespace, SlamConfig)


def test_slam_paper_has_the_papers_619_million_encoder_parameters():
    cfg = _preset_config(slam_paper)
    assert (cfg.speech_encoder_layers, cfg.multimodal_encoder_layers, cfg.encoder_embed_dim,
            cfg.encoder_ffn_embed_dim, cfg.conv_kernel_size, cfg.encoder_attention_heads) == (8, 16, 1024, 4096, 5, 8)
    with torch.device("meta"):
        encoder = build_slam_encoder(cfg, 32000, PAD)
    count = sum(parameter.numel() for parameter in encoder.parameters())
    assert count == 619_073_280  # the README's figure (32k vocabulary)


def test_slam_base_sits_between_tiny_and_paper():
    cfg = _preset_config(slam_base)
    assert (cfg.speech_encoder_layers, cfg.multimodal_encoder_layers, cfg.encoder_embed_dim,
            cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads) == (6, 10, 512, 2048, 8)

    def parameters(preset) -> int:
        with torch.device("meta"):
            encoder = build_slam_encoder(_preset_config(preset), 32000, PAD)
        return sum(parameter.numel() for parameter in encoder.parameters())

    # the count the README states for slam_base
    assert parameters(slam_tiny) < parameters(slam_base) == SLAM_BASE_ENCODER_PARAMETERS < parameters(slam_paper)


def test_slam_tiny_is_small_and_a_preset_keeps_explicit_values():
    cfg = _preset_config(slam_tiny)
    assert cfg.encoder_embed_dim == 64 and cfg.speech_encoder_layers == 2
    explicit = argparse.Namespace(encoder_embed_dim=128)
    slam_tiny(explicit)
    assert config_from(explicit, SlamConfig).encoder_embed_dim == 128


def test_gradients_reach_every_parameter_through_speech_text_and_pairs():
    encoder = tiny_encoder()
    encoder.train()
    features, lengths = _padded_speech([60, 44])
    tokens = torch.randint(4, 50, (2, 6))
    speech, joint = encoder.encode_pair(features, lengths, tokens, frame_mask=torch.rand(2, 14) < 0.5)
    loss = joint.output.pow(2).mean() + speech.output.pow(2).mean()
    loss.backward()
    missing = [name for name, parameter in encoder.named_parameters()
               if parameter.grad is None or not parameter.grad.abs().sum() > 0]
    assert missing == []


def test_activation_checkpointing_recomputes_every_layer_and_gives_the_same_gradients():
    no_dropout = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    plain, checkpointed = tiny_encoder(**no_dropout), tiny_encoder(checkpoint_activations=True, **no_dropout)
    checkpointed.load_state_dict(plain.state_dict())
    features, lengths = _padded_speech([50, 33])
    gradients, layer_calls = [], []
    for encoder in (plain, checkpointed):
        encoder.train()
        for module in encoder.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        encoder.zero_grad()
        calls = []
        hooks = [module.register_forward_pre_hook(lambda *_: calls.append(1))
                 for module in encoder.modules() if isinstance(module, ConformerLayer)]
        encoder(features, lengths).output.sum().backward()
        for hook in hooks:
            hook.remove()
        layer_calls.append(len(calls))
        gradients.append([p.grad.clone() for p in encoder.parameters() if p.grad is not None])
    # 4 layers: each starts once without checkpointing, and once more in backward with it (the
    # recomputation may stop early, so count starts, not ends)
    assert layer_calls == [4, 8]
    assert len(gradients[0]) == len(gradients[1])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*gradients))


def test_bf16_forward_is_finite_and_close_to_fp32():
    encoder = tiny_encoder()
    features, lengths = _padded_speech([60, 40])
    reference = encoder(features, lengths).output
    low = tiny_encoder().to(torch.bfloat16)
    low.load_state_dict(encoder.state_dict())
    output = low(features.bfloat16(), lengths).output.float()
    assert torch.isfinite(output).all()
    assert (output - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_text_longer_than_max_text_positions_is_refused():
    encoder = tiny_encoder(max_text_positions=8)
    with pytest.raises(ValueError, match="max_text_positions"):
        encoder.encode_text(torch.randint(4, 50, (1, 9)))


def test_stack_returns_every_layer_when_asked():
    stack = ConformerStack(3, 16, 32, 2, 3).eval()
    hiddens = stack(torch.randn(1, 10, 16), torch.zeros(1, 10, dtype=torch.bool), return_all_hiddens=True)
    assert len(hiddens) == 3 and not torch.allclose(hiddens[0], hiddens[2])


def test_stack_makes_the_per_layer_masks_once_and_gets_what_each_layer_would_make_itself():
    """The attention mask, RoPE tables and GroupNorm frames are made once per stack; each layer
    left to make its own gives the same output and gradients, bit for bit."""
    torch.manual_seed(0)
    stack = ConformerStack(3, 16, 32, 2, 3, conv_norm_groups=4).eval()
    x = torch.randn(3, 10, 16)
    padding = torch.arange(10)[None, :] >= torch.tensor([10, 7, 4])[:, None]
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    together = stack(inputs[0], padding)[-1]
    alone = inputs[1]
    for layer in stack.layers:
        alone = layer(alone, padding)
    assert torch.equal(together, alone)
    gradient = torch.randn_like(together)
    together.backward(gradient)
    alone.backward(gradient)
    assert torch.equal(inputs[0].grad, inputs[1].grad)
    frames = stack.layers[0].convolution.norm.frames(padding)
    assert torch.equal(frames.real.flatten(1), (~padding).float()) and frames.count.flatten().tolist() == [40, 28, 16]


def test_subsampled_features_vary_over_time_at_initialisation():
    """A from-scratch encoder must see its input: the subsampling output is normalised per frame,
    so frames differ by O(1), not by a tiny fraction of a shared bias."""
    torch.manual_seed(0)
    subsampling = Conv2dSubsampling(80, 32, 128)
    features = torch.randn(1, 400, 80)
    output, _ = subsampling(features, torch.tensor([400]))
    assert output.std(dim=1).mean() > 0.5


def test_activation_checkpointing_with_dropout_recomputes_the_same_masks():
    """With dropout on, a checkpointed stack's recomputation must draw the masks of its forward
    pass (the RNG state is restored), or its gradients would not be the plain stack's."""
    torch.manual_seed(2)
    plain = ConformerStack(2, 16, 32, 2, 3, dropout=0.3, attention_dropout=0.0, activation_dropout=0.3)
    checkpointed = ConformerStack(2, 16, 32, 2, 3, dropout=0.3, attention_dropout=0.0, activation_dropout=0.3,
                                  checkpoint_activations=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 11, 16)
    padding_mask = torch.zeros(2, 11, dtype=torch.bool)
    padding_mask[1, 8:] = True
    gradients = []
    for stack in (plain, checkpointed):
        stack.train()
        torch.manual_seed(3)
        stack(x, padding_mask)[-1].sum().backward()
        gradients.append([p.grad.clone() for p in stack.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*gradients))
    assert any(isinstance(module, nn.Dropout) and module.p > 0 for module in plain.modules())


def test_contiguous_gradient_is_an_identity_whose_gradient_is_contiguous(monkeypatch):
    from slam_fairseq.modules import conformer

    x = torch.randn(2, 5, 7, requires_grad=True)
    seen = []
    y = conformer._ContiguousGradient.apply(x)
    assert torch.equal(y, x)
    y.register_hook(lambda grad: seen.append(grad.is_contiguous()))
    (y.transpose(1, 2) * torch.arange(5.0)).sum().backward()  # the gradient arrives transposed
    assert seen == [False] and x.grad.is_contiguous()
    assert torch.equal(x.grad, torch.arange(5.0)[None, :, None].expand(2, 5, 7))

    torch.manual_seed(0)
    layer = ConformerLayer(16, 32, 4, 3, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    inputs = torch.randn(2, 9, 16)
    padding = torch.arange(9)[None, :] >= torch.tensor([9, 6])[:, None]
    grads = []
    for identity in (False, True):
        if identity:
            monkeypatch.setattr(conformer._ContiguousGradient, "apply", lambda tensor: tensor)
        layer.zero_grad(set_to_none=True)
        layer(inputs, padding).pow(2).sum().backward()
        grads.append([parameter.grad.clone() for parameter in layer.parameters()])
    for with_copy, without in zip(*grads):
        assert torch.allclose(with_copy, without, atol=1e-6)
