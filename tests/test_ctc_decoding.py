"""CTC decoding of ``slam_s2t``: the CTC prefix scorer, best-path decoding, joint CTC/attention beam
search, and task ``slam_speech_to_text`` through fairseq's own command-line tools.

- The prefix scorer against a brute-force sum over every alignment of tiny random posteriors.
- Best-path collapse and blank rules on hand-made posteriors.
- Joint search on a hand-made model whose decoder ignores the audio and never stops: it writes what
  the CTC posteriors say and ends; a forced language tag takes the decoder's score alone.
- On a tiny ``slam_s2t_tiny`` with a CTC head, trained once by ``fairseq-train --task
  slam_speech_to_text`` until it overfits six espeak-ng utterances (about 25 s of CPU):
  joint search with weight 0 gives fairseq's beam search hypotheses; with weight 1, and with a
  decoder that never ends a sentence, no hypothesis outgrows the CTC frames; ``fairseq-generate
  --ctc-decoding joint|greedy|lexicon --scoring wer`` prints every utterance and a WER that matches
  its lines; lexicon decoding without ``--lexicon-text`` is refused; ``--no-repeat-ngram-size``
  bans every repeated n-gram on CPU (fairseq's own CPU blocker bans none).
- ``--task slam_speech_to_text`` trains exactly as ``speech_to_text`` (the same logged losses).
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from types import SimpleNamespace

import editdistance
import pytest
import torch

import slam_fairseq  # noqa: F401  (registers slam_s2t and slam_speech_to_text)
from ctc_reference import brute_force_ctc
from s2t_fixtures import (
    USER_DIR,
    build_asr,
    hypotheses,
    parse_wer,
    run_fairseq,
    single_thread,
    synthesize_features,
)
from slam_fairseq.decoding.ctc_greedy import CTCGreedyGenerator, ctc_best_paths
from slam_fairseq.decoding.ctc_prefix_score import CTCPrefixScorer
from slam_fairseq.models.slam_s2t import CTC_BLANK_INDEX


WER_OPTIONS = ("--scoring", "wer", "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct")
# Measured on the overfit model below (seed 1, one thread): beam search 8.3, joint 0.0, greedy 25.0,
# lexicon (the train transcripts' words and bigrams) 4.2.
JOINT_WER_BOUND, GREEDY_WER_BOUND, LEXICON_WER_BOUND = 20.0, 60.0, 20.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


# ---------------------------------------------------------------------------------------------
# The prefix scorer


def _assert_log_close(actual: float, expected: float, what: str) -> None:
    if math.isinf(expected):
        assert math.isinf(actual) and actual < 0, f"{what}: {actual}, expected -inf"
    else:
        assert abs(actual - expected) < 1e-5, f"{what}: {actual}, expected {expected}"


def test_prefix_scores_equal_brute_force_over_all_alignments():
    torch.manual_seed(0)
    blank, eos, frames, vocabulary = 0, 3, 6, 4
    log_probs = torch.randn(frames, 3, vocabulary).mul(2).log_softmax(-1)
    lengths = torch.tensor([6, 4, 2])  # rows 1 and 2 are padded: their last frames must not count
    log_probs[4:, 1] = torch.tensor([5.0, -9.0, 3.0, 0.0]).log_softmax(-1)  # garbage in the padding
    scorer = CTCPrefixScorer(blank=blank, eos=eos)
    brute = [brute_force_ctc(log_probs[:, row], int(lengths[row]), blank) for row in range(3)]
    labels = (1, 2)  # eos (3) stays a possible CTC output but is never part of a prefix
    checked_infinite = 0
    for size in range(frames + 2):
        for prefix in itertools.product(labels, repeat=size):
            prefix_score, full_score = scorer.prefix_scores(log_probs, lengths, torch.tensor(prefix, dtype=torch.long))
            for row in range(3):
                expected_prefix = brute[row][0].get(prefix, -math.inf)
                checked_infinite += math.isinf(expected_prefix)
                _assert_log_close(float(prefix_score[row]), expected_prefix, f"psi{prefix} row {row}")
                _assert_log_close(float(full_score[row]), brute[row][1].get(prefix, -math.inf), f"p{prefix} row {row}")
    assert checked_infinite > 0  # prefixes too long for the frames are among those checked


def test_candidate_scoring_eos_blank_and_a_forced_token():
    torch.manual_seed(1)
    blank, eos, frames = 0, 3, 5
    log_probs = torch.randn(frames, 2, 4).log_softmax(-1)
    lengths = torch.tensor([5, 3])
    scorer = CTCPrefixScorer(blank=blank, eos=eos)
    brute = [brute_force_ctc(log_probs[:, row], int(lengths[row]), blank) for row in range(2)]
    rows = torch.arange(2)
    state = scorer.initial_state(log_probs, lengths)
    ones = torch.ones(2, dtype=torch.long)
    state = scorer.select(scorer.score_candidates(state, ones.unsqueeze(1)), rows, ones)  # prefix (1,)
    candidates = torch.tensor([[2, eos, blank, 1], [1, 2, eos, blank]])
    scored = scorer.score_candidates(state, candidates)
    for row in range(2):
        for column, token in enumerate(candidates[row].tolist()):
            if token == eos:
                expected = brute[row][1].get((1,), -math.inf)
            elif token == blank:
                expected = -math.inf
            else:
                expected = brute[row][0].get((1, token), -math.inf)
            _assert_log_close(float(scored.prefix_scores[row, column]), expected, f"row {row} token {token}")
    # beam search reorders: the new rows continue rows (1, 0, 1) with tokens 2, 1 and a token that
    # was no candidate of row 1 (a forced prefix token), which select scores itself
    scored = scorer.score_candidates(state, torch.tensor([[2, eos], [2, eos]]))
    chosen = scorer.select(scored, torch.tensor([1, 0, 1]), torch.tensor([2, 1, 1]))
    for new_row, (row, prefix) in enumerate([(1, (1, 2)), (0, (1, 1)), (1, (1, 1))]):
        _assert_log_close(float(chosen.prefix_score[new_row]), brute[row][0].get(prefix, -math.inf), f"{prefix}")
        _assert_log_close(float(scorer.full_score(chosen)[new_row]), brute[row][1].get(prefix, -math.inf),
                          f"p{prefix}")


def test_rows_of_one_utterance_read_its_posteriors_without_copies_of_them():
    """Beam search's hypotheses of one utterance share its (T, V) posteriors: the scores equal
    those of one copy per row, and no state holds more than one copy per utterance."""
    torch.manual_seed(3)
    scorer = CTCPrefixScorer(blank=0, eos=3)
    log_probs, lengths = torch.randn(6, 2, 5).log_softmax(-1), torch.tensor([6, 4])
    source = torch.tensor([1, 0, 1, 0])
    shared = scorer.initial_state(log_probs, lengths, source)
    copied = scorer.initial_state(log_probs.index_select(1, source), lengths.index_select(0, source))
    assert shared.log_probs.shape == (6, 2, 5) and copied.log_probs.shape == (6, 4, 5)
    candidates = torch.tensor([[1, 2], [4, 3], [2, 0], [1, 3]])
    for _ in range(3):
        scored = [scorer.score_candidates(state, candidates) for state in (shared, copied)]
        torch.testing.assert_close(scored[0].prefix_scores, scored[1].prefix_scores, equal_nan=True)
        rows, tokens = torch.tensor([2, 0, 3, 3]), torch.tensor([2, 1, 1, 4])  # 4: no candidate of row 3
        shared, copied = (scorer.select(states, rows, tokens) for states in scored)
        assert shared.log_probs.data_ptr() == scored[0].parent.log_probs.data_ptr()
        assert shared.source.tolist() == source.index_select(0, rows).tolist()
        source = shared.source
        torch.testing.assert_close(shared.prefix_score, copied.prefix_score)
        torch.testing.assert_close(scorer.full_score(shared), scorer.full_score(copied))
        candidates = candidates.flip(0)
    with pytest.raises(ValueError, match="utterance indices below 2"):
        scorer.initial_state(log_probs, lengths, torch.tensor([0, 2]))


def test_prefix_scorer_rejects_bad_shapes():
    scorer = CTCPrefixScorer(blank=0, eos=2)
    with pytest.raises(ValueError, match=r"\(T, S, V\)"):
        scorer.initial_state(torch.zeros(4, 3), torch.tensor([4]))
    with pytest.raises(ValueError, match="do not fit"):
        scorer.initial_state(torch.zeros(4, 1, 3), torch.tensor([5]))
    with pytest.raises(ValueError, match="must differ"):
        CTCPrefixScorer(blank=1, eos=1)


# ---------------------------------------------------------------------------------------------
# Best path


def _posteriors(frame_labels, vocabulary: int = 5, frames: int = None) -> torch.Tensor:
    """(T, V) log-posteriors whose best label at frame t is ``frame_labels[t]``."""
    frames = frames or len(frame_labels)
    logits = torch.zeros(frames, vocabulary)
    for t, label in enumerate(frame_labels):
        logits[t, label] = 4.0 + 0.1 * t
    return logits.log_softmax(-1)


def test_best_path_collapses_repeats_and_drops_blanks():
    blank = 0
    first = _posteriors([1, 1, 0, 1, 2, 2, 0, 0, 3, 3])  # a b a (a after a blank counts again)
    second = _posteriors([0, 4, 4, 2, 1, 1, 1, 1, 1, 1])  # only 4 frames are real
    paths = ctc_best_paths(torch.stack([first, second], dim=1), torch.tensor([10, 4]), blank)
    assert paths[0].tokens.tolist() == [1, 1, 2, 3]
    assert paths[1].tokens.tolist() == [4, 2]
    # each label scores its first frame; the path scores every real frame
    torch.testing.assert_close(paths[0].token_scores, first[[0, 3, 4, 8], [1, 1, 2, 3]])
    assert paths[1].path_score == pytest.approx(float(second[[0, 1, 2, 3], [0, 4, 4, 2]].sum()), abs=1e-5)
    everything_blank = ctc_best_paths(_posteriors([0, 0, 0]).unsqueeze(1), torch.tensor([3]), blank)
    assert everything_blank[0].tokens.numel() == 0


def test_greedy_generator_returns_fairseq_hypotheses():
    eos, blank = 2, CTC_BLANK_INDEX
    log_probs = torch.stack([_posteriors([0, 3, 3, 0, 4]), _posteriors([4, 0, 4, 4, 1])], dim=1)

    class FakeModel(torch.nn.Module):
        def encoder(self, src_tokens, src_lengths):
            return {"lengths": src_lengths}

        def get_ctc_output(self, net_output):
            return log_probs, net_output[1]["encoder_out"]["lengths"]

    generator = CTCGreedyGenerator(FakeModel(), eos=eos, blank=blank, symbols_to_strip_from_output={7})
    assert generator.symbols_to_strip_from_output == {7, eos}
    sample = {"net_input": {"src_tokens": torch.zeros(2, 20, 80), "src_lengths": torch.tensor([5, 3])}}
    prefix = torch.tensor([[7], [7]])
    first, second = (hypos[0] for hypos in generator.generate([FakeModel()], sample, prefix_tokens=prefix))
    assert first["tokens"].tolist() == [7, 3, 4, eos]
    assert second["tokens"].tolist() == [7, 4, 4, eos]  # frames 3 and 4 are padding
    assert first["positional_scores"].shape == first["tokens"].shape
    assert first["positional_scores"][0] == 0 and first["positional_scores"][-1] == 0
    path_score = float(log_probs[[0, 1, 2], [1, 1, 1], [4, 0, 4]].sum())
    assert float(second["score"]) == pytest.approx(path_score / 4, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Joint search on a hand-made model


class _PosteriorEncoder(torch.nn.Module):
    """Its "features" are the CTC log-posteriors themselves: (B, T, V)."""

    def forward_torchscript(self, net_input):
        return {"ctc": [net_input["src_tokens"].transpose(0, 1)], "lengths": [net_input["src_lengths"]]}

    def reorder_encoder_out(self, encoder_out, new_order):
        return {"ctc": [encoder_out["ctc"][0].index_select(1, new_order)],
                "lengths": [encoder_out["lengths"][0].index_select(0, new_order)]}


class _FixedDecoder(torch.nn.Module):
    """The same next-token logits after every prefix."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, tokens, encoder_out=None, incremental_state=None):
        return self.logits.repeat(tokens.size(0), tokens.size(1), 1), None


