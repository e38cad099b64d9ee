"""The pre-training objectives alone (slam_fairseq.objectives), on hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch
from fairseq.modules import GumbelVectorQuantizer

from slam_fairseq.objectives import (
    CodePredictionHead,
    PairMatchingClassifier,
    TextPredictionHead,
    code_prediction_loss,
    codebook_diversity_loss,
    contrastive_loss,
    masked_cross_entropy,
    masked_mean_pool,
    sample_distractor_indices,
    span_masking_loss,
    stm_loss,
    tlm_losses,
)


def _utterance_index(counts):
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


# -- contrastive ------------------------------------------------------------------------------------

def test_distractors_never_include_the_positive_and_stay_in_the_utterance():
    utterance_index = _utterance_index([2, 7, 1, 30])
    generator = torch.Generator().manual_seed(0)
    position = torch.arange(utterance_index.numel()).unsqueeze(1)
    seen = torch.zeros(utterance_index.numel(), utterance_index.numel(), dtype=torch.bool)
    for _ in range(60):
        indices, valid = sample_distractor_indices(utterance_index, 100, generator)
        assert indices.shape == valid.shape == (40, 100)
        assert not (indices[valid] == position.expand_as(indices)[valid]).any()
        assert (utterance_index[indices] == utterance_index.unsqueeze(1)).all()
        seen[position.expand_as(indices)[valid], indices[valid]] = True
    # the lone masked frame of utterance 2 has no distractor; every other one can be drawn
    assert not valid[utterance_index == 2].any() and valid[utterance_index != 2].all()
    for row in range(4):
        members = (utterance_index == row).nonzero().flatten()
        block = seen[members][:, members]
        assert torch.equal(block, ~torch.eye(len(members), dtype=torch.bool) & (len(members) > 1))


def test_contrastive_loss_is_low_when_predictions_are_the_true_codevectors():
    torch.manual_seed(0)
    utterance_index = _utterance_index([20, 15])
    codevectors = torch.randn(35, 16)
    matched = contrastive_loss(codevectors.clone(), codevectors, utterance_index, 100, 0.1)
    random = contrastive_loss(torch.randn(35, 16), codevectors, utterance_index, 100, 0.1)
    assert matched.loss < 0.5 < random.loss
    assert matched.count == 35 and matched.num_correct == 35
    assert random.num_correct < 35
    assert matched.loss.dtype == torch.float32


@pytest.mark.parametrize("grid", [None, (3, 20), (5, 33)], ids=["read", "exact", "slack"])
def test_contrastive_loss_equals_the_cosine_similarity_cross_entropy_and_its_gradients(grid):
    """The loss and its gradients against wav2vec 2.0's formula written out: F.cosine_similarity of
    each prediction with [its positive ; the drawn distractors] / temperature, cross-entropy at 0;
    with the grid's bounds read from the device, given exactly (3 rows, 20 frames in the longest),
    or given as the looser bounds of a padded batch."""
    torch.manual_seed(0)
    utterance_index = _utterance_index([12, 9, 20])
    predictions = (3 * torch.randn(41, 16)).requires_grad_()
    codevectors = (0.5 * torch.randn(41, 16)).requires_grad_()
    output = contrastive_loss(predictions, codevectors, utterance_index, 7, 0.1,
                              generator=torch.Generator().manual_seed(3), grid=grid)
    gradients = torch.autograd.grad(output.loss, (predictions, codevectors))

    indices, _ = sample_distractor_indices(utterance_index, 7, torch.Generator().manual_seed(3))
    candidates = torch.cat((codevectors.unsqueeze(1), codevectors[indices]), dim=1)
    logits = torch.nn.functional.cosine_similarity(predictions.unsqueeze(1), candidates, dim=-1) / 0.1
    expected = torch.nn.functional.cross_entropy(logits, torch.zeros(41, dtype=torch.long))
    expected_gradients = torch.autograd.grad(expected, (predictions, codevectors))
    assert torch.allclose(output.loss, expected, rtol=1e-5)
    assert output.num_correct == (logits[:, 0] > logits[:, 1:].max(dim=1).values).sum()
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        assert torch.allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


def test_contrastive_loss_with_a_row_without_masked_frames_matches_the_rows_alone():
    """Row 1 has no masked frame: rows 0 and 2 give the same loss as when they are rows 0 and 1."""
    torch.manual_seed(0)
    predictions, codevectors = torch.randn(15, 8), torch.randn(15, 8)
    gapped = contrastive_loss(predictions, codevectors, torch.tensor([0] * 6 + [2] * 9), 5, 0.1,
                              generator=torch.Generator().manual_seed(1), grid=(3, 10))
    packed = contrastive_loss(predictions, codevectors, _utterance_index([6, 9]), 5, 0.1,
                              generator=torch.Generator().manual_seed(1), grid=(2, 9))
    assert torch.allclose(gapped.loss, packed.loss, rtol=1e-6) and gapped.count == packed.count == 15


def test_contrastive_loss_saves_no_tensor_of_candidate_vectors():
    """Backward keeps the (R, L, L) cosines and (N, Q) vectors, never the N x (1 + K) x Q candidates."""
    torch.manual_seed(0)
    counts, distractors, width = [40, 35, 50], 100, 32
    total = sum(counts)
    predictions = torch.randn(total, width, requires_grad=True)
    saved_sizes = []

    def keep_size(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep_size, lambda tensor: tensor):
        output = contrastive_loss(predictions, torch.randn(total, width), _utterance_index(counts), distractors,
                                  0.1, code_ids=torch.randint(0, 64, (total, 1)), grid=(3, 60))
    output.loss.backward()
    assert max(saved_sizes) <= max(3 * 60 * 60, 3 * 60 * width, total * (1 + distractors))
    assert predictions.grad.abs().sum() > 0


@pytest.mark.parametrize("grid", [None, (2, 5)])
def test_contrastive_loss_without_masked_frames_keeps_the_predictions_in_the_graph(grid):
    """No masked frame: loss 0 with a zero (not a missing) gradient, as DDP expects of every
    parameter that took part."""
    predictions = torch.randn(0, 8, requires_grad=True)
    output = contrastive_loss(predictions, torch.randn(0, 8), torch.zeros(0, dtype=torch.long), grid=grid)
    output.loss.backward()
    assert output.loss.item() == 0.0 and predictions.grad is not None and predictions.grad.shape == (0, 8)


def test_contrastive_cosines_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    predictions, codevectors = torch.randn(30, 16), torch.randn(30, 16)
    utterance_index = _utterance_index([14, 16])
    plain = contrastive_loss(predictions, codevectors, utterance_index, 10,
                             generator=torch.Generator().manual_seed(0), grid=(2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = contrastive_loss(predictions, codevectors, utterance_index, 10,
                                    generator=torch.Generator().manual_seed(0), grid=(2, 20))
    assert autocast.loss.dtype == torch.float32
    assert torch.allclose(autocast.loss, plain.loss, rtol=1e-6)


def test_contrastive_loss_ignores_distractors_with_the_positive_code():
    """Frames sharing a code are not distractors of each other (wav2vec 2.0's neg_is_pos)."""
    codevectors = torch.eye(4)[[0, 0, 1, 1]]
    shared_codes = torch.tensor([[0], [0], [1], [1]])
    utterance_index = torch.zeros(4, dtype=torch.long)

    def loss(code_ids):
        generator = torch.Generator().manual_seed(0)
        return contrastive_loss(codevectors.clone(), codevectors, utterance_index, 50, 0.1,
                                code_ids=code_ids, generator=generator)

    # only the frames of the other code remain: cos 0 against cos 1, so about 33 * exp(-10)
    assert loss(shared_codes).loss.item() < 0.01
    assert loss(None).loss.item() < 0.01  # identical codevectors are recognised without ids
    assert loss(torch.arange(4).unsqueeze(1)).loss.item() > 0.5  # unique ids: the twin competes
    assert loss(shared_codes).count == 4


def test_contrastive_loss_of_no_usable_distractor_is_zero_and_differentiable():
    predictions = torch.randn(1, 8, requires_grad=True)
    output = contrastive_loss(predictions, torch.randn(1, 8), torch.zeros(1, dtype=torch.long))
    assert output.count == 0 and output.loss.item() == 0.0
    output.loss.backward()
    assert predictions.grad is not None and predictions.grad.abs().sum() == 0


# -- diversity --------------------------------------------------------------------------------------

def _quantizer(groups=1, codebook_size=64):
    return GumbelVectorQuantizer(dim=16, num_vars=codebook_size, temp=(2, 0.5, 0.999995), groups=groups,
                                 combine_groups=False, vq_dim=8 * groups, time_first=True).eval()


@pytest.mark.parametrize("groups", [1, 2])
def test_diversity_loss_is_zero_for_uniform_use_and_high_for_collapse(groups):
    quantizer = _quantizer(groups)
    num_vars = groups * 64
    features = torch.randn(1, 500, 16)
    with torch.no_grad():
        quantizer.weight_proj.weight.zero_()
        quantizer.weight_proj.bias.zero_()  # every code equally likely
    uniform = codebook_diversity_loss(quantizer(features)["prob_perplexity"], num_vars)
    assert uniform.item() == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        quantizer.weight_proj.bias[::64] = 50.0  # every frame picks code 0 of each group
    collapsed = codebook_diversity_loss(quantizer(features)["prob_perplexity"], num_vars)
    assert collapsed.item() == pytest.approx((num_vars - groups) / num_vars, abs=1e-4)
    assert collapsed.dtype == torch.float32


def test_diversity_loss_gradient_spreads_code_use():
    quantizer = _quantizer().train()
    with torch.no_grad():
        quantizer.weight_proj.bias[0] = 5.0  # frames favour code 0
    features = torch.randn(1, 200, 16)
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=10.0)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = codebook_diversity_loss(quantizer(features)["prob_perplexity"], 64)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# -- masked predictions -----------------------------------------------------------------------------

