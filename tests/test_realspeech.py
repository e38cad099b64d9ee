"""The real-speech track: the frozen-feature linear CTC probe (values on hand-made features, the
extractors' shapes and weights) and ``examples/realspeech/run_realspeech.py --size ci`` end to end
on a tiny corpus in the real builder's layout."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from realspeech_fixtures import write_fake_corpus  # noqa: E402
from s2t_fixtures import hypotheses, recomputed_wer, save_slam_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "realspeech"))
import probe  # noqa: E402

WORDS = ["abc", "ba", "cab", "aac", "cb", "bca"]


def _utterances(texts, informative: bool, seed: int):
    """Features that spell each text (one-hot of the character, 3 frames each, a silent frame
    between characters) or, with ``informative=False``, noise of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    symbols = sorted(set("".join(texts)) | {" "})
    utterances = []
    for index, text in enumerate(texts):
        frames = []
        for character in text:
            one_hot = torch.zeros(len(symbols) + 1)
            one_hot[symbols.index(character) + 1] = 1.0
            frames += [one_hot] * 3 + [torch.zeros(len(symbols) + 1)]
        features = torch.stack(frames) + 0.05 * torch.randn(len(frames), len(symbols) + 1, generator=generator)
        if not informative:
            features = torch.randn(features.shape, generator=generator)
        utterances.append(probe.Utterance(str(index), features, text))
    return utterances


def _sentences(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (3,), generator=generator))
            for _ in range(count)]


def test_probe_spells_informative_features_and_not_noise():
    train, test = _sentences(40, seed=1), _sentences(8, seed=2)
    identity = probe.LogMelStack(factor=1)
    readable = probe.run_probe(identity, {"train": _utterances(train, True, 1), "test": _utterances(test, True, 2)},
                               steps=150)
    noise = probe.run_probe(identity, {"train": _utterances(train, False, 1), "test": _utterances(test, False, 2)},
                            steps=150)
    assert readable["test"]["cer"] < 5.0, readable
    assert noise["test"]["cer"] > 50.0, noise
    assert readable["test"]["utterances"] == 8


def test_log_mel_stack_puts_four_frames_side_by_side():
    features = torch.arange(2 * 6 * 2, dtype=torch.float).reshape(2, 6, 2)
    stacked, lengths = probe.LogMelStack()(features, torch.tensor([6, 5]))
    assert stacked.shape == (2, 2, 8)
    assert torch.equal(stacked[0, 0], features[0, :4].reshape(-1))
    assert torch.equal(stacked[0, 1, :4], features[0, 4:6].reshape(-1))
    assert torch.equal(stacked[0, 1, 4:], torch.zeros(4))  # zero padding past the last frame
    assert lengths.tolist() == [2, 2]


def test_error_rates_count_characters_and_words():
    rates = probe.error_rates(["ab c", "x"], ["ab cd", "x"])
    assert rates["cer"] == pytest.approx(100.0 * 1 / 6)
    assert rates["wer"] == pytest.approx(100.0 * 1 / 3)
    assert (rates["distinct"], rates["utterances"]) == (2, 2)


def test_slam_extractor_loads_the_checkpoint_and_random_keeps_only_its_shape(tmp_path):
    checkpoint, state = save_slam_checkpoint(tmp_path / "slam.pt", seed=3)
    pretrained = probe.load_slam_encoder(checkpoint)
    random_encoder = probe.load_slam_encoder(checkpoint, pretrained=False, seed=5)
    key = "speech_encoder.output_projection.weight"
    assert torch.equal(pretrained.state_dict()[key], state["encoder." + key])
    assert random_encoder.state_dict()[key].shape == state["encoder." + key].shape
    assert not torch.equal(random_encoder.state_dict()[key], state["encoder." + key])
    features, lengths = torch.randn(2, 40, 80), torch.tensor([40, 27])
    states = probe.extract(probe.SlamFeatures(pretrained), [probe.Utterance("a", features[0], "x"),
                                                             probe.Utterance("b", features[1, :27], "y")])
    from slam_fairseq.modules.subsampling import subsampled_lengths

    assert [s.shape[0] for s in states] == subsampled_lengths(lengths).tolist() == [9, 6]
    assert states[0].shape[1] == pretrained.embed_dim
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        probe.load_slam_encoder(tmp_path / "missing.pt")