class _HandMadeModel(torch.nn.Module):
    def __init__(self, decoder_logits: torch.Tensor) -> None:
        super().__init__()
        self.encoder, self.decoder = _PosteriorEncoder(), _FixedDecoder(decoder_logits)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        return net_output[0].log_softmax(-1)

    def get_ctc_output(self, net_output):
        encoder_out = net_output[1]["encoder_out"]
        return encoder_out["ctc"][0], encoder_out["lengths"][0]

    def max_decoder_positions(self) -> int:
        return 1000


def test_joint_search_reads_the_audio_skips_the_language_tag_and_ends():
    """The decoder always prefers "a" and hardly ever ends; CTC hears "b a" in 6 frames. Beam search
    writes "a a a ..." to --max-len-b; joint search writes "b a" and stops. The language tag
    (forced, not a CTC label) is left out of the CTC prefix."""
    from fairseq.data import Dictionary
    from fairseq.sequence_generator import SequenceGenerator

    from slam_fairseq.decoding.joint_ctc_generator import add_ctc_prefix_scores

    dictionary = Dictionary()
    a, b, tag = dictionary.add_symbol("a"), dictionary.add_symbol("b"), dictionary.add_symbol("<lang:xx>")
    eos = dictionary.eos()
    decoder_logits = torch.zeros(len(dictionary))
    decoder_logits[a], decoder_logits[b], decoder_logits[eos] = 6.0, 3.0, 1.0
    frames = [b, b, CTC_BLANK_INDEX, a, CTC_BLANK_INDEX, CTC_BLANK_INDEX]
    posteriors = torch.full((1, len(frames), len(dictionary)), -10.0)
    for t, label in enumerate(frames):
        posteriors[0, t, label] = 10.0
    sample = {"net_input": {"src_tokens": posteriors.log_softmax(-1), "src_lengths": torch.tensor([len(frames)])}}
    prefix = torch.tensor([[tag]])

    def search(joint: bool):
        generator = SequenceGenerator([_HandMadeModel(decoder_logits)], dictionary, beam_size=2, max_len_b=20)
        if joint:
            generator = add_ctc_prefix_scores(generator, weight=0.5, candidates=3, blank=CTC_BLANK_INDEX,
                                              skip_tokens=1)
        return generator.generate(None, sample, prefix_tokens=prefix)[0][0]

    assert search(joint=False)["tokens"].tolist() == [tag] + [a] * 19 + [eos]
    joint = search(joint=True)
    assert joint["tokens"].tolist() == [tag, b, a, eos]
    # the tag scores the decoder's log-prob alone; the labels after it get the fused score
    decoder_log_probs = decoder_logits.log_softmax(-1)
    assert float(joint["positional_scores"][0]) == pytest.approx(float(decoder_log_probs[tag]), abs=1e-5)
    assert float(joint["positional_scores"][1]) == pytest.approx(0.5 * float(decoder_log_probs[b]), abs=1e-3)


