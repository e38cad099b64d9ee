"""mSLAM's CTC on the speech side of pairs (``--pair-ctc``): the loss, its targets, and that the
pass sees the speech only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slam_fairseq.modules.subsampling import subsampled_lengths
from slam_fairseq.objectives.pair_ctc import CTC_BLANK, Speller, kept_first, pair_ctc_loss, transcript_targets
from test_slam_multitask import make_criterion, make_dictionary, make_model, make_sample


def flat(targets: torch.Tensor, lengths: torch.Tensor) -> list:
    """Padded (B, S) targets -> each row's first ``lengths[b]`` values, concatenated."""
    return [value for row, length in zip(targets.tolist(), lengths.tolist()) for value in row[:length]]


def test_transcript_targets_leave_out_pad_eos_and_the_blank():
    dictionary = make_dictionary()
    pad, eos, bos = dictionary.pad(), dictionary.eos(), dictionary.bos()
    tokens = torch.tensor([[5, 6, 7, eos], [8, 9, eos, pad]])
    targets, lengths = transcript_targets(tokens, torch.tensor([bos, pad, eos]))
    assert targets.shape == tokens.shape  # padded, so that no size is read from the device
    assert flat(targets, lengths) == [5, 6, 7, 8, 9]
    assert lengths.tolist() == [3, 2]


def test_kept_first_keeps_order_and_matches_boolean_indexing():
    torch.manual_seed(0)
    values, keep = torch.randint(0, 50, (6, 17)), torch.rand(6, 17) < 0.6
    packed, lengths = kept_first(values, keep)
    assert lengths.tolist() == keep.sum(dim=1).tolist()
    assert flat(packed, lengths) == values[keep].tolist()


def test_padded_targets_give_the_loss_and_gradient_of_concatenated_ones():
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 10, requires_grad=True)
    lengths, target_lengths = torch.tensor([12, 9, 7]), torch.tensor([4, 2, 1])
    concatenated = torch.tensor([4, 5, 6, 7, 7, 8, 4])
    padded = torch.tensor([[4, 5, 6, 7], [7, 8, 1, 1], [4, 1, 1, 1]])
    results = []
    for targets in (concatenated, padded):
        loss = pair_ctc_loss(logits, lengths, targets, target_lengths).loss
        (gradient,) = torch.autograd.grad(loss, logits)
        results.append((loss, gradient))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_loss_is_ctc_per_transcript_token_and_skips_rows_too_short():
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 10)
    output_lengths = torch.tensor([12, 9, 2])
    targets = torch.tensor([4, 5, 6, 7, 7, 8, 4, 5, 6, 7])  # row 2 has 4 tokens for 2 frames
    target_lengths = torch.tensor([4, 2, 4])
    result = pair_ctc_loss(logits, output_lengths, targets, target_lengths)

    log_probs = F.log_softmax(logits, dim=-1)
    expected = sum(F.ctc_loss(log_probs[row, : output_lengths[row]].unsqueeze(1),
                              targets[start: start + length].unsqueeze(0), output_lengths[row: row + 1],
                              target_lengths[row: row + 1], blank=CTC_BLANK, reduction="sum")
                   for row, start, length in ((0, 0, 4), (1, 4, 2)))
    assert int(result.count) == 6
    assert result.loss.item() == pytest.approx(expected.item() / 6, rel=1e-5)


def test_rows_too_short_for_their_repeats_are_not_counted():
    """"lll" needs 5 frames (a blank between equal neighbours): a row of 4 frames scores 0 and
    must not count its 3 tokens, which diluted the loss of the rows that do count."""
    from slam_fairseq.objectives.pair_ctc import ctc_frames_needed

    padded = torch.tensor([[7, 7, 7, 0], [4, 5, 5, 6], [4, 5, 6, 6]])
    lengths = torch.tensor([3, 4, 3])  # row 2's last 6 is padding
    assert ctc_frames_needed(padded, lengths).tolist() == [5, 5, 3]
    concatenated = torch.tensor([7, 7, 7, 4, 5, 5, 6, 4, 5, 6])
    assert ctc_frames_needed(concatenated, lengths).tolist() == [5, 5, 3]
    assert ctc_frames_needed(torch.tensor([7, 7, 7]), torch.tensor([1, 1, 1])).tolist() == [1, 1, 1]

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 10)
    both = pair_ctc_loss(logits, torch.tensor([4, 6]), torch.tensor([[7, 7, 7, 0], [4, 5, 6, 0]]),
                         torch.tensor([3, 3]))
    alone = pair_ctc_loss(logits[1:], torch.tensor([6]), torch.tensor([[4, 5, 6]]), torch.tensor([3]))
    assert int(both.count) == 3 and both.loss.item() == pytest.approx(alone.loss.item(), rel=1e-6)


