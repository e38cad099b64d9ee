"""Pre-training data: masks, STM negatives, the three datasets, the round-robin zip, bad inputs.

Masks are checked against their configuration over many draws; datasets are read back from tiny
data directories written like the manifest scripts write them (``pretraining_fixtures``).
"""
from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures as fixtures  # noqa: E402

from slam_formats.manifest import ManifestError, read_s2t_manifest
from slam_fairseq.data.pretraining.config import PretrainingDataConfig  # noqa: E402
from slam_fairseq.data.pretraining.frame_masks import (FrameMaskingSettings,  # noqa: E402
                                                         expected_masked_fraction,
                                                         frame_span_mask, start_prob_for_fraction)
from slam_fairseq.data.pretraining.pair import PretrainingPairDataset  # noqa: E402
from slam_fairseq.data.pretraining.round_robin import (RoundRobinBatchDataset,  # noqa: E402
                                                       RoundRobinEpochBatchIterator,
                                                       make_modality_batches)
from slam_fairseq.data.pretraining.seeding import masking_rng  # noqa: E402
from slam_fairseq.data.pretraining.span_masks import (SpanMaskingSettings, TextVocabulary,  # noqa: E402
                                                        draw_spans, mask_text, spans_to_mask)
from slam_fairseq.data.pretraining.feature_rows import (SpeechDataError, SpeechFeatureReader,  # noqa: E402
                                                        read_speech_rows)
from slam_fairseq.data.pretraining.speech import PretrainingSpeechDataset  # noqa: E402
from slam_fairseq.data.pretraining.stm_negatives import draw_stm_negatives  # noqa: E402
from slam_fairseq.data.pretraining.text import (PretrainingTextDataset,  # noqa: E402
                                                        load_text_tokens)
from slam_fairseq.modules.subsampling import subsampled_lengths  # noqa: E402

VOCABULARY = TextVocabulary(pad=1, eos=2, mask=99, num_special=4, size=100)
NO_LIMITS = (10 ** 6, 10 ** 6)