def test_joint_search_gives_a_hypothesis_where_ctc_can_carry_none(caplog):
    """--min-len longer than the CTC frames can carry: every continuation scores -inf before eos is
    allowed, and fairseq's search ran to --max-len and failed its assertion. Such hypotheses go on
    with the decoder's scores and a large penalty: a hypothesis for the utterance, and a WARNING."""
    from fairseq.data import Dictionary
    from fairseq.sequence_generator import SequenceGenerator

    from slam_fairseq.decoding.joint_ctc_generator import STUCK_PENALTY, add_ctc_prefix_scores

    dictionary = Dictionary()
    a, b = dictionary.add_symbol("a"), dictionary.add_symbol("b")
    decoder_logits = torch.zeros(len(dictionary))
    decoder_logits[a], decoder_logits[b], decoder_logits[dictionary.eos()] = 6.0, 3.0, 1.0
    frames = [b, CTC_BLANK_INDEX, a]  # at most 3 labels fit in 3 frames
    posteriors = torch.full((1, len(frames), len(dictionary)), -10.0)
    for t, label in enumerate(frames):
        posteriors[0, t, label] = 10.0
    sample = {"net_input": {"src_tokens": posteriors.log_softmax(-1), "src_lengths": torch.tensor([len(frames)])}}
    generator = SequenceGenerator([_HandMadeModel(decoder_logits)], dictionary, beam_size=2, max_len_b=12, min_len=6)
    generator = add_ctc_prefix_scores(generator, weight=0.5, candidates=2, blank=CTC_BLANK_INDEX)
    with caplog.at_level(logging.WARNING):
        best = generator.generate(None, sample)[0][0]
    assert len(best["tokens"]) >= 7 and best["tokens"][-1] == dictionary.eos()
    assert float(best["score"]) < STUCK_PENALTY / 20, "scored far below anything CTC allows"
    assert "have no continuation the CTC frames can carry" in caplog.text
    # --prefix-size forcing more labels than the frames carry: the forced tokens, then an end
    generator = SequenceGenerator([_HandMadeModel(decoder_logits)], dictionary, beam_size=2, max_len_b=12)
    generator = add_ctc_prefix_scores(generator, weight=0.5, candidates=2, blank=CTC_BLANK_INDEX)
    forced = generator.generate(None, sample, prefix_tokens=torch.tensor([[a, b, a, b]]))[0][0]
    assert forced["tokens"][:4].tolist() == [a, b, a, b] and forced["tokens"][-1] == dictionary.eos()
    # a sentence with a hypothesis CTC allows is decoded as before: no penalised hypothesis finishes
    generator = SequenceGenerator([_HandMadeModel(decoder_logits)], dictionary, beam_size=2, max_len_b=12, min_len=2)
    generator = add_ctc_prefix_scores(generator, weight=0.5, candidates=2, blank=CTC_BLANK_INDEX)
    assert all(float(hypo["score"]) > STUCK_PENALTY / 100 for hypo in generator.generate(None, sample)[0])


