"""The frozen random-projection quantizer: stable targets, real codebook use, nothing to train."""
import argparse

import torch

from slam_fairseq.modules.random_projection_quantizer import RandomProjectionQuantizer


def test_targets_are_reproducible_and_use_many_codes():
    features = torch.randn(2, 300, 48)
    first = RandomProjectionQuantizer(48, 64, 1, 32, seed=7)(features)
    second = RandomProjectionQuantizer(48, 64, 1, 32, seed=7)(features)
    assert torch.equal(first["targets"], second["targets"])
    assert first["targets"].shape == (2, 300, 1) and first["x"].shape == (2, 300, 32)
    assert 20 < float(first["code_perplexity"]) <= 64
    other_seed = RandomProjectionQuantizer(48, 64, 1, 32, seed=8)(features)
    assert not torch.equal(first["targets"], other_seed["targets"])


def test_codevector_is_the_nearest_codebook_entry_and_nothing_is_trainable():
    quantizer = RandomProjectionQuantizer(16, 8, 2, 8)
    assert list(quantizer.parameters()) == []
    features = torch.randn(1, 5, 16, requires_grad=True)
    result = quantizer(features)
    assert not result["x"].requires_grad
    codes = result["targets"][0]
    for group in range(2):
        projected = torch.nn.functional.normalize(features[0].detach() @ quantizer.projection[group], dim=-1)
        distances = torch.cdist(projected, quantizer.vars[group])
        assert torch.equal(distances.argmin(dim=-1), codes[:, group])
        assert torch.allclose(result["x"][0, :, group * 4:(group + 1) * 4], quantizer.vars[group][codes[:, group]])


def test_slam_model_trains_msm_with_random_projection_targets():
    from fairseq.data import Dictionary

    from slam_fairseq.models.slam import SlamModel, slam_tiny

    dictionary = Dictionary()
    for index in range(20):
        dictionary.add_symbol(f"w{index}")
    task = argparse.Namespace(source_dictionary=dictionary)
    config = argparse.Namespace(quantizer_type="random_projection")
    slam_tiny(config)
    model = SlamModel.build_model(config, task)
    features = torch.randn(2, 80, 80)
    frame_mask = torch.zeros(2, 19, dtype=torch.bool)
    frame_mask[:, 3:13] = True
    batch = {"features": features, "feature_lengths": torch.tensor([80, 80]), "frame_mask": frame_mask}
    output = model.forward_speech(batch)
    assert output.code_ids.shape == (20, 1) and float(output.code_perplexity) > 1
    # the targets are the random projection's codes of the masked frames' stacked log-Mels, fixed
    # (no parameter of the quantizer trains), and the code head learns to predict them
    targets = output.code_ids.clone()
    assert torch.equal(model.forward_speech(batch).code_ids, targets), "the same frames, the same codes"

    def msm_loss() -> torch.Tensor:
        logits = model.forward_speech(batch).code_logits.float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = msm_loss()
    for _ in range(10):
        optimizer.zero_grad()
        loss = msm_loss()
        loss.backward()
        assert model.code_prediction_head.output_projection.weight.grad.abs().sum() > 0
        optimizer.step()
    assert msm_loss().item() < 0.7 * first.item()


def test_feature_input_stacks_the_log_mel_frames_under_each_subsampled_frame():
    from fairseq.data import Dictionary

    from slam_fairseq.models.slam import SlamModel, slam_tiny

    dictionary = Dictionary()
    config = argparse.Namespace(quantizer_type="random_projection", quantizer_input="features")
    slam_tiny(config)
    model = SlamModel.build_model(config, argparse.Namespace(source_dictionary=dictionary))
    features = torch.randn(2, 83, 80)
    subsampled = torch.randn(2, 20, 64)
    stacked = model.quantizer_inputs(features, subsampled)
    assert stacked.shape == (2, 20, 320)
    assert torch.equal(stacked[1, 7], features[1, 28:32].reshape(-1))
    frame_mask = torch.zeros(2, 20, dtype=torch.bool)
    frame_mask[:, 2:12] = True
    output = model.forward_speech({"features": features, "feature_lengths": torch.tensor([83, 83]),
                                   "frame_mask": frame_mask})
    assert float(output.code_perplexity) > 5  # random log-Mel frames use many codes