def _runs(mask: np.ndarray):
    """(start, length) of every run of True."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2] - edges[::2]))


# -- text span masking ------------------------------------------------------------------------------
def test_text_span_masking_masks_15_percent_in_spans_of_5():
    settings = SpanMaskingSettings()  # 15%, fixed spans of 5
    masked = total = 0
    lengths = []
    for index in range(2000):
        num_tokens = 100 + index % 57
        starts, span_lengths = draw_spans(num_tokens, masking_rng(1, 1, index, 1), settings)
        mask = spans_to_mask(num_tokens, starts, span_lengths)
        assert mask.sum() == span_lengths.sum(), "spans overlap"
        assert (starts + span_lengths <= num_tokens).all()
        budget = int(span_lengths.sum())
        assert sorted(span_lengths.tolist()) == sorted([5] * (budget // 5) + ([budget % 5] if budget % 5 else [])), \
            "spans of 5, one shorter span takes the remainder"
        masked += mask.sum()
        total += num_tokens
        lengths.extend(span_lengths.tolist())
    assert abs(masked / total - 0.15) < 0.005
    assert max(lengths) == 5 and np.mean(np.asarray(lengths) == 5) > 0.75


def test_geometric_spans_follow_spanbert():
    settings = SpanMaskingSettings(distribution="geometric")  # Geo(0.2) on 1..10: mean 3.8
    masked = total = 0
    lengths = []
    for index in range(20):
        num_tokens = 20000 + index
        starts, span_lengths = draw_spans(num_tokens, masking_rng(1, 1, index, 1), settings)
        assert spans_to_mask(num_tokens, starts, span_lengths).sum() == span_lengths.sum()
        masked += span_lengths.sum()
        total += num_tokens
        lengths.extend(span_lengths[:-1].tolist())  # the last one is cut to the budget
    assert abs(masked / total - 0.15) < 0.002
    assert min(lengths) == 1 and max(lengths) == 10 and abs(np.mean(lengths) - 3.8) < 0.1


def test_bert_replacement_80_10_10_and_eos_never_masked():
    rng = np.random.default_rng(0)
    counts = {"mask": 0, "random": 0, "kept": 0}
    for index in range(1500):
        tokens = np.concatenate((rng.integers(4, 99, size=60), [VOCABULARY.eos]))
        source, target = mask_text(tokens, masking_rng(3, 1, index, 1), VOCABULARY, SpanMaskingSettings())
        picked = target != VOCABULARY.pad
        assert not picked[-1] and source[-1] == VOCABULARY.eos
        assert (target[picked] == tokens[picked]).all() and (source[~picked] == tokens[~picked]).all()
        assert ((source >= VOCABULARY.num_special) | (source == VOCABULARY.eos)).all()
        counts["mask"] += int((source[picked] == VOCABULARY.mask).sum())
        counts["kept"] += int((source[picked] == tokens[picked]).sum())
        counts["random"] += int(((source[picked] != tokens[picked]) & (source[picked] != VOCABULARY.mask)).sum())
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.02
    assert abs(counts["random"] / total - 0.1) < 0.02  # a random token may equal the original: ~1%
    assert abs(counts["kept"] / total - 0.1) < 0.02


def test_tlm_text_masks_half_of_the_tokens():
    settings = SpanMaskingSettings(mask_prob=0.5, span_length=5)
    masked = total = 0
    for index in range(1000):
        tokens = np.concatenate((np.full(40, 7), [VOCABULARY.eos]))
        _, target = mask_text(tokens, masking_rng(1, 1, index, 3), VOCABULARY, settings)
        masked += int((target != VOCABULARY.pad).sum())
        total += 40
    assert abs(masked / total - 0.5) < 0.01


# -- frame masking ------------------------------------------------------------------------------------
@pytest.mark.parametrize("start_prob, expected", [(0.065, 0.49), (0.13, 0.75)])
def test_frame_masking_fraction_and_spans(start_prob, expected):
    assert abs(expected_masked_fraction(start_prob, 10) - expected) < 0.01
    fractions = []
    for index in range(300):
        mask = frame_span_mask(1000, start_prob, 10, masking_rng(1, 1, index, 2))
        fractions.append(mask.mean())
        for start, length in _runs(mask):
            assert length >= 10 or start + length == 1000, "a span shorter than 10 frames"
    assert abs(np.mean(fractions) - expected) < 0.015


def test_frame_masking_start_probability_for_a_fraction():
    assert abs(start_prob_for_fraction(0.75, 10) - 0.1294) < 1e-3
    assert abs(expected_masked_fraction(start_prob_for_fraction(0.49, 10), 10) - 0.49) < 1e-9


def test_every_utterance_gets_a_masked_span():
    for index in range(200):
        assert frame_span_mask(3, 0.065, 10, masking_rng(1, 1, index, 2)).any()


# -- STM negatives -------------------------------------------------------------------------------------
def test_stm_negatives_never_pair_a_row_with_its_own_transcript():
    rng = np.random.default_rng(0)
    negatives = rows = 0
    for batch in range(500):
        size = int(rng.integers(2, 9))
        pool = [[5, 6, 7], [5, 6, 7], [8, 9], [10]]  # duplicates on purpose
        transcripts = [pool[int(i)] for i in rng.integers(0, len(pool), size=size)]
        text_index, label = draw_stm_negatives(transcripts, masking_rng(1, 1, batch, 5))
        for row in range(size):
            assert (label[row] == 1) == (text_index[row] == row)
            if label[row] == 0:
                assert transcripts[text_index[row]] != transcripts[row]
        negatives += int((label == 0).sum())
        rows += size
    assert 0.3 < negatives / rows < 0.5  # rows whose every other row shares their text stay positive

    distinct = [[i, i + 1] for i in range(8)]
    fractions = [1 - draw_stm_negatives(distinct, masking_rng(2, 1, b, 5))[1].mean() for b in range(400)]
    assert abs(np.mean(fractions) - 0.5) < 0.03


def test_stm_batch_of_one_or_of_one_sentence_has_no_negatives():
    assert draw_stm_negatives([[4, 5]], masking_rng(1, 1, 0, 5))[1].tolist() == [1]
    text_index, label = draw_stm_negatives([[4, 5]] * 6, masking_rng(1, 1, 0, 5), negative_prob=1.0)
    assert label.tolist() == [1] * 6 and text_index.tolist() == list(range(6))


# -- datasets from a data directory ----------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fixtures.build_data_dir(tmp_path_factory.mktemp("pretraining_data") / "data", real_speech=False,
                                   num_speech=12, num_pairs=9, num_text=12)


def _datasets(data_dir: Path, seed: int = 1):
    config = PretrainingDataConfig(str(data_dir))
    vocabulary = TextVocabulary.from_dictionary(config.dictionary)
    speech = PretrainingSpeechDataset(
        SpeechFeatureReader(read_speech_rows(data_dir / "speech_train.tsv"), str(data_dir), config.feature_transform),
        FrameMaskingSettings(), seed)
    text = PretrainingTextDataset(load_text_tokens(str(data_dir), "train", config.dictionary, config.encode_lines),
                                  vocabulary, SpanMaskingSettings(), seed)
    rows = read_speech_rows(data_dir / "pair_train.tsv", need_transcript=True)
    pair = PretrainingPairDataset(SpeechFeatureReader(rows, str(data_dir), config.feature_transform),
                                  config.encode_lines(rows.transcripts), vocabulary,
                                  SpanMaskingSettings(mask_prob=0.5), FrameMaskingSettings(0.13, 10), 0.5, seed)
    return config, {"speech": speech, "text": text, "pair": pair}


def test_masks_depend_on_seed_epoch_and_index_only(data_dir):
    _, first = _datasets(data_dir)
    _, again = _datasets(data_dir)
    _, other_seed = _datasets(data_dir, seed=2)
    for name, key in (("speech", "frame_mask"), ("text", "source"), ("pair", "frame_mask"), ("pair", "source")):
        a, b = first[name].get_item(1, epoch=3), again[name].get_item(1, epoch=3)
        assert torch.equal(a[key], b[key]), f"{name} {key} not reproducible"
        draws = [first[name].get_item(1, epoch=e)[key] for e in range(1, 9)]
        assert any(not torch.equal(draws[0], d) for d in draws[1:]), f"{name} {key} ignores the epoch"
        seeds = [other_seed[name].get_item(1, epoch=e)[key] for e in range(1, 9)]
        assert any(not torch.equal(x, y) for x, y in zip(draws, seeds)), f"{name} {key} ignores the seed"


def test_batches_follow_the_contract(data_dir):
    config, datasets = _datasets(data_dir)
    mask = config.dictionary.index("<mask>")
    assert mask == len(config.dictionary) - 1

    speech = datasets["speech"].collater([datasets["speech"][i] for i in range(3)])
    assert speech["features"].shape[0] == 3 and speech["features"].shape[2] == 80
    assert speech["frame_mask"].shape == (3, int(subsampled_lengths(speech["feature_lengths"]).max()))
    assert speech["nframes"] == int(subsampled_lengths(speech["feature_lengths"]).sum())
    for row, length in enumerate(subsampled_lengths(speech["feature_lengths"]).tolist()):
        assert not speech["frame_mask"][row, length:].any()
        assert speech["features"][row, speech["feature_lengths"][row]:].abs().sum() == 0

    text = datasets["text"].collater([datasets["text"][i] for i in range(4)])
    assert text["tokens"].shape == text["target"].shape
    assert text["ntokens"] == int(text["tokens"].ne(config.dictionary.pad()).sum())

    pair = datasets["pair"].collater([datasets["pair"][i] for i in range(5)])
    for key in ("id", "features", "feature_lengths", "frame_mask", "tokens", "target", "clean_tokens",
                "stm_text_index", "stm_label", "ntokens", "nframes"):
        assert key in pair, key
    assert pair["stm_label"].tolist() == (pair["stm_text_index"] == torch.arange(5)).long().tolist()
    picked = pair["target"].ne(config.dictionary.pad())
    assert torch.equal(pair["target"][picked], pair["clean_tokens"][picked])

    # the host-side indices the model uses instead of nonzero() on the device
    pad = config.dictionary.pad()
    for batch in (speech, pair):
        real = torch.arange(batch["frame_mask"].shape[1])[None] < subsampled_lengths(batch["feature_lengths"])[:, None]
        assert torch.equal(batch["masked_frames"], torch.stack((batch["frame_mask"] & real).nonzero(as_tuple=True)))
        assert batch["masked_frames"].shape[1] > 0
    for batch in (text, pair):
        assert torch.equal(batch["target_index"], torch.stack(batch["target"].ne(pad).nonzero(as_tuple=True)))
        assert batch["target_index"].shape[1] > 0

    # each row's lengths as Python ints, equal to what the model reads from the padding masks
    for batch in (speech, pair):
        assert batch["lengths_on_host"]["speech"] == tuple(subsampled_lengths(batch["feature_lengths"]).tolist())
    for batch in (text, pair):
        assert batch["lengths_on_host"]["text"] == tuple(batch["tokens"].ne(pad).sum(1).tolist())
    matched = pair["clean_tokens"][pair["stm_text_index"]]
    assert pair["lengths_on_host"]["stm_text"] == tuple(matched.ne(pad).sum(1).tolist())
    assert all(type(n) is int for batch in (speech, text, pair) for lengths in batch["lengths_on_host"].values()
               for n in lengths)
    from fairseq import utils
    moved = utils.apply_to_sample(lambda tensor: tensor.to(torch.float64), pair)  # how fairseq moves a sample
    assert moved["lengths_on_host"] == pair["lengths_on_host"]


def test_utterance_normalisation_by_default_and_global_cmvn_when_configured(data_dir, tmp_path):
    import shutil

    import yaml

    config, datasets = _datasets(data_dir)
    features = datasets["speech"][0]["features"].numpy()
    assert np.allclose(features.mean(0), 0, atol=1e-4) and np.allclose(features.std(0), 1, atol=1e-2)

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    np.savez(copy / "gcmvn.npz", mean=np.full(80, 2.0, dtype=np.float32), std=np.full(80, 4.0, dtype=np.float32))
    raw = yaml.safe_load((copy / "config.yaml").read_text())
    raw["global_cmvn"] = {"stats_npz_path": "gcmvn.npz"}
    (copy / "config.yaml").write_text(yaml.safe_dump(raw))
    global_config = PretrainingDataConfig(str(copy))
    rows = read_speech_rows(copy / "speech_train.tsv")
    reader = SpeechFeatureReader(rows, str(copy), global_config.feature_transform)
    from slam_formats.features import read_features

    raw_features = read_features(rows.audio[0], str(copy))
    assert np.allclose(reader.read(0), (raw_features - 2.0) / 4.0)
    assert "global CMVN" in global_config.describe_normalization()


def test_indexed_and_raw_text_give_the_same_ids(data_dir, tmp_path):
    config = PretrainingDataConfig(str(data_dir))
    raw = load_text_tokens(str(data_dir), "train", config.dictionary, config.encode_lines)
    lines = (data_dir / "text_train.txt").read_text().splitlines()
    fixtures.write_indexed_text(tmp_path / "text_train", fixtures.encode_with_dictionary(
        data_dir / "spm_unigram60.model", lines))
    indexed = load_text_tokens(str(tmp_path), "train", config.dictionary, None)
    assert len(raw) == len(indexed) == len(lines)
    for index in range(len(raw)):
        assert raw[index].tolist() == indexed[index].tolist()
        assert raw[index][-1] == config.dictionary.eos()


# -- round robin -------------------------------------------------------------------------------------
def _round_robin(datasets, cycle=True):
    zipped = RoundRobinBatchDataset(datasets, seed=1, cycle=cycle)
    limits = {"speech": 3, "text": 6, "pair": 3}  # 12 / 3 = 4, 12 / 6 = 2, 9 / 3 = 3 batches
    zipped.set_batches({name: make_modality_batches(dataset, None, limits[name], NO_LIMITS, seed=1)
                        for name, dataset in datasets.items()})
    return zipped


def _iterator(zipped, epoch=1):
    return RoundRobinEpochBatchIterator(dataset=zipped, collate_fn=zipped.collater,
                                        batch_sampler=zipped.batch_sampler, seed=1, epoch=epoch)


def test_round_robin_yields_every_modality_each_step_and_cycles_the_smaller_ones(data_dir):
    _, datasets = _datasets(data_dir)
    zipped = _round_robin(datasets)
    assert zipped.epoch_modality == "speech" and len(zipped) == 4
    iterator = _iterator(zipped)
    seen = {name: [] for name in datasets}
    for epoch in range(1, 4):
        steps = 0
        for sample in iterator.next_epoch_itr(shuffle=True):
            assert set(sample) == {"speech", "text", "pair"}
            for name, batch in sample.items():
                seen[name].append(tuple(batch["id"].tolist()))
            steps += 1
        assert steps == 4 and iterator.epoch == epoch
        assert sorted(sum(seen["speech"][-4:], ())) == list(range(12)), "one pass over speech per epoch"
    # 12 steps: text's 2 batches 6 times each, pairs' 3 batches 4 times each
    assert sorted({batch: seen["text"].count(batch) for batch in seen["text"]}.values()) == [6, 6]
    assert sorted({batch: seen["pair"].count(batch) for batch in seen["pair"]}.values()) == [4, 4, 4]
    assert all(len(batch) == 3 for batch in seen["pair"]), "the last batch is kept whole"


def test_validation_round_robin_visits_each_batch_once(data_dir):
    _, datasets = _datasets(data_dir)
    zipped = _round_robin(datasets, cycle=False)
    samples = list(_iterator(zipped).next_epoch_itr(shuffle=False))
    assert len(samples) == 4
    for name, count in (("speech", 12), ("text", 12), ("pair", 9)):
        ids = [i for sample in samples if name in sample for i in sample[name]["id"].tolist()]
        assert sorted(ids) == list(range(count))


def test_round_robin_resumes_mid_epoch_with_the_same_batches(data_dir):
    _, datasets = _datasets(data_dir)

    def ids(sample):
        return {name: batch["id"].tolist() for name, batch in sample.items()}

    def masks(sample):
        return [sample["speech"]["frame_mask"], sample["text"]["tokens"], sample["pair"]["stm_label"]]

    reference = _iterator(_round_robin(datasets))
    expected = [s for epoch in range(2) for s in reference.next_epoch_itr()]

    interrupted = _iterator(_round_robin(datasets))
    done = list(interrupted.next_epoch_itr())
    iterator = interrupted.next_epoch_itr()
    done.append(next(iterator))
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["iterations_in_epoch"] == 1

    resumed = _iterator(_round_robin(datasets))  # built for epoch 1: the state moves it to epoch 2
    resumed.load_state_dict(state)
    done.extend(resumed.next_epoch_itr())
    assert [ids(s) for s in done] == [ids(s) for s in expected]
    for got, want in zip(done, expected):
        assert all(torch.equal(a, b) for a, b in zip(masks(got), masks(want)))


def test_resuming_under_another_epoch_layout_warns_and_past_its_end_starts_the_next_epoch(data_dir, caplog):
    """fairseq resumes an epoch at a position in its batch list; the state records the layout it
    was saved under, so another layout (other batch limits here) is named instead of silently
    skipping and repeating batches, and a position past the new epoch's end moves on."""
    _, datasets = _datasets(data_dir)
    interrupted = _iterator(_round_robin(datasets))  # speech: 4 batches of 3 -> 4 steps an epoch
    iterator = interrupted.next_epoch_itr()
    for _ in range(3):
        next(iterator)
    state = interrupted.state_dict()
    layout = state[RoundRobinEpochBatchIterator.LAYOUT_KEY]
    assert {key: layout[key] for key in ("steps_per_epoch", "epoch_modality", "num_shards", "batches")} == {
        "steps_per_epoch": 4, "epoch_modality": "speech", "num_shards": 1,
        "batches": {"speech": 4, "text": 2, "pair": 3}}

    with caplog.at_level(logging.WARNING):
        same = _iterator(_round_robin(datasets))
        same.load_state_dict(state)
    assert "laid out differently" not in caplog.text and same.iterations_in_epoch == 3

    def rebatched(speech_per_batch: int):
        zipped = RoundRobinBatchDataset(datasets, seed=1, cycle=True, epoch_modality="speech")
        limits = {"speech": speech_per_batch, "text": 6, "pair": 3}
        zipped.set_batches({name: make_modality_batches(dataset, None, limits[name], NO_LIMITS, seed=1)
                            for name, dataset in datasets.items()})
        return _iterator(zipped)

    from fairseq.logging import metrics

    def restored_epoch_meters():  # what fairseq's trainer restores from the checkpoint before the iterator
        metrics.reset_meters("train")
        with metrics.aggregate("train"):
            metrics.log_scalar("loss", 7.0)

    finer = rebatched(2)  # 6 steps an epoch: step 3 exists, but holds other examples
    restored_epoch_meters()
    with caplog.at_level(logging.WARNING):
        finer.load_state_dict(state)
    assert metrics.get_smoothed_values("train")["loss"] == 7.0, "the same epoch goes on: its meters too"
    assert "resuming epoch 1 at step 3 of a batch list laid out differently (steps_per_epoch 4 -> 6" in caplog.text
    assert finer.epoch == 1 and finer.iterations_in_epoch == 3 and len(list(finer.next_epoch_itr())) == 3

    caplog.clear()
    coarser = rebatched(6)  # 2 steps an epoch: step 3 is past its end
    restored_epoch_meters()
    with caplog.at_level(logging.WARNING):
        coarser.load_state_dict(state)
    assert metrics.get_smoothed_values("train")["loss"] is None, "the next epoch's meters start empty"
    assert "its epoch has only 2 steps per shard (steps_per_epoch 4 -> 2, batches" in caplog.text
    assert "): starting epoch 2" in caplog.text
    assert coarser.next_epoch_idx == 2
    assert len(list(coarser.next_epoch_itr())) == 2 and coarser.epoch == 2

    caplog.clear()  # the same number of batches, but two examples traded between them (other data)
    swapped = _round_robin(datasets)
    speech = [batch.copy() for batch in swapped.batches["speech"]]
    speech[0][0], speech[1][0] = speech[1][0], speech[0][0]
    swapped.set_batches({**swapped.batches, "speech": speech})
    traded = _iterator(swapped)
    with caplog.at_level(logging.WARNING):
        traded.load_state_dict(state)
    assert "resuming epoch 1 at step 3 of a batch list laid out differently (batch_digest " in caplog.text