def test_joint_search_scores_a_forced_prefix_token_that_the_decoder_ranks_low():
    """--prefix-size forces the reference's first token. Here the decoder ranks it below the tokens
    CTC scores; unscored it would get -inf and no hypothesis could end (fairseq then fails at
    max_len). Made a candidate, it gets its fused score and the search continues with what CTC
    hears; rows of a batch whose prefix is shorter (pad) are not forced."""
    from fairseq.data import Dictionary
    from fairseq.sequence_generator import SequenceGenerator

    from slam_fairseq.decoding.joint_ctc_generator import add_ctc_prefix_scores

    dictionary = Dictionary()
    a, b, c = (dictionary.add_symbol(symbol) for symbol in "abc")
    others = [dictionary.add_symbol(symbol) for symbol in "def"]
    eos, pad = dictionary.eos(), dictionary.pad()
    decoder_logits = torch.zeros(len(dictionary))
    decoder_logits[a], decoder_logits[b], decoder_logits[c], decoder_logits[eos] = 6.0, 3.0, -5.0, 1.0
    decoder_logits[others] = 2.0
    frames = [c, c, CTC_BLANK_INDEX, a, CTC_BLANK_INDEX, CTC_BLANK_INDEX]
    posteriors = torch.full((2, len(frames), len(dictionary)), -10.0)
    for t, label in enumerate(frames):
        posteriors[:, t, label] = 10.0
    sample = {"net_input": {"src_tokens": posteriors.log_softmax(-1), "src_lengths": torch.tensor([len(frames)] * 2)}}

    def joint_generator():
        generator = SequenceGenerator([_HandMadeModel(decoder_logits)], dictionary, beam_size=2, max_len_b=20)
        generator = add_ctc_prefix_scores(generator, weight=0.5, candidates=3, blank=CTC_BLANK_INDEX)
        assert c not in decoder_logits.topk(generator.model.candidates + 1).indices.tolist()
        return generator

    prefix = torch.tensor([[c], [pad]])  # sentence 0 forced to start with c, sentence 1 free
    with pytest.raises(AssertionError):  # the forced token left unscored: nothing can end before max_len
        SequenceGenerator.generate(joint_generator(), None, sample, prefix_tokens=prefix)
    forced, free = (hypos[0] for hypos in joint_generator().generate(None, sample, prefix_tokens=prefix))
    assert forced["tokens"].tolist() == [c, a, eos]
    assert free["tokens"][0] != c and free["tokens"][-1] == eos  # c, ranked low, is no candidate there
    decoder_log_probs = decoder_logits.log_softmax(-1)
    assert float(forced["positional_scores"][0]) > 0.5 * float(decoder_log_probs[c]) - 1.0  # fused, finite


