"""The blocked CPU path of the 2-D subsampling: the plain modules' values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from slam_fairseq.modules import subsampling
from slam_fairseq.modules.subsampling import Conv2dSubsampling


def _plain(module: Conv2dSubsampling, x: torch.Tensor) -> torch.Tensor:
    return F.relu(module.conv_second(F.relu(module.conv_first(x))))


def _values_and_gradients(module: Conv2dSubsampling, features, lengths, monkeypatch, plain: bool):
    module.zero_grad(set_to_none=True)
    with monkeypatch.context() as patch:
        if plain:
            patch.setattr(Conv2dSubsampling, "convolutions", _plain)
        output, _ = module(features, lengths)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    (output * weights).sum().backward()
    return output.detach(), {name: parameter.grad.clone() for name, parameter in module.named_parameters()}


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_blocked_convolutions_give_the_plain_values_and_gradients(rows, monkeypatch):
    """Blocks of ``rows`` utterances, the last one short when the batch does not divide."""
    torch.manual_seed(0)
    module = Conv2dSubsampling(80, 8, 16)
    features = torch.randn(5, 61, 80)
    lengths = torch.tensor([61, 50, 40, 23, 9])
    row_bytes = 8 * 30 * 39 * 4
    monkeypatch.setattr(subsampling, "BLOCK_BYTES", rows * row_bytes)
    calls = []
    original = subsampling._BlockedConvolutions.apply
    monkeypatch.setattr(subsampling._BlockedConvolutions, "apply", lambda *args: calls.append(args[-1]) or original(*args))
    blocked = _values_and_gradients(module, features, lengths, monkeypatch, plain=False)
    assert calls == [rows]
    plain = _values_and_gradients(module, features, lengths, monkeypatch, plain=True)
    assert torch.allclose(blocked[0], plain[0], atol=1e-6)
    for name, gradient in plain[1].items():
        assert gradient.abs().sum() > 0, name
        assert (blocked[1][name] - gradient).abs().max() <= 1e-5 * gradient.abs().max(), name  # summation order


def test_training_on_cpu_takes_the_blocked_path_and_inference_the_plain_one(monkeypatch):
    calls = []
    original = subsampling._BlockedConvolutions.apply
    monkeypatch.setattr(subsampling._BlockedConvolutions, "apply", lambda *args: calls.append(args) or original(*args))
    module = Conv2dSubsampling(80, 4, 8)
    features, lengths = torch.randn(2, 20, 80), torch.tensor([20, 15])
    module(features, lengths)
    assert len(calls) == 1
    with torch.no_grad():
        module(features, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(features, lengths)
    features.requires_grad_(True)
    module(features, lengths)[0].sum().backward()
    assert features.grad is not None and len(calls) == 1


def test_the_blocked_path_keeps_no_first_convolution_output_for_backward():
    """Saved for backward: the input, the weights and the (4x smaller) second output."""
    module = Conv2dSubsampling(80, 4, 8)
    features = torch.randn(2, 40, 80)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tuple(tensor.shape)) or tensor,
                                                  lambda tensor: tensor):
        module.convolutions(features.unsqueeze(1))
    assert (2, 1, 40, 80) in saved and (2, 4, 9, 19) in saved
    assert (2, 4, 19, 39) not in saved  # the first convolution's output


def test_half_precision_weights_sum_their_block_gradients_in_float32(monkeypatch):
    """bf16 weights (a model cast by --bf16 on CPU), one utterance per block: the blocks' weight
    gradients are summed in float32 and rounded once, not rounded after every block."""
    torch.manual_seed(0)
    module = Conv2dSubsampling(80, 8, 16).to(torch.bfloat16)
    features, lengths = torch.randn(32, 41, 80).to(torch.bfloat16), torch.full((32,), 41)
    monkeypatch.setattr(subsampling, "BLOCK_BYTES", 1)
    parts = []
    original = subsampling._conv_grads
    monkeypatch.setattr(subsampling, "_conv_grads",
                        lambda *args, **kwargs: parts.append(original(*args, **kwargs)) or parts[-1])
    gradients = _values_and_gradients(module, features, lengths, monkeypatch, plain=False)[1]
    second_bias = torch.stack([part[2] for part in parts[0::2]]).double().sum(0)  # conv2's, block by block
    first_bias = torch.stack([part[2] for part in parts[1::2]]).double().sum(0)
    for name, exact in (("conv_second.bias", second_bias), ("conv_first.bias", first_bias)):
        assert gradients[name].dtype == torch.bfloat16
        ulp = exact.abs() * 2.0 ** -7  # one bfloat16 step at that size
        assert ((gradients[name].double() - exact).abs() <= ulp).all(), name
