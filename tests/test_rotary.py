"""RoPE: the rotation against RoFormer's pairwise definition, relative scores, the joint q/k path."""
import math

import pytest
import torch

from slam_fairseq.modules.attention import RotarySelfAttention
from slam_fairseq.modules.rotary import RotaryPositionalEmbedding, rotate


def _roformer(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Element by element: pair (i, i + D/2) at position t turned by t * base^(-2i/D)."""
    *_, length, dim = x.shape
    out = torch.empty_like(x)
    half = dim // 2
    for t in range(length):
        for i in range(half):
            angle = t * base ** (-2 * i / dim)
            a, b = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def test_rotation_matches_the_pairwise_definition():
    torch.manual_seed(0)
    rotary = RotaryPositionalEmbedding(8)
    query, key = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    rotated_query, rotated_key = rotary(query, key)
    assert torch.allclose(rotated_query, _roformer(query), atol=1e-5)
    assert torch.allclose(rotated_key, _roformer(key), atol=1e-5)


def test_scores_depend_on_the_offset_only():
    torch.manual_seed(0)
    rotary = RotaryPositionalEmbedding(16)
    query, key = torch.randn(16), torch.randn(16)
    tables = rotary.tables(40, torch.device("cpu"))
    rotated_query = rotate(query.expand(40, 16), tables, time_dim=-2)
    rotated_key = rotate(key.expand(40, 16), tables, time_dim=-2)
    scores = rotated_query @ rotated_key.T  # (40, 40): position i of the query against j of the key
    for offset in (-5, 0, 3, 17):
        diagonal = torch.diagonal(scores, offset)
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_query_key_rotation_equals_rotating_each(dtype):
    """The attention rotates (B, T, 2, H, head_dim) at once; the same as (B, H, T, head_dim) each."""
    torch.manual_seed(0)
    rotary = RotaryPositionalEmbedding(8)
    joint = torch.randn(2, 11, 2, 3, 8).to(dtype)
    rotated = rotate(joint, rotary.tables(11, joint.device), time_dim=-4)
    assert rotated.dtype == dtype
    query, key = rotary(joint[:, :, 0].transpose(1, 2), joint[:, :, 1].transpose(1, 2))
    assert torch.equal(rotated[:, :, 0].transpose(1, 2), query)
    assert torch.equal(rotated[:, :, 1].transpose(1, 2), key)


def test_attention_with_the_stack_tables_equals_attention_making_its_own():
    torch.manual_seed(0)
    attention = RotarySelfAttention(16, 4).eval()
    x = torch.randn(2, 9, 16)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    tables = attention.rotary.tables(9, x.device)
    assert torch.equal(attention(x, padding, rotary_tables=tables), attention(x, padding))


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryPositionalEmbedding(7)