# ---------------------------------------------------------------------------------------------
# A trained model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctc_decoding")
    features = synthesize_features(root)
    task_name = build_asr(root / "asr", features, specaugment=False)
    save_dir = root / "checkpoints"
    log = run_fairseq(*train_command(root / "asr", task_name, save_dir, "slam_speech_to_text",
                                     "--criterion", "label_smoothed_cross_entropy_with_ctc", "--ctc-weight", "0.5",
                                     "--dropout", "0.0", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
                                     "--warmup-updates", "10", "--clip-norm", "5", "--max-update", "200",
                                     "--save-interval", "1000", "--no-epoch-checkpoints",
                                     "--log-interval", "50")).stdout
    assert "ctc_loss" in log
    return SimpleNamespace(data=root / "asr", task_name=task_name, checkpoint=save_dir / "checkpoint_last.pt",
                           utterances=len(features))


def train_command(data_dir, task_name: str, save_dir, task: str, *extra):
    return ("fairseq-train", data_dir, "--user-dir", USER_DIR, "--task", task,
            "--config-yaml", f"config_{task_name}.yaml", "--train-subset", f"train_{task_name}",
            "--valid-subset", f"train_{task_name}", "--save-dir", save_dir, "--max-tokens", "4000",
            "--required-batch-size-multiple", "1", "--num-workers", "0", "--log-format", "simple",
            "--no-progress-bar", "--seed", "1", "--optimizer", "adam", "--arch", "slam_s2t_tiny",
            "--label-smoothing", "0.0", "--disable-validation", *extra)


def generate_command(trained, *extra):
    return ("fairseq-generate", trained.data, "--user-dir", USER_DIR, "--task", "slam_speech_to_text",
            "--config-yaml", f"config_{trained.task_name}.yaml", "--gen-subset", f"train_{trained.task_name}",
            "--path", trained.checkpoint, "--max-tokens", "4000", "--required-batch-size-multiple", "1",
            "--num-workers", "0", "--beam", "5", *extra)