def test_masked_cross_entropy_only_counts_masked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    reference = span_masking_loss(logits, targets, mask)
    changed = targets.clone()
    changed[~mask] = (changed[~mask] + 3) % 11
    changed_logits = logits.clone()
    changed_logits[~mask] = torch.randn_like(changed_logits[~mask])
    assert span_masking_loss(changed_logits, changed, mask).loss == reference.loss
    assert reference.count == 5
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    assert reference.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # gathered inputs (as the model gives them) give the same result
    assert masked_cross_entropy(logits[mask], targets[mask]).loss == reference.loss


def test_code_prediction_loss_only_counts_masked_frames_and_averages_groups():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 2, 8)
    targets = torch.randint(0, 8, (2, 5, 2))
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    reference = code_prediction_loss(logits, targets, mask)
    changed = targets.clone()
    changed[~mask] = (changed[~mask] + 1) % 8
    assert code_prediction_loss(logits, changed, mask).loss == reference.loss
    assert reference.count == 3 * 2
    head = CodePredictionHead(4, groups=2, codebook_size=8)
    assert head(torch.randn(3, 7, 4)).shape == (3, 7, 2, 8)


def test_tlm_scores_both_sides_separately():
    torch.manual_seed(0)
    text_logits, text_targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    code_logits, code_targets = torch.randn(6, 1, 8), torch.randint(0, 8, (6, 1))
    output = tlm_losses(text_logits, text_targets, code_logits, code_targets)
    assert output.text.count == 4 and output.speech.count == 6
    assert output.loss == output.text.loss + output.speech.loss
    perfect = tlm_losses(torch.nn.functional.one_hot(text_targets, 10) * 50.0, text_targets,
                         torch.nn.functional.one_hot(code_targets, 8) * 50.0, code_targets)
    assert perfect.loss.item() < 1e-6
    assert perfect.text.num_correct == 4 and perfect.speech.num_correct == 6