@pytest.mark.timeout(1000)  # the run's own 900 s limit reports a hang first, with its output
def test_ci_track_runs_every_stage_and_reports_real_numbers(tmp_path):
    corpus = tmp_path / "corpus"
    write_fake_corpus(corpus)
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "examples/realspeech/run_realspeech.py", "--work", str(work), "--size", "ci",
         "--corpus-dir", str(corpus), "--seeds", "1", "--threads", "1", "--workers", "1", "--parallel", "2",
         "--probe-finetuned"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stage 2 starts" in result.stdout
    report = json.loads((work / "report.json").read_text())
    test_rows = (work / "data" / "asr" / "test_asr.tsv").read_text().strip().splitlines()[1:]
    for init in ("pretrained", "stage1", "scratch"):
        for decoder in ("beam", "joint", "greedy", "lexicon"):
            scored = report["asr"][init]["1"][decoder]
            generated = hypotheses((work / "generate" / f"asr_{init}_seed1_{decoder}.txt").read_text())
            assert len(generated) == len(test_rows) == scored["utterances"]
            assert scored["wer"] == pytest.approx(recomputed_wer(generated), abs=0.01), (init, decoder)
            assert 1 <= scored["distinct"] <= scored["utterances"]
            train_texts = {line.split("\t")[3] for line in
                           (work / "data" / "asr" / "train_asr.tsv").read_text().splitlines()[1:]}
            assert scored["train_prompts"] == sum(hypothesis in train_texts for _, hypothesis in generated.values())
    assert set(report["probe"]) == {"slam_pretrained", "slam_stage1", "log_mel_stack4", "random_encoder",
                                    "asr_pretrained_seed1", "asr_stage1_seed1", "asr_scratch_seed1"}
    # the telephone corpus's recipe: Mel bins over 0-4 kHz in every speech manifest, SpecAugment SM
    for stage in ("prep_librilight", "prep_pairs", "prep_asr"):
        assert "--mel-high-freq 4000.0" in (work / "logs" / f"{stage}.log").read_text().splitlines()[0], stage
    asr_config = yaml.safe_load((work / "data" / "asr" / "config_asr.yaml").read_text())
    assert asr_config["specaugment"]["time_mask_p"] == 0.2 and asr_config["specaugment"]["freq_mask_N"] == 2
    # stage 1's end is kept apart from the end of stage 2, and both inits load their own
    finetune_logs = {init: (work / "logs" / f"finetune_asr_{init}_seed1.log").read_text().splitlines()[0]
                     for init in ("pretrained", "stage1", "scratch")}
    assert "checkpoint_stage1.pt" in finetune_logs["stage1"] and "checkpoint_last.pt" in finetune_logs["pretrained"]
    assert "--load-pretrained-slam-from" not in finetune_logs["scratch"]
    for by_split in report["probe"].values():
        for split in ("dev", "test"):
            assert 0.0 <= by_split[split]["cer"] < float("inf") and by_split[split]["utterances"] == 4
    assert report["pretraining"]["pair_ctc_loss"][0] is not None
    # two runs at a time: the wall clock counts each pair once, not as the sum of its runs
    timings = dict(report["timings"])
    wall = timings.pop("total (wall clock)")
    pairs = [("finetune_asr_pretrained_seed1", "finetune_asr_stage1_seed1"),
             ("decode_asr_pretrained_seed1_beam", "decode_asr_pretrained_seed1_joint")]
    overlap = sum(min(timings[a], timings[b]) for a, b in pairs)
    assert wall <= sum(timings.values()) - overlap + 0.2
    # the decoders' options: beam search (10) blocks repeated 2-grams with no length bonus; lexicon
    # search reads the train transcripts
    beam_command = (work / "logs" / "decode_asr_pretrained_seed1_beam.log").read_text().splitlines()[0]
    assert "--ctc-decoding none" in beam_command and "--no-repeat-ngram-size 2" in beam_command
    assert "--beam 10" in beam_command and "--lenpen 0.0" in beam_command
    lexicon_log = (work / "logs" / "decode_asr_pretrained_seed1_lexicon.log").read_text()
    assert f"--lexicon-text {work / 'data' / 'asr' / 'train_asr.tsv'}" in lexicon_log.splitlines()[0]
    assert "CTC lexicon beam search" in lexicon_log and "beam 64" in lexicon_log
    markdown = (work / "report.md").read_text()
    assert "| pretrained | joint |" in markdown and "log_mel_stack4" in markdown
    # the pre-trained init against each other init, per decoder, from the same generate outputs
    for other in ("stage1", "scratch"):
        assert f"## pretrained against {other}: paired bootstrap over the {len(test_rows)} utterances" in markdown
        for decoder in ("beam", "joint", "greedy", "lexicon"):
            compared = report["significance"][other][decoder]
            assert compared["wer_a"] == pytest.approx(report["asr"]["pretrained"]["1"][decoder]["wer"], abs=0.01)
            assert compared["wer_b"] == pytest.approx(report["asr"][other]["1"][decoder]["wer"], abs=0.01)
            assert compared["utterances"] == len(test_rows) and 0.0 <= compared["p_not_better"] <= 1.0