def load_for_generation(trained, *extra):
    """(task, models, generation cfg, batches) as fairseq-generate builds them."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    command = generate_command(trained, *extra)[1:]
    args = options.parse_args_and_arch(options.get_generation_parser(), [str(part) for part in command])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([str(trained.checkpoint)], task=task)
    for model in models:
        model.eval()
    split = f"train_{trained.task_name}"
    task.load_dataset(split)
    batches = list(task.get_batch_iterator(dataset=task.dataset(split), max_tokens=4000, max_sentences=3,
                                           required_batch_size_multiple=1).next_epoch_itr(shuffle=False))
    assert len(batches) > 1  # several batches, each with finished sentences leaving early
    return task, models, cfg.generation, batches


def decode(task, models, generation_cfg, batches, mode: str, weight: float = 0.3):
    task.args.ctc_decoding, task.args.ctc_decoding_weight = mode, weight
    generator = task.build_generator(models, generation_cfg)
    results = {}
    for sample in batches:
        for sample_id, hypos in zip(sample["id"].tolist(), task.inference_step(generator, models, sample)):
            results[sample_id] = hypos
    return generator, results


def ctc_frames(models, batches):
    """Sample id -> CTC output frames."""
    frames = {}
    with torch.no_grad():
        for sample in batches:
            net_input = sample["net_input"]
            encoder_out = models[0].encoder(src_tokens=net_input["src_tokens"], src_lengths=net_input["src_lengths"])
            _, lengths = models[0].get_ctc_output((None, {"encoder_out": encoder_out}))
            frames.update(zip(sample["id"].tolist(), lengths.tolist()))
    return frames


def frames_needed(tokens) -> int:
    """Fewest CTC frames that emit ``tokens``: one per label, one more blank between repeats."""
    tokens = list(tokens)
    return len(tokens) + sum(a == b for a, b in zip(tokens, tokens[1:]))


def test_joint_weight_zero_is_fairseq_beam_search(trained):
    task, models, generation_cfg, batches = load_for_generation(trained)
    from fairseq.sequence_generator import SequenceGenerator

    plain_generator, plain = decode(task, models, generation_cfg, batches, "none")
    assert type(plain_generator) is SequenceGenerator and type(plain_generator.model).__name__ == "EnsembleModel"
    joint_generator, joint = decode(task, models, generation_cfg, batches, "joint", weight=0.0)
    assert type(joint_generator.model).__name__ == "CTCPrefixFusedEnsemble"
    assert joint_generator.model.candidates == 10
    # the CTC posteriors are held once per sentence of the last batch, not once per hypothesis
    assert joint_generator.model._state.log_probs.size(1) == len(batches[-1]["id"])
    assert sorted(plain) == sorted(joint) == list(range(trained.utterances))
    for sample_id in plain:
        assert len(plain[sample_id]) == len(joint[sample_id]) == 5
        for expected, actual in zip(plain[sample_id], joint[sample_id]):
            assert torch.equal(expected["tokens"], actual["tokens"])
            torch.testing.assert_close(actual["positional_scores"], expected["positional_scores"])
            torch.testing.assert_close(actual["score"], expected["score"])


@pytest.mark.parametrize("mode", ["none", "joint"])
def test_beamable_cross_attention_gives_the_per_hypothesis_results(trained, mode):
    """SequenceGenerator makes the decoder's cross-attention cache the encoder states once per
    sentence and the encoder leave them unreordered (``set_beam_size``); hypotheses and scores
    must be those of one copy per hypothesis (joint search: also of the CTC input),
    across batches whose sentences finish at different steps; training mode turns it off."""
    task, models, generation_cfg, batches = load_for_generation(trained)
    attentions = [layer.encoder_attn for layer in models[0].decoder.layers]

    def run(beamable: bool):
        task.args.ctc_decoding, task.args.ctc_decoding_weight = mode, 0.3
        generator = task.build_generator(models, generation_cfg)
        assert all(attention.beam_size == 5 for attention in attentions) and models[0].encoder.beamable_decoder
        if not beamable:
            models[0].set_beam_size(1)
        return {sample_id: hypos for sample in batches
                for sample_id, hypos in zip(sample["id"].tolist(), task.inference_step(generator, models, sample))}

    shared, per_hypothesis = run(beamable=True), run(beamable=False)
    assert sorted(shared) == sorted(per_hypothesis) == list(range(trained.utterances))
    for sample_id, hypos in shared.items():
        for actual, expected in zip(hypos, per_hypothesis[sample_id]):
            assert torch.equal(actual["tokens"], expected["tokens"])
            torch.testing.assert_close(actual["positional_scores"], expected["positional_scores"])
    task.build_generator(models, generation_cfg)
    models[0].train()
    assert all(attention.beam_size == 1 for attention in attentions) and not models[0].encoder.beamable_decoder


def test_a_beam_one_generator_after_a_beam_five_one_reads_every_hypothesis(trained):
    """SequenceGenerator sets the beamable attention only for beams above 1; the task's
    build_generator must clear what a previous, wider generator left on the same model."""
    task, models, generation_cfg, batches = load_for_generation(trained)
    decode(task, models, generation_cfg, batches, "none")
    generation_cfg.beam = 1
    _, greedy = decode(task, models, generation_cfg, batches, "none")
    assert all(layer.encoder_attn.beam_size == 1 for layer in models[0].decoder.layers)
    assert not models[0].encoder.beamable_decoder
    assert sorted(greedy) == list(range(trained.utterances))
    assert all(len(hypos) == 1 for hypos in greedy.values())


def test_a_plain_fairseq_beam_one_generator_after_a_wider_one_clears_the_beamable_attention(trained):
    """fairseq tells the models only beams above 1; a generator built outside the task (a script,
    the hub interface) after a wider one must not leave the model reading one row per sentence."""
    from fairseq.sequence_generator import SequenceGenerator

    task, models, _, batches = load_for_generation(trained)
    SequenceGenerator(models, task.target_dictionary, beam_size=5)
    assert models[0].encoder.beamable_decoder
    narrow = SequenceGenerator(models, task.target_dictionary, beam_size=1)
    assert not models[0].encoder.beamable_decoder
    assert all(layer.encoder_attn.beam_size == 1 for layer in models[0].decoder.layers)
    hypos = narrow.generate(models, batches[0])
    assert len(hypos) == len(batches[0]["id"])


def test_joint_weight_one_never_outgrows_the_ctc_frames(trained):
    task, models, generation_cfg, batches = load_for_generation(trained)
    frames = ctc_frames(models, batches)
    _, joint = decode(task, models, generation_cfg, batches, "joint", weight=1.0)
    eos = task.target_dictionary.eos()
    for sample_id, hypos in joint.items():
        for hypo in hypos:
            tokens = hypo["tokens"].tolist()
            assert tokens[-1] == eos and eos not in tokens[:-1]
            assert frames_needed(tokens[:-1]) <= frames[sample_id]
            assert math.isfinite(float(hypo["score"]))


def _never_end(model, eos: int) -> None:
    """Makes ``model``'s decoder all but forbid end-of-sentence: it writes until ``--max-len-b``."""
    projection = model.decoder.output_projection

    class NoEnd(torch.nn.Module):
        def forward(self, features):
            logits = projection(features)
            logits[..., eos] = -1e4
            return logits

    model.decoder.output_projection = NoEnd()


def test_joint_search_stops_a_decoder_that_never_ends(trained):
    """With eos all but forbidden to the decoder, beam search writes until --max-len-b; joint
    search must end every hypothesis where the CTC frames run out."""
    task, models, generation_cfg, batches = load_for_generation(trained, "--max-len-b", "60")
    _never_end(models[0], task.target_dictionary.eos())
    frames = ctc_frames(models, batches)
    _, plain = decode(task, models, generation_cfg, batches, "none")
    assert all(len(hypos[0]["tokens"]) == 61 for hypos in plain.values())  # 60 tokens, then forced eos
    _, joint = decode(task, models, generation_cfg, batches, "joint", weight=0.3)
    for sample_id, hypos in joint.items():
        assert frames_needed(hypos[0]["tokens"][:-1].tolist()) <= frames[sample_id] < 60


def _repeated_ngrams(tokens, size: int) -> int:
    ngrams = [tuple(tokens[i:i + size]) for i in range(len(tokens) - size + 1)]
    return len(ngrams) - len(set(ngrams))