def test_text_head_is_tied_and_losses_are_float32_for_half_logits():
    embedding = torch.nn.Embedding(12, 4)
    head = TextPredictionHead(4, embedding.weight)
    assert head.weight is embedding.weight
    logits = head(torch.randn(5, 4))
    assert logits.shape == (5, 12)
    output = masked_cross_entropy(logits.to(torch.bfloat16), torch.randint(0, 12, (5,)))
    assert output.loss.dtype == torch.float32


def test_empty_selection_gives_zero_loss_with_a_graph():
    logits = torch.randn(0, 7, requires_grad=True)
    output = masked_cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    assert output.loss.item() == 0.0 and output.count == 0
    output.loss.backward()


# -- speech-text matching ---------------------------------------------------------------------------

def test_masked_mean_pool_ignores_padding():
    hidden = torch.randn(2, 5, 3)
    padding_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pooled = masked_mean_pool(hidden, padding_mask)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0))
    hidden[0, 3:] = 1e6
    assert torch.allclose(masked_mean_pool(hidden, padding_mask)[0], pooled[0])


def test_stm_learns_a_separable_toy():
    """Matched pairs have positive states, mismatched ones negative: the classifier separates them."""
    torch.manual_seed(0)
    labels = torch.tensor([1, 0] * 16)
    sign = (labels.float() * 2 - 1).view(-1, 1, 1)
    hidden = sign * (1.0 + torch.rand(32, 6, 8))
    padding_mask = torch.zeros(32, 6, dtype=torch.bool)
    padding_mask[::3, 4:] = True
    classifier = PairMatchingClassifier(8, dropout=0.0)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    first = stm_loss(classifier(hidden, padding_mask), labels)
    for _ in range(100):
        optimizer.zero_grad()
        output = stm_loss(classifier(hidden, padding_mask), labels)
        output.loss.backward()
        optimizer.step()
    final = stm_loss(classifier(hidden, padding_mask), labels)
    assert final.loss < 0.05 < first.loss
    assert final.num_correct == 32 and final.count == 32


def test_stm_loss_is_binary_cross_entropy():
    logits = torch.tensor([[0.3, 1.2], [2.0, -1.0]])
    labels = torch.tensor([1, 0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 1] - logits[:, 0], labels.float())
    output = stm_loss(logits, labels)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert output.num_correct == 2
