"""GumbelQuantizer against fairseq's GumbelVectorQuantizer: same outputs, gradients and draws,
without the (N, G x V, d) broadcast product."""
import pytest
import torch
from fairseq.modules import GumbelVectorQuantizer
from torch.utils._python_dispatch import TorchDispatchMode

from slam_fairseq.modules.gumbel_quantizer import GumbelQuantizer


def _pair(groups: int, combine_groups: bool, time_first: bool = True):
    torch.manual_seed(0)
    ours = GumbelQuantizer(dim=12, num_vars=16, temp=(2.0, 0.5, 0.999995), groups=groups,
                           combine_groups=combine_groups, vq_dim=8, time_first=time_first)
    stock = GumbelVectorQuantizer(dim=12, num_vars=16, temp=(2.0, 0.5, 0.999995), groups=groups,
                                  combine_groups=combine_groups, vq_dim=8, time_first=time_first)
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _run(quantizer, x, seed: int, train: bool):
    quantizer.train(train)
    quantizer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same Gumbel draws on both sides
    result = quantizer(x, produce_targets=True)
    weights = torch.randn(result["x"].shape, generator=torch.Generator().manual_seed(1))
    ((result["x"] * weights).sum() + result["prob_perplexity"]).backward()
    return result, x.grad, {name: parameter.grad for name, parameter in quantizer.named_parameters()}


@pytest.mark.parametrize("groups,combine_groups,time_first,train", [
    (1, False, True, True), (2, False, True, True), (2, True, True, True), (2, False, False, True),
    (2, False, True, False)])
def test_outputs_and_gradients_equal_fairseqs(groups, combine_groups, time_first, train):
    ours, stock = _pair(groups, combine_groups, time_first)
    x = torch.randn(3, 5, 12) if time_first else torch.randn(3, 12, 5)
    (result, grad_x, grads), (expected, expected_grad_x, expected_grads) = (
        _run(ours, x, 7, train), _run(stock, x, 7, train))
    assert set(result) == set(expected)
    assert result["x"].shape == expected["x"].shape
    assert torch.allclose(result["x"], expected["x"], atol=1e-6)
    assert torch.equal(result["targets"], expected["targets"])
    for key in ("code_perplexity", "prob_perplexity"):
        assert torch.allclose(result[key], expected[key]), key
    assert result["num_vars"] == expected["num_vars"] and result["temp"] == expected["temp"]
    assert torch.allclose(grad_x, expected_grad_x, atol=1e-6)
    for name, grad in expected_grads.items():
        assert grads[name] is not None and torch.allclose(grads[name], grad, atol=1e-6), name


def test_bf16_autocast_keeps_codevectors_in_float32_like_fairseq():
    ours, stock = _pair(1, False)
    x = torch.randn(2, 4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result, expected = ours.eval()(x), stock.eval()(x)
    assert result["x"].dtype == expected["x"].dtype == torch.float32
    assert torch.equal(result["x"], expected["x"])


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_frame_by_code_by_dimension_tensor_in_forward_or_backward():
    ours, stock = _pair(1, False)
    frames, codes, width = 40, 16, 8
    x = torch.randn(1, frames, 12)
    largest = {}
    for name, quantizer in (("ours", ours), ("stock", stock)):
        with _LargestTensor() as mode:
            _run(quantizer, x, 3, True)
        largest[name] = mode.largest
    assert largest["stock"] >= frames * codes * width  # the broadcast product this avoids
    assert largest["ours"] < frames * codes * width // 4


def test_quantizer_benchmark_ends_with_a_finite_ratio(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_quantizer

    ratio = bench_quantizer.main(["--frames", "30", "--input-dim", "8", "--codes", "16", "--codevector-dim", "8",
                                  "--repeats", "2", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"ratio ours/stock: {ratio:.2f}" and 0 < ratio < float("inf")
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["ours", "stock"]


def test_codebook_perplexity_counts_the_codes_in_use():
    from slam_fairseq.modules.codebook_usage import codebook_perplexity

    uniform = torch.full((2, 8), 1 / 8)
    one_code = torch.zeros(2, 8).index_fill_(1, torch.tensor([3]), 1.0)
    torch.testing.assert_close(codebook_perplexity(uniform), torch.tensor(16.0))
    torch.testing.assert_close(codebook_perplexity(one_code), torch.tensor(2.0))