def test_pairs_joining_or_leaving_a_resumed_epoch_move_no_other_modalitys_batches(data_dir, caplog):
    """Stage 2 adds the pair batches to a stage-1 epoch (and a later --stage2-start-update takes
    them away again): the speech and text batches of the rest of the epoch are those of a run that
    had pairs all along, so resuming says nothing about a changed layout."""
    _, datasets = _datasets(data_dir)
    without_pairs = {name: dataset for name, dataset in datasets.items() if name != "pair"}

    def ids(sample):
        return {name: batch["id"].tolist() for name, batch in sample.items() if name != "pair"}

    reference = [ids(sample) for sample in _iterator(_round_robin(datasets)).next_epoch_itr()]
    saved_without_pairs = None
    for saved_with, resumed_with in ((without_pairs, datasets), (datasets, without_pairs)):
        interrupted = _iterator(_round_robin(saved_with))
        iterator = interrupted.next_epoch_itr()
        done = [ids(next(iterator)) for _ in range(2)]
        state = interrupted.state_dict()
        saved_without_pairs = saved_without_pairs if saved_with is datasets else state
        caplog.clear()
        resumed = _iterator(_round_robin(resumed_with))
        with caplog.at_level(logging.WARNING):
            resumed.load_state_dict(state)
        assert "laid out differently" not in caplog.text and resumed.iterations_in_epoch == 2
        rest = list(resumed.next_epoch_itr())
        assert done + [ids(sample) for sample in rest] == reference
        assert all(("pair" in sample) == ("pair" in resumed_with) for sample in rest)
    # a layout saved without per-modality digests (an earlier release's checkpoint) is compared whole
    layout = saved_without_pairs[RoundRobinEpochBatchIterator.LAYOUT_KEY]
    state = dict(saved_without_pairs, **{RoundRobinEpochBatchIterator.LAYOUT_KEY: {
        key: value for key, value in layout.items() if key != "batch_digests"}})
    with caplog.at_level(logging.WARNING):
        _iterator(_round_robin(datasets)).load_state_dict(state)
    assert "laid out differently (batches {'speech': 4, 'text': 2} -> {'speech': 4, 'text': 2, 'pair': 3}" in caplog.text