def test_loss_and_gradient_are_the_same_for_time_first_scores_and_keep_their_layout():
    """The head's time-first (T', B, V) scores seen as (B, T', V) give the loss and gradient of the
    same values laid out batch-first, and the gradient comes back time-first (no reordering)."""
    torch.manual_seed(0)
    time_first = torch.randn(12, 3, 10, requires_grad=True)
    batch_first = time_first.detach().transpose(0, 1).contiguous().requires_grad_()
    lengths, targets, target_lengths = torch.tensor([12, 9, 7]), torch.tensor([4, 5, 6, 7, 7, 8, 4]), torch.tensor([4, 2, 1])
    losses = []
    for logits in (time_first.transpose(0, 1), batch_first):
        loss = pair_ctc_loss(logits, lengths, targets, target_lengths).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    assert torch.allclose(time_first.grad.transpose(0, 1), batch_first.grad, atol=1e-7)
    assert time_first.grad.is_contiguous()


def test_speller_spells_tokens_in_characters_and_skips_specials():
    dictionary = make_dictionary()
    for word in ("\u2581the", "s", "\u2581caf\u00e9"):
        dictionary.add_symbol(word)
    speller = Speller(dictionary.symbols, (dictionary.bos(), dictionary.pad(), dictionary.eos()))
    the, s, cafe = (dictionary.index(word) for word in ("\u2581the", "s", "\u2581caf\u00e9"))
    tokens = torch.tensor([[the, s, dictionary.eos()], [cafe, dictionary.index("<mask>"), dictionary.pad()]])
    targets, lengths = speller(tokens)
    assert lengths.tolist() == [5, 5]
    spelled = "".join(speller.characters[i - 1] for i in flat(targets, lengths))
    assert spelled == "\u2581thes\u2581caf\u00e9"
    assert CTC_BLANK not in flat(targets, lengths)
    assert speller.num_classes == len(set("\u2581thescaf\u00e9w0123456789")) + 1


@pytest.mark.parametrize("units", ["tokens", "characters"])
def test_model_with_pair_ctc_spells_the_clean_transcript_from_the_speech_alone(units):
    model = make_model(pair_ctc=True, pair_ctc_units=units).eval()
    sample = make_sample()
    pair = sample["pair"]
    output = model(pair=pair)["pair"]
    clean = pair["clean_tokens"]
    tokens = clean[clean.ne(make_dictionary().pad())].tolist()
    if units == "tokens":
        assert flat(output.ctc_targets, output.ctc_target_lengths) == tokens
        assert output.ctc_logits.shape[-1] == len(make_dictionary())
    else:
        symbols = make_dictionary().symbols
        characters = model.speller.characters
        assert "".join(characters[i - 1] for i in flat(output.ctc_targets, output.ctc_target_lengths)) == "".join(
            symbols[i] for i in tokens)
        assert output.ctc_logits.shape[-1] == len(characters) + 1
    head = model.pair_ctc_head  # a widening head computes time-first, as CTC reads the scores
    assert output.ctc_logits.transpose(0, 1).is_contiguous() == (head.out_features > head.in_features)

    # the CTC pass sees no text: other transcripts (masked or clean) leave its scores unchanged
    other = dict(pair, tokens=pair["tokens"].flip(0), clean_tokens=pair["clean_tokens"].flip(0))
    assert torch.allclose(model(pair=other)["pair"].ctc_logits, output.ctc_logits)


