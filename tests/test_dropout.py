"""The CPU dropout: nn.Dropout's distribution and scaling, its gradient, eval and checkpointing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slam_fairseq.modules.conformer import ConformerStack
from slam_fairseq.modules.dropout import Dropout, cpu_dropout


def test_each_element_is_kept_with_probability_one_minus_p_and_scaled():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros, so a zero in the output is a dropped element
    out = Dropout(0.3).train()(x)
    kept = out != 0
    # 1e6 Bernoulli(0.7) draws: the kept fraction's deviation is 4.6e-4, the bound is 10 of them
    assert abs(kept.float().mean().item() - 0.7) < 5e-3
    assert torch.allclose(out[kept], x[kept] / 0.7)
    assert abs(out.mean().item() - x.mean().item()) < 5e-3  # the expectation is x's


def test_the_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = (torch.rand(64, 50, 32) + 0.5).requires_grad_()
    out = cpu_dropout(x, 0.2)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    expected = torch.where(out != 0, weights / 0.8, torch.zeros_like(weights))
    assert torch.allclose(x.grad, expected)


def test_eval_mode_and_p_zero_return_the_input_and_p_one_zeros():
    x = torch.randn(4, 7)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)


def test_low_precision_inputs_keep_their_dtype():
    x = torch.ones(8, 16, dtype=torch.bfloat16)
    out = Dropout(0.5).train()(x)
    assert out.dtype == torch.bfloat16
    assert set(out.unique().tolist()) <= {0.0, 2.0}


def test_same_seed_same_mask_and_a_different_seed_a_different_one():
    x = torch.ones(100, 100)
    torch.manual_seed(5)
    first = cpu_dropout(x, 0.5)
    torch.manual_seed(5)
    again = cpu_dropout(x, 0.5)
    other = cpu_dropout(x, 0.5)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_activation_checkpointing_recomputes_the_same_masks():
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
    assert any(isinstance(module, Dropout) for module in plain.modules())
    assert not any(type(module) is nn.Dropout for module in plain.modules())