def test_modalities_left_out_of_an_epoch_are_not_read_and_the_others_keep_their_batches(data_dir):
    """Pairs in an epoch that ends before stage 2: their examples are never read (the dataset's
    get_item is not called), the sample lists them as left out, and every other modality has
    the batches of an epoch that read them; fairseq's dummy batch still holds every modality."""
    from slam_fairseq.data.pretraining.round_robin import LEFT_OUT_KEY

    _, datasets = _datasets(data_dir)
    reference = [{name: batch["id"].tolist() for name, batch in sample.items()}
                 for sample in _iterator(_round_robin(datasets)).next_epoch_itr()]
    zipped = _round_robin(datasets)
    asked = []
    zipped.modalities_left_out = lambda steps: asked.append(steps) or ("pair",)
    reads = []
    pair_get_item = datasets["pair"].get_item
    datasets["pair"].get_item = lambda index, epoch: reads.append(index) or pair_get_item(index, epoch)
    iterator = _iterator(zipped)
    samples = list(iterator.next_epoch_itr())
    assert asked == [4] and reads == [], "asked once, with the steps of the epoch; no pair read"
    assert all(sample[LEFT_OUT_KEY] == ("pair",) and "pair" not in sample for sample in samples)
    assert [{name: sample[name]["id"].tolist() for name in ("speech", "text")} for sample in samples] == \
        [{name: ids[name] for name in ("speech", "text")} for ids in reference]
    key = iterator.frozen_batches[0][0]
    assert zipped.num_tokens(key) == sum(int(datasets[name].sizes[indices].sum())
                                         for name, indices in zipped.step_indices(*key[:2]).items() if name != "pair")
    dummy = iterator.first_batch
    assert set(dummy) == {"speech", "text", "pair"} and reads, "the dummy batch holds every modality"
    zipped.modalities_left_out = lambda steps: ()
    assert all("pair" in sample and LEFT_OUT_KEY not in sample for sample in iterator.next_epoch_itr())
    # data-loader workers started by pickling get the dataset without the task's callable
    del datasets["pair"].get_item  # the counting stand-in above
    copy = pickle.loads(pickle.dumps(zipped))
    assert copy.modalities_left_out is None and zipped.modalities_left_out is not None
    assert copy.step_indices(2, 1).keys() == zipped.step_indices(2, 1).keys()


