"""Masked speech modelling after w2v-BERT.

About half of the subsampled frames are replaced by a mask embedding before the speech encoder.
A Gumbel-softmax quantizer (fairseq's ``GumbelVectorQuantizer``, as the model's
:class:`GumbelQuantizer`) turns the *unmasked* subsampled features of those frames into
codevectors and code ids. Then:

- contrastive loss (wav2vec 2.0): the speech encoder's output at a masked frame, projected to the
  codevector width, must pick its own codevector among distractors drawn from the other masked
  frames of the same utterance (cosine similarity / temperature);
- diversity loss: pushes the average code distribution towards uniform use of the codebook;
- masked prediction: the multimodal encoder's output at a masked frame predicts its code id(s).

Frames are handled as the flat list of masked frames, N in all, in the row-major order that
``frame_mask.nonzero()`` gives; ``utterance_index`` (N,) tells which row each one comes from.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from slam_fairseq.objectives.masked_prediction import ObjectiveOutput, masked_cross_entropy

DEFAULT_NUM_DISTRACTORS = 100
DEFAULT_CONTRASTIVE_TEMPERATURE = 0.1
_COSINE_EPS = 1e-8  # F.cosine_similarity's, applied here to each norm


class CodePredictionHead(nn.Module):
    """Linear map of multimodal states to code-id scores, one softmax per codebook group.

    Args:
        embed_dim: model width D.
        groups: codebook groups G.
        codebook_size: entries per group C.
    """

    def __init__(self, embed_dim: int, groups: int, codebook_size: int) -> None:
        super().__init__()
        self.groups = groups
        self.codebook_size = codebook_size
        self.output_projection = nn.Linear(embed_dim, groups * codebook_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., G, C) scores (model dtype)."""
        return self.output_projection(hidden).unflatten(-1, (self.groups, self.codebook_size))


def code_prediction_loss(logits: torch.Tensor, targets: torch.Tensor,
                         mask: Optional[torch.Tensor] = None) -> ObjectiveOutput:
    """Cross-entropy of the code ids at masked frames, averaged over frames and groups.

    Args:
        logits: (N, G, C) at the masked frames, or (B, T', G, C) with ``mask``.
        targets: (N, G) or (B, T', G) long code ids.
        mask: optional (B, T') bool, True at masked frames; other frames do not count.
    """
    if mask is not None:
        logits, targets = logits[mask], targets[mask]
    return masked_cross_entropy(logits, targets)


class _Distractors(NamedTuple):
    """indices (N, K) into [0, N), valid (N, K), slot (N,): each frame's place within its row."""

    indices: torch.Tensor
    valid: torch.Tensor
    slot: torch.Tensor