def test_no_repeat_ngram_size_blocks_repeats_on_cpu(trained):
    """fairseq's CPU n-gram blocker reads padding and bans nothing; the task's generator must ban
    every repeated n-gram, here of a decoder that never ends and so writes 60 tokens."""
    task, models, generation_cfg, batches = load_for_generation(trained, "--max-len-b", "60",
                                                                "--no-repeat-ngram-size", "3")
    _never_end(models[0], task.target_dictionary.eos())
    generator, blocked = decode(task, models, generation_cfg, batches, "none")
    assert type(generator.repeat_ngram_blocker).__name__ == "PrefixNGramRepeatBlock"
    generation_cfg.no_repeat_ngram_size = 0
    _, free = decode(task, models, generation_cfg, batches, "none")
    assert sum(_repeated_ngrams(hypos[0]["tokens"][:-1].tolist(), 3) for hypos in free.values()) > 0
    for hypos in blocked.values():
        for hypo in hypos:
            assert _repeated_ngrams(hypo["tokens"][:-1].tolist(), 3) == 0


def test_no_repeat_ngram_size_one_bans_every_written_token_but_the_begin_symbol():
    from slam_fairseq.decoding.ngram_repeat_block import PrefixNGramRepeatBlock

    blocker = PrefixNGramRepeatBlock(1, use_extension=False)
    tokens = torch.tensor([[2, 5, 7, 5, 1, 1], [2, 4, 3, 9, 1, 1]])  # begin symbol, 3 written, buffer
    banned = torch.isinf(blocker(tokens, torch.zeros(2, 10), bsz=2, beam_size=1, step=3))
    assert [row.nonzero().flatten().tolist() for row in banned] == [[5, 7], [3, 4, 9]]
    assert not torch.isinf(blocker(tokens, torch.zeros(2, 10), bsz=2, beam_size=1, step=0)).any()


def test_greedy_scores_follow_lenpen_and_unnormalized_as_fairseq_does(trained):
    task, models, generation_cfg, batches = load_for_generation(trained)
    _, normalised = decode(task, models, generation_cfg, batches, "greedy")
    generation_cfg.unnormalized = True
    _, totals = decode(task, models, generation_cfg, batches, "greedy")
    generation_cfg.unnormalized, generation_cfg.lenpen = False, 2.0
    _, squared = decode(task, models, generation_cfg, batches, "greedy")
    for sample_id, [hypo] in normalised.items():
        length = len(hypo["tokens"])
        assert torch.equal(totals[sample_id][0]["tokens"], hypo["tokens"])
        assert float(totals[sample_id][0]["score"]) == pytest.approx(float(hypo["score"]) * length, rel=1e-5)
        assert float(squared[sample_id][0]["score"]) == pytest.approx(float(hypo["score"]) / length, rel=1e-5)


def test_ctc_decoding_needs_a_ctc_head(trained):
    task, models, generation_cfg, _ = load_for_generation(trained)
    models[0].ctc_projection = None
    for mode in ("greedy", "joint", "lexicon"):
        task.args.ctc_decoding = mode
        with pytest.raises(ValueError, match=f"--ctc-decoding {mode} needs a model with a CTC head.*"
                                             f"{re.escape(str(trained.checkpoint))}"):
            task.build_generator(models, generation_cfg)


def test_greedy_and_lexicon_warn_that_they_ignore_the_target_language(trained, tmp_path, caplog):
    task, models, generation_cfg, _ = load_for_generation(trained)
    text = tmp_path / "lexicon.txt"
    text.write_text("a b\n", encoding="utf-8")
    task.args.lexicon_text = str(text)
    for prefix_size, expected in ((0, False), (1, True)):
        models[0].ctc_target_prefix_size = prefix_size  # 1: a multilingual model's language tag
        for mode in ("greedy", "lexicon"):
            task.args.ctc_decoding = mode
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                task.build_generator(models, generation_cfg)
            assert (f"--ctc-decoding {mode} reads the CTC head alone, which does not see the target language"
                    in caplog.text) == expected


def test_flags_a_decoding_mode_cannot_honour_are_refused(trained, tmp_path):
    task, models, generation_cfg, _ = load_for_generation(trained)
    text = tmp_path / "lexicon.txt"
    text.write_text("a b\n", encoding="utf-8")
    task.args.lexicon_text = str(text)
    for mode in ("greedy", "lexicon"):
        task.args.ctc_decoding = mode
        generation_cfg.nbest = 3
        with pytest.raises(ValueError, match=f"--ctc-decoding {mode} gives one hypothesis per utterance, not --nbest 3"):
            task.build_generator(models, generation_cfg)
        generation_cfg.nbest, generation_cfg.print_alignment = 1, "hard"
        with pytest.raises(ValueError, match=f"--ctc-decoding {mode} has no attention alignment"):
            task.build_generator(models, generation_cfg)
        generation_cfg.print_alignment, generation_cfg.score_reference = None, True
        with pytest.raises(ValueError, match=f"--ctc-decoding {mode} cannot be combined with --score-reference"):
            task.build_generator(models, generation_cfg)
        generation_cfg.score_reference = False
        for field, value, message in (("sampling", True, "does not combine with Sampling"),
                                      ("diverse_beam_groups", 5, "does not combine with DiverseBeamSearch"),
                                      ("min_len", 2, "cannot honour --min-len 2"),
                                      ("no_repeat_ngram_size", 2, "cannot honour --no-repeat-ngram-size 2"),
                                      ("unkpen", 1.5, "cannot honour --unkpen 1.5"),
                                      ("temperature", 0.5, "cannot honour --temperature 0.5"),
                                      ("prefix_size", 1, r"cannot honour --prefix-size 1 \(the CTC head writes")):
            before = getattr(generation_cfg, field)
            setattr(generation_cfg, field, value)
            with pytest.raises(ValueError, match=f"--ctc-decoding {mode} .*{message}"):
                task.build_generator(models, generation_cfg)
            setattr(generation_cfg, field, before)
        with pytest.raises(ValueError, match=f"--ctc-decoding {mode} .*cannot honour --lm-path"):
            task.build_generator(models, generation_cfg,
                                 extra_gen_cls_kwargs={"lm_model": torch.nn.Linear(1, 1), "lm_weight": 0.5})
        models[0].ctc_target_prefix_size = 1  # a language tag: --prefix-size 1 forces it
        generation_cfg.prefix_size = 1
        task.build_generator(models, generation_cfg)
        models[0].ctc_target_prefix_size, generation_cfg.prefix_size = 0, 0
    task.args.ctc_decoding = "joint"
    generation_cfg.match_source_len = True
    with pytest.raises(ValueError, match="does not combine with --match-source-len"):
        task.build_generator(models, generation_cfg)