def test_cycle_orders_are_the_same_whatever_order_steps_ask_and_stay_few(data_dir):
    """fairseq shuffles an epoch's steps; each modality keeps the orders of the cycles one epoch
    spans, so asking in any order gives the orders a fresh dataset draws, and the cache stays
    small however long the run."""
    _, datasets = _datasets(data_dir)
    zipped, fresh = _round_robin(datasets), _round_robin(datasets)
    steps = [(epoch, step) for epoch in range(1, 40) for step in range(len(zipped))]
    shuffled = [steps[i] for i in np.random.default_rng(0).permutation(len(steps))]
    for epoch, step in shuffled:
        got = zipped.step_indices(epoch, step)
        fresh._cycle_orders.clear()
        expected = fresh.step_indices(epoch, step)
        assert all(np.array_equal(got[name], expected[name]) for name in got)
    # 4 steps per epoch: text (2 batches) spans at most 3 cycles an epoch, pairs (3 batches) 3
    assert {name: len(orders) for name, orders in zipped._cycle_orders.items()} == {"speech": 3, "text": 4, "pair": 4}


# -- bad input -----------------------------------------------------------------------------------------
def test_text_and_manifests_not_in_utf8_are_errors_naming_the_file_and_line(data_dir, tmp_path):
    from slam_fairseq.decoding.word_lm import read_sentences
    from slam_fairseq.feature_extraction.inputs import read_input_shard

    config = PretrainingDataConfig(str(data_dir))
    (tmp_path / "text_train.txt").write_bytes("first line\nsecond caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"text_train\.txt:2: not UTF-8 \(byte 0xe9 at column 11\)"):
        load_text_tokens(str(tmp_path), "train", config.dictionary, config.encode_lines)
    lines = (data_dir / "pair_train.tsv").read_bytes().splitlines(keepends=True)
    manifest = tmp_path / "pair_train.tsv"
    manifest.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"\t", b"\xff\t", 1) + b"".join(lines[3:]))
    for read in (read_s2t_manifest, read_input_shard):
        with pytest.raises(ManifestError, match=r"pair_train\.tsv:3: not UTF-8 \(byte 0xff at column \d+\)"):
            read(str(manifest))
    with pytest.raises(ValueError, match=r"lexicon text .*text_train\.txt:2: not UTF-8"):
        read_sentences(tmp_path / "text_train.txt")