def sample_distractor_indices(utterance_index: torch.Tensor, num_distractors: int,
                              generator: Optional[torch.Generator] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw, for each masked frame, distractors among the *other* masked frames of its utterance.

    Uniform with replacement (as wav2vec 2.0), never the frame itself.

    Args:
        utterance_index: (N,) long, the row of each masked frame; equal rows must be consecutive
            (``frame_mask.nonzero()`` order).
        num_distractors: K.
        generator: optional ``torch.Generator`` on the same device, for reproducible draws.
    Returns:
        (indices (N, K) long into [0, N), valid (N, K) bool). A frame that is the only masked frame
        of its utterance has no distractor: its row is all invalid (indices point at itself).
    """
    indices, valid, _ = _draw_distractors(utterance_index, num_distractors, generator)
    return indices, valid


def _draw_distractors(utterance_index: torch.Tensor, num_distractors: int,
                      generator: Optional[torch.Generator]) -> _Distractors:
    """:func:`sample_distractor_indices`, also returning each frame's slot within its row."""
    if num_distractors < 1:
        raise ValueError(f"num_distractors must be >= 1, got {num_distractors}")
    device = utterance_index.device
    total = utterance_index.numel()
    if total == 0:
        empty = torch.zeros(0, num_distractors, dtype=torch.long, device=device)
        return _Distractors(empty, empty.bool(), empty.new_zeros(0))
    # each frame's row occupies [start, end) of the sorted index (searchsorted, unlike
    # unique_consecutive, has an output size known without reading the device)
    start = torch.searchsorted(utterance_index, utterance_index, side="left")
    count = torch.searchsorted(utterance_index, utterance_index, side="right") - start
    position = torch.arange(total, device=device)
    slot = position - start
    others = (count - 1).clamp(min=1).unsqueeze(1)
    uniform = torch.rand(total, num_distractors, generator=generator, device=device)
    draw = torch.minimum((uniform * others).long(), others - 1)
    draw = draw + (draw >= slot.unsqueeze(1)).long()  # skip the frame itself
    valid = (count > 1).unsqueeze(1).expand(-1, num_distractors)
    indices = torch.where(valid, start.unsqueeze(1) + draw, position.unsqueeze(1))
    return _Distractors(indices, valid, slot)


def contrastive_loss(predictions: torch.Tensor, codevectors: torch.Tensor,
                     utterance_index: torch.Tensor, num_distractors: int = DEFAULT_NUM_DISTRACTORS,
                     temperature: float = DEFAULT_CONTRASTIVE_TEMPERATURE,
                     code_ids: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None,
                     grid: Optional[Tuple[int, int]] = None) -> ObjectiveOutput:
    """wav2vec 2.0 / w2v-BERT contrastive loss over the masked frames.

    logits = cos(prediction, [positive ; K distractors]) / temperature, cross-entropy with the
    positive as class 0. A distractor that carries the same code as the positive (same ``code_ids``,
    or an identical codevector when ``code_ids`` is None) is excluded (wav2vec 2.0's ``neg_is_pos``);
    frames left without any distractor do not count.

    The cosines come from one (R, L, L) product per batch: each utterance's masked frames, as unit
    vectors, are laid out in a row of an (R, L, Q) grid (R rows, at most L masked frames per row),
    every prediction meets every codevector of its row, and each frame's 1 + K logits are picked
    from its row of that square. Gathering the candidates instead would hold N x (1 + K) x Q floats
    and their gradient (1 GB at 10k masked frames, K = 100, Q = 256); the square holds R x L x L
    (10 MB for 64 rows of 400 frames).

    Args:
        predictions: (N, C) projected speech encoder output at the masked frames.
        codevectors: (N, C) quantized unmasked features of the same frames (the positives).
        utterance_index: (N,) row of each frame (see :func:`sample_distractor_indices`).
        num_distractors: K (100 as wav2vec 2.0).
        temperature: the cosine similarity is divided by it (0.1).
        code_ids: optional (N, G) long code ids of ``codevectors``.
        generator: optional generator for the distractor draw.
        grid: (R, L): R > every ``utterance_index``, L >= the masked frames of any one row, known
            on the host (the batch's B and T'). Without it both are read from the device (a sync).
    Returns:
        :class:`ObjectiveOutput`: mean loss over the counted frames; correct when the positive
        scores strictly above every distractor.
    """
    predictions, codevectors = predictions.float(), codevectors.float()
    indices, valid, slot = _draw_distractors(utterance_index, num_distractors, generator)
    unit_predictions = F.normalize(predictions, dim=-1, eps=_COSINE_EPS)
    unit_codevectors = F.normalize(codevectors, dim=-1, eps=_COSINE_EPS)
    logits = _row_cosines(unit_predictions, unit_codevectors, utterance_index, slot, indices, grid) / temperature
    if code_ids is not None:
        same_as_positive = (code_ids[indices] == code_ids.unsqueeze(1)).all(dim=-1)
    else:
        same_as_positive = (codevectors[indices] == codevectors.unsqueeze(1)).all(dim=-1)
    usable = valid & ~same_as_positive
    logits = torch.cat((logits[:, :1], logits[:, 1:].masked_fill(~usable, float("-inf"))), dim=1)
    counted = usable.any(dim=1)
    count = counted.sum()
    # frames without a usable distractor are zeroed, not dropped (dropping needs a device read)
    frame_losses = F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long),
                                   reduction="none")
    loss_sum = torch.where(counted, frame_losses, frame_losses.new_zeros(())).sum()
    num_correct = ((logits[:, 0] > logits[:, 1:].max(dim=1).values) & counted).sum()
    return ObjectiveOutput(loss_sum / count.clamp(min=1), num_correct, count)


def _row_cosines(unit_predictions: torch.Tensor, unit_codevectors: torch.Tensor,
                 utterance_index: torch.Tensor, slot: torch.Tensor, indices: torch.Tensor,
                 grid: Optional[Tuple[int, int]]) -> torch.Tensor:
    """(N, 1 + K) dot products of each unit prediction with its positive and its K distractors.

    Args:
        unit_predictions, unit_codevectors: (N, Q) unit vectors.
        utterance_index: (N,) sorted rows; slot: (N,) place of each frame within its row;
        indices: (N, K) distractors in [0, N), same row.
        grid: (R, L) bounds (see :func:`contrastive_loss`), or None to read them.
    Returns:
        (N, 1 + K) float32: column 0 the positive, then the distractors in ``indices`` order.
    """
    total, width = unit_predictions.shape
    if grid is not None:
        rows, length = grid
    elif total == 0:
        rows, length = 1, 1
    else:
        rows, length = int(utterance_index[-1]) + 1, int(slot.max()) + 1
    # float32 even under autocast: the cosines are divided by a temperature of 0.1 next
    with torch.autocast(unit_predictions.device.type, enabled=False):
        place = (utterance_index, slot)
        grid_predictions = unit_predictions.new_zeros(rows, length, width).index_put(place, unit_predictions)
        grid_codevectors = unit_codevectors.new_zeros(rows, length, width).index_put(place, unit_codevectors)
        square = torch.bmm(grid_predictions, grid_codevectors.transpose(1, 2))  # (R, L, L)
        own_rows = square.view(rows * length, length)[utterance_index * length + slot]  # (N, L)
        columns = torch.cat((slot.unsqueeze(1), slot[indices]), dim=1)  # (N, 1 + K)
        return own_rows.gather(1, columns)


def codebook_diversity_loss(prob_perplexity: torch.Tensor, num_vars: int) -> torch.Tensor:
    """wav2vec 2.0's diversity loss ``(num_vars - prob_perplexity) / num_vars``.

    Args:
        prob_perplexity: scalar, the perplexity of the batch-averaged softmax over codes, summed
            over groups (``GumbelVectorQuantizer``'s ``prob_perplexity``).
        num_vars: G * C, all codebook entries.
    Returns:
        float32 scalar in [0, 1): 0 when every entry is used equally, (num_vars - G) / num_vars
        when each group collapses onto one entry.
    """
    return (num_vars - prob_perplexity.float()) / num_vars
