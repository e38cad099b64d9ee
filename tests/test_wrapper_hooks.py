"""Wrappers that hook a forward's output tensors see every tensor the criterion's loss reads.

fairscale's FSDP (``--ddp-backend fully_sharded``) attaches its pre-backward hook to the tensors it
finds in the root module's outputs with ``apply_to_tensors``, which walks dicts, lists and tuples
(named tuples included) and nothing else. Without a hooked tensor on the loss's path the root never
enters its backward state and its parameters' post-backward hooks fail on the first backward. Here
the real ``slam_tiny`` model runs under a wrapper that does exactly that with fairscale's own
function, and the ``slam_multitask`` loss of each modality must reach one of the hooked tensors.
"""
from __future__ import annotations

import pytest
import torch
from fairscale.internal import containers  # scripts/install.sh installs fairscale
from torch import nn

import test_reduced_precision as precision
from slam_fairseq.criterions.slam_multitask import SlamMultitaskCriterion, SlamMultitaskCriterionConfig
setting = precision.setting


class HookedOutputs(nn.Module):
    """Calls the model, then hooks every output tensor that requires grad, as FSDP's root does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hooked, self.fired = 0, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        def hook(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.requires_grad:
                self.hooked += 1
                tensor.register_hook(self._fire)
            return tensor

        return containers.apply_to_tensors(hook, self.model(*args, **kwargs))

    def _fire(self, grad):
        self.fired += 1
        return grad


@pytest.mark.parametrize("modality", ["speech", "text", "pair"])
def test_the_loss_of_each_modality_passes_through_tensors_a_root_wrapper_can_hook(setting, modality):
    task, sample = setting
    model = precision.make_model(task)
    model.train()
    wrapper = HookedOutputs(model)
    criterion = SlamMultitaskCriterion(SlamMultitaskCriterionConfig(), task)
    loss, _, _ = criterion(wrapper, {modality: sample[modality]})
    assert wrapper.hooked >= 1, f"{modality}: the wrapper found {wrapper.hooked} tensors to hook"
    loss.backward()
    assert wrapper.fired == wrapper.hooked, f"{modality}: {wrapper.fired} of {wrapper.hooked} hooked tensors got a gradient"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