def test_empty_manifest_is_an_error_naming_the_file(data_dir, tmp_path):
    manifest = tmp_path / "speech_train.tsv"
    manifest.write_text("id\taudio\tn_frames\ttgt_text\tspeaker\n")
    with pytest.raises(ManifestError, match=r"speech_train\.tsv: empty manifest"):
        read_speech_rows(manifest)


def test_wrong_feature_dimension_fails_at_load_and_at_read(data_dir, tmp_path):
    config = PretrainingDataConfig(str(data_dir))
    np.save(tmp_path / "narrow.npy", np.zeros((50, 40), dtype=np.float32))
    np.save(tmp_path / "good.npy", np.zeros((50, 80), dtype=np.float32))
    rows = [{"id": "narrow", "audio": str(tmp_path / "narrow.npy"), "n_frames": 50, "tgt_text": "", "speaker": "s"}]
    fixtures.write_manifest(tmp_path / "speech_train.tsv", rows)
    with pytest.raises(SpeechDataError, match=r"speech_train\.tsv: row 'narrow': .*narrow\.npy.*\(50, 40\)"):
        SpeechFeatureReader(read_speech_rows(tmp_path / "speech_train.tsv"), str(tmp_path), config.feature_transform)

    good = dict(rows[0], id="good", audio=str(tmp_path / "good.npy"))
    fixtures.write_manifest(tmp_path / "speech_train.tsv", [good, rows[0]])
    reader = SpeechFeatureReader(read_speech_rows(tmp_path / "speech_train.tsv"), str(tmp_path),
                                 config.feature_transform)
    with pytest.raises(SpeechDataError, match=r"row 'narrow': .*narrow\.npy"):
        reader.read(1)