def test_pair_ctc_is_an_objective_only_with_the_flag_and_trains_the_speech_encoder():
    sample = make_sample()
    plain_objectives = make_criterion().compute_objectives(make_model()(pair=sample["pair"]))
    assert "pair_ctc" not in plain_objectives
    assert make_model().pair_ctc_head is None

    model = make_model(pair_ctc=True, pair_ctc_units="tokens").train()
    criterion = make_criterion(pair_ctc_weight=1.0)
    loss, _, logging_output = criterion(model, {"pair": sample["pair"]})
    # rows with more tokens than subsampled frames cannot be aligned and are not counted
    frames = subsampled_lengths(sample["pair"]["feature_lengths"])
    tokens = sample["pair"]["clean_tokens"].ne(make_dictionary().pad()).sum(dim=1)
    assert (tokens > frames).any() and (tokens <= frames).any()
    assert logging_output["_pair_ctc_count"] == int(tokens[tokens <= frames].sum())
    loss.backward()
    for name in ("pair_ctc_head.weight", "encoder.speech_encoder.subsampling.conv_first.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name

    without = make_criterion(pair_ctc_weight=0.0)
    objectives = without.compute_objectives(model(pair=sample["pair"]))
    weighted = sum(without.weight(name) * objective.loss for name, objective in objectives.items())
    assert weighted.item() == pytest.approx(
        sum(objective.loss.item() for name, objective in objectives.items() if name != "pair_ctc"), rel=1e-5)


@pytest.mark.parametrize("units", ["tokens", "characters"])
def test_a_few_adam_steps_lower_the_pair_ctc_loss(units):
    model = make_model(pair_ctc=True, pair_ctc_units=units)
    criterion = make_criterion(pair_ctc_weight=1.0)
    pair = make_sample()["pair"]
    # three tokens a row, so that most rows' spellings fit their subsampled frames
    clean = pair["clean_tokens"].clone()
    clean[:, 3:] = make_dictionary().pad()
    pair = dict(pair, clean_tokens=clean)

    def ctc_loss() -> float:
        from slam_fairseq.objectives.pair_ctc import ctc_frames_needed

        model.eval()
        with torch.no_grad():
            objective = criterion.compute_objectives(model(pair=pair))["pair_ctc"]
            output = model(pair=pair)["pair"]
            fits = output.ctc_lengths >= ctc_frames_needed(output.ctc_targets, output.ctc_target_lengths)
            assert fits.any() and int(objective.count) == int(output.ctc_target_lengths[fits].sum())
            value = objective.loss.item()
        model.train()
        return value

    before = ctc_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(15):
        torch.manual_seed(step)
        optimizer.zero_grad()
        criterion(model, {"pair": pair})[0].backward()
        optimizer.step()
    assert ctc_loss() < 0.8 * before


def test_a_checkpoint_without_the_head_loads_into_a_model_with_it_and_the_other_way(caplog):
    """--pair-ctc turned on at stage 2 over a stage-1 checkpoint (fairseq's strict load: "Missing
    key(s) pair_ctc_head.weight"), or off over one that had it ("Unexpected key(s)")."""
    import logging

    without = make_model().state_dict()
    model = make_model(pair_ctc=True, pair_ctc_units="tokens")
    own_head = model.pair_ctc_head.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        model.load_state_dict(without)
    assert "the checkpoint has no pair_ctc_head (trained without --pair-ctc)" in caplog.text
    assert torch.equal(model.pair_ctc_head.weight, own_head), "the run's own initialisation"
    assert all(torch.equal(model.state_dict()[key], value) for key, value in without.items())
    assert "pair_ctc_head.weight" not in without, "the caller's dict is not changed"

    caplog.clear()
    plain = make_model()
    with caplog.at_level(logging.WARNING):
        plain.load_state_dict(model.state_dict())
    assert "the checkpoint has a pair_ctc_head (trained with --pair-ctc), which this run does not use" in caplog.text
    with pytest.raises(RuntimeError, match="Missing key"):  # a partial state is still checked strictly
        model.load_state_dict({"pair_ctc_head.weight": own_head})