def test_lexicon_decoding_needs_a_lexicon_text(trained, tmp_path):
    task, models, generation_cfg, _ = load_for_generation(trained)
    task.args.ctc_decoding, task.args.lexicon_text = "lexicon", None
    with pytest.raises(ValueError, match="--ctc-decoding lexicon needs --lexicon-text FILE"):
        task.build_generator(models, generation_cfg)
    task.args.lexicon_text = str(tmp_path / "no_such_text.txt")
    with pytest.raises(FileNotFoundError, match="no_such_text.txt"):
        task.build_generator(models, generation_cfg)


def test_encoder_reordering_keeps_the_ctc_input(trained):
    task, models, _, batches = load_for_generation(trained)
    net_input = batches[0]["net_input"]
    with torch.no_grad():
        encoder_out = models[0].encoder(src_tokens=net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        new_order = torch.tensor([1, 0, 0])
        reordered = models[0].encoder.reorder_encoder_out(encoder_out, new_order)
        expected, _ = models[0].get_ctc_output((None, {"encoder_out": encoder_out}))
        actual, lengths = models[0].get_ctc_output((None, {"encoder_out": reordered}))
    torch.testing.assert_close(actual, expected.index_select(1, new_order))
    assert lengths.shape == (3,)


def _recomputed_wer(results) -> float:
    errors = sum(editdistance.eval(reference.split(), hypothesis.split()) for reference, hypothesis in results.values())
    return 100.0 * errors / sum(len(reference.split()) for reference, _ in results.values())


LOG_LINES = {"joint": "joint CTC/attention beam search", "greedy": "best-path CTC", "lexicon": "CTC lexicon beam search"}


@pytest.mark.parametrize("mode, bound", [("joint", JOINT_WER_BOUND), ("greedy", GREEDY_WER_BOUND),
                                         ("lexicon", LEXICON_WER_BOUND)])
def test_fairseq_generate_ctc_decoding_scores_wer(trained, mode, bound):
    lexicon = ["--lexicon-text", trained.data / f"train_{trained.task_name}.tsv"] if mode == "lexicon" else []
    log = run_fairseq(*generate_command(trained, "--ctc-decoding", mode, "--ctc-decoding-weight", "0.3",
                                        *lexicon, *WER_OPTIONS)).stdout
    assert LOG_LINES[mode] in log
    results = hypotheses(log)
    assert sorted(results) == list(range(trained.utterances))
    assert all(re.search(rf"^H-{index}\t\S+\t", log, flags=re.M) for index in results)
    wer = parse_wer(log)
    print(f"{mode}: WER {wer:.2f}")
    assert wer == pytest.approx(_recomputed_wer(results), abs=0.01)  # every utterance counted
    assert wer <= bound


def test_training_with_the_task_equals_speech_to_text(trained, tmp_path):
    losses = {}
    for task in ("speech_to_text", "slam_speech_to_text"):
        log = run_fairseq(*train_command(trained.data, trained.task_name, tmp_path / task, task,
                                         "--criterion", "label_smoothed_cross_entropy_with_ctc", "--ctc-weight", "0.5",
                                         "--lr", "1e-3", "--max-update", "3", "--log-interval", "1",
                                         "--no-save")).stdout
        losses[task] = re.findall(r"\| (?:loss|nll_loss|ctc_loss) [0-9.]+", log)
        assert len(losses[task]) >= 9, log[-3000:]
    assert losses["slam_speech_to_text"] == losses["speech_to_text"]


def test_the_task_removes_what_a_killed_save_left_at_its_first_epoch_only(trained, tmp_path):
    """``slam_speech_to_text`` in training: rank 0 removes this --checkpoint-suffix's unfinished
    checkpoint writes (``NAME.pt.tmp``, a whole checkpoint each) when its first epoch begins."""
    task, models, _, _ = load_for_generation(trained)
    past = time.time() - 3600
    leftover, other_run = tmp_path / "checkpoint_3_90.pt.tmp", tmp_path / "checkpoint_last_b.pt.tmp"
    for path in (leftover, other_run):
        path.write_bytes(b"PK" * 100)
        os.utime(path, (past, past))
    task.args.save_dir, task.args.checkpoint_suffix = str(tmp_path), ""
    task.begin_epoch(1, models[0])
    assert not leftover.exists() and other_run.exists()
    leftover.write_bytes(b"PK")
    os.utime(leftover, (past, past))
    task.begin_epoch(2, models[0])
    assert leftover.exists(), "only at the first epoch of the process"