def test_short_utterances_are_skipped_and_counted(data_dir, tmp_path, caplog):
    np.save(tmp_path / "long.npy", np.zeros((50, 80), dtype=np.float32))
    rows = [{"id": f"u{i}", "audio": str(tmp_path / "long.npy"), "n_frames": frames, "tgt_text": "", "speaker": "s"}
            for i, frames in enumerate([50, 6, 3, 7])]
    fixtures.write_manifest(tmp_path / "speech_train.tsv", rows)
    with caplog.at_level(logging.WARNING):
        kept = read_speech_rows(tmp_path / "speech_train.tsv")
    assert list(kept.ids) == ["u0", "u3"]
    assert "speech_train.tsv: skipped 2 of 4 utterances shorter than 7 frames" in caplog.text


def test_features_shorter_than_7_frames_are_an_error(data_dir, tmp_path):
    config = PretrainingDataConfig(str(data_dir))
    np.save(tmp_path / "tiny.npy", np.zeros((5, 80), dtype=np.float32))
    fixtures.write_manifest(tmp_path / "speech_train.tsv", [
        {"id": "liar", "audio": str(tmp_path / "tiny.npy"), "n_frames": 50, "tgt_text": "", "speaker": "s"}])
    with pytest.raises(SpeechDataError, match=r"row 'liar': .*tiny\.npy has 5 frames, fewer than 7"):
        SpeechFeatureReader(read_speech_rows(tmp_path / "speech_train.tsv"), str(tmp_path), config.feature_transform)


def test_long_texts_are_skipped_and_counted(data_dir, caplog):
    _, datasets = _datasets(data_dir)
    text = datasets["text"]
    limit = int(np.sort(text.sizes)[-3])  # the longest examples exceed it
    too_long = int((text.sizes > limit).sum())
    with caplog.at_level(logging.WARNING):
        batches = make_modality_batches(text, None, 4, (10 ** 6, limit), seed=1)
    kept = sorted(int(i) for batch in batches for i in batch)
    assert len(kept) == len(text) - too_long and all(text.sizes[i] <= limit for i in kept)
    assert f"text_train.txt: skipped {too_long} of {len(text)} text examples longer than max positions" in caplog.text


def test_empty_text_and_foreign_ids_are_errors_naming_the_file(data_dir, tmp_path):
    config = PretrainingDataConfig(str(data_dir))
    (tmp_path / "text_train.txt").write_text("")
    with pytest.raises(ManifestError, match=r"text_train\.txt: empty text"):
        load_text_tokens(str(tmp_path), "train", config.dictionary, config.encode_lines)
    fixtures.write_indexed_text(tmp_path / "text_valid", [np.array([5, 6, 5000, 2])], vocab_size=6000)
    with pytest.raises(ManifestError, match=r"text_valid\.bin: line 0 holds token id 5000 outside the dictionary"):
        load_text_tokens(str(tmp_path), "valid", config.dictionary, config.encode_lines)
    # the whole file is scanned at load, not only its first line
    lines = [np.array([5, 6, 7, 2])] * 40 + [np.array([8, len(config.dictionary), 2])] + [np.array([9, 2])] * 5
    fixtures.write_indexed_text(tmp_path / "text_test", lines, vocab_size=6000)
    with pytest.raises(ManifestError, match=rf"text_test\.bin: line 40 holds token id {len(config.dictionary)} "
                                            rf"outside the dictionary of {len(config.dictionary)} symbols"):
        load_text_tokens(str(tmp_path), "test", config.dictionary, config.encode_lines)
    data = (tmp_path / "text_test.bin").read_bytes()
    (tmp_path / "text_test.bin").write_bytes(data[:-5])  # an odd number of bytes short of its index
    with pytest.raises(ManifestError, match=r"text_test\.bin: cannot be scanned .* cut short"):
        load_text_tokens(str(tmp_path), "test", config.dictionary, config.encode_lines)
    (tmp_path / "text_test.bin").write_bytes(data)
    index = (tmp_path / "text_test.idx").read_bytes()
    (tmp_path / "text_test.idx").write_bytes(index[:-7])
    with pytest.raises(ManifestError, match=r"text_test\.bin: cannot be scanned .*text_test\.idx: cut short"):
        load_text_tokens(str(tmp_path), "test", config.dictionary, config.encode_lines)
    fixtures.write_indexed_text(tmp_path / "text_test", [], vocab_size=6000)
    with pytest.raises(ManifestError, match=r"text_test\.bin: empty text"):
        load_text_tokens(str(tmp_path), "test", config.dictionary, config.encode_lines)


def test_a_corpus_larger_than_the_load_scan_is_sampled_and_its_other_lines_are_bad_rows(
        data_dir, tmp_path, monkeypatch, caplog):
    """Past SCAN_BYTES_AT_LOAD the load checks evenly spaced windows (first and last among them);
    a line it did not reach is left out when read, as a bad row naming the file and line."""
    import slam_formats.indexed_text as indexed_text
    from slam_fairseq.data.pretraining import text as text_module
    from slam_fairseq.data.pretraining.row_checks import BadRowError

    config = PretrainingDataConfig(str(data_dir))
    vocab = len(config.dictionary)
    lines = [np.array([5, 6, 7, 2])] * 100  # 400 ids
    lines[30] = np.array([5, vocab + 3, 7, 2])  # ids 120..123; windows start at 0, 96, 192, 288, 384
    fixtures.write_indexed_text(tmp_path / "text_train", lines, vocab_size=6000)
    monkeypatch.setattr(indexed_text, "SCAN_WINDOW_TOKENS", 16)
    monkeypatch.setattr(text_module, "SCAN_BYTES_AT_LOAD", 5 * 16 * 2)  # 5 windows of 16 uint16 ids
    scan = indexed_text.scan_token_ids(str(tmp_path / "text_train"), vocab, max_bytes=5 * 16 * 2)
    assert scan.first_outside is None and (scan.tokens_checked, scan.tokens_total) == (80, 400)
    assert indexed_text.scan_token_ids(str(tmp_path / "text_train"), vocab).first_outside == (30, vocab + 3)
    with caplog.at_level(logging.INFO):
        tokens = load_text_tokens(str(tmp_path), "train", config.dictionary, None)
    assert "checked 80 of 400 token ids against the dictionary at load" in caplog.text
    text = PretrainingTextDataset(tokens, TextVocabulary.from_dictionary(config.dictionary),
                                  SpanMaskingSettings(), seed=1)
    with pytest.raises(BadRowError, match=rf"text_train\.bin: line 30 holds token id {vocab + 3} outside"):
        text.get_item(30, 1)
    assert len(text.get_item(49, 1)["source"]) == 4, "the lines around it are read"
