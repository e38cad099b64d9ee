"""The main job on REAL recorded speech: build the development corpus with the shared builder,
prepare it with ``manifests/`` (Mel filters over the 8 kHz audio's real band), pre-train a small SLAM
(stage 1, then stage 2), fine-tune ASR with a CTC head from the end of stage 2, from the end of
stage 1 and from scratch (same budget, two seeds, two runs at a time), decode the test split (or,
with ``--split dev``, the dev split) four ways (beam search, joint CTC/attention, greedy CTC, CTC
beam search over the train transcripts' lexicon with their word bigrams), compare the pre-trained
init with the others by a paired bootstrap over the utterances (``significance.py``), run
the frozen-encoder linear CTC probe, and write ``report.md`` / ``report.json`` into ``--work``.

The stage machinery (logs, ``.done`` markers, resuming, fine-tuning commands, score parsing) is
the synthetic demo's (``examples/demo/run_demo.py``); this script only changes the corpus, the
manifests, the pre-training recipe and the decoders.

    python examples/realspeech/run_realspeech.py --work realspeech_work            # the full track
    python examples/realspeech/run_realspeech.py --work /tmp/rs --size ci \\
        --corpus-dir /some/corpus/in/the/layout                                   # about 2 minutes
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "examples" / "demo"))
sys.path.insert(0, str(HERE))

from report import distinct_hypotheses, first_and_last, read_train_log  # noqa: E402
from run_demo import FAIRSEQ_GENERATE, FAIRSEQ_TRAIN, USER_DIR, Budget, Demo, parse_score  # noqa: E402
from significance import PairedBootstrap, compare_generate_dir, markdown_table  # noqa: E402

DEFAULT_BUILDER = REPO.parent / "shared" / "realspeech" / "build_dev_corpus.sh"
# the four decoders of the report: fairseq's beam search (with --no-repeat-ngram-size, which
# slam_speech_to_text makes work on CPU), joint CTC/attention, best-path CTC, and CTC beam search over
# the train transcripts' lexicon with their word bigrams; the weights are the budget's
DECODERS: Dict[str, List[str]] = {
    "beam": ["--ctc-decoding", "none"],
    "joint": ["--ctc-decoding", "joint"],
    "greedy": ["--ctc-decoding", "greedy"],
    "lexicon": ["--ctc-decoding", "lexicon"],
}
# hypotheses of at most 0.25 tokens per feature frame + 10: the transcripts, in the 70 pieces of the
# full budget, use up to 0.2 (median 0.13); without a cap an untrained or looping decoder writes
# fairseq's default 200 tokens for every utterance
DECODING_LENGTH = ["--max-len-a", "0.25", "--max-len-b", "10"]


def copy_atomically(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary name, so that ``target`` is whole or absent."""
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


PRETRAINING_KEYS = ["span_masking_loss", "msm_contrastive_loss", "msm_mlm_loss", "tlm_text_loss",
                    "tlm_speech_loss", "stm_loss", "stm_accuracy", "pair_ctc_loss", "code_perplexity"]


@dataclass
class RealSpeechBudget(Budget):
    """The demo's budget plus what the real-speech recipe sets: the pre-training objectives and
    learning rate, the fine-tuning CTC weight, the joint-decoding weight and the probe's steps."""

    pretrain_objective_args: List[str] = field(default_factory=lambda: [
        "--quantizer-codebook-size", "64", "--quantizer-input", "features", "--quantizer-type",
        "random_projection", "--pair-ctc", "--pair-ctc-units", "characters", "--pair-ctc-weight", "10"])
    pretrain_lr: float = 2e-3
    pretrain_max_tokens: int = 8000
    finetune_ctc_weight: float = 0.3
    joint_decoding_weight: float = 0.5  # dev split: 0.5 ties greedy CTC, 0.3 was 4.5 WER points worse
    # dev split: fairseq's beam search loops on long prompts ("не не не ...": WER 114 / 143 for the
    # pre-trained models of run A); blocking repeated n-grams of pieces stops the loops. On run C's
    # models (seed 1 / 2, pre-trained | stage 1 | scratch): beam 5, 3-grams, lenpen 1 94.8 / 99.5 |
    # 99.1 / 100.2 | 95.7 / 101.0; beam 5, 2-grams 91.2 / 92.1 | 97.6 / 98.3 | 94.5 / 99.1; beam 10,
    # 2-grams, lenpen 0 90.2 / 90.2 | 96.9 / 95.9 | 92.8 / 98.8 (the choice). Over pieces that are
    # mostly single characters, blocking 2-grams also bounds the hypothesis: no piece pair twice.
    beam_size: int = 10
    beam_no_repeat_ngram_size: int = 2
    beam_lenpen: float = 0.0
    # dev split, pre-trained models (WER seed 1 / 2): greedy CTC 81 / 80 -> lexicon words only, LM
    # weight 1.5, word score 3, 64 prefixes 50.4 / 54.4 (beam 16: 57 / 63; OOV words at -30: 55 / 56)
    lexicon_lm_weight: float = 1.5
    lexicon_word_score: float = 3.0
    lexicon_oov_score: float = float("-inf")
    lexicon_beam: int = 64

    def decoding_options(self, decoder: str, asr_data: Path, joint_weight: Optional[float] = None) -> List[str]:
        """fairseq-generate options of one of :data:`DECODERS` with this budget's settings: the beam,
        the decoder's own flags and :data:`DECODING_LENGTH`; ``asr_data`` holds ``train_asr.tsv``
        (the lexicon's text); ``joint_weight`` replaces :attr:`joint_decoding_weight`."""
        options, beam = list(DECODERS[decoder]), 5
        if decoder == "beam":
            options += ["--no-repeat-ngram-size", str(self.beam_no_repeat_ngram_size),
                        "--lenpen", str(self.beam_lenpen)]
            beam = self.beam_size
        if decoder == "joint":
            weight = self.joint_decoding_weight if joint_weight is None else joint_weight
            options += ["--ctc-decoding-weight", str(weight)]
        if decoder == "lexicon":
            options += ["--lexicon-text", str(Path(asr_data) / "train_asr.tsv"),
                        f"--lexicon-lm-weight={self.lexicon_lm_weight}",
                        f"--lexicon-word-score={self.lexicon_word_score}",
                        f"--lexicon-oov-score={self.lexicon_oov_score}"]
            beam = self.lexicon_beam
        return ["--beam", str(beam), *options, *DECODING_LENGTH]
    probe_steps: int = 300
    probe_max_utterances: int = 0  # 0: every utterance of each split
    # the corpus is 8 kHz telephone speech upsampled to 16 kHz: Mel bins spread over 0-4 kHz, none empty
    mel_high_freq: float = 4000.0
    # fairseq's SM policy: each time mask at most 20 % of the utterance (LB's 100 frames at p = 1.0
    # can cover a whole one-word prompt)
    specaugment: str = "sm"


BUDGETS: Dict[str, RealSpeechBudget] = {
    # small batches (about 20 s of speech): on 0.3 h of speech, more updates per epoch are what take
    # CTC off its blank plateau; a target vocabulary of 70 pieces (the 64 characters and a few
    # words): 200 pieces left each too rare for CTC to learn in the budget (dev split); within 30
    # minutes on 2 cores: 500 stage-2 updates (pair CTC leaves its plateau about 200 updates in) and
    # 1200 fine-tuning updates (at 800 and 1000 the attention decoder's beam search was no better than
    # scratch's on dev)
    "full": RealSpeechBudget("full", pretrain_stage1_updates=100, pretrain_stage2_updates=500,
                             pretrain_max_tokens=2000, finetune_updates=1200, seeds=[1, 2], text_vocab_size=300,
                             target_vocab_size=70, max_tokens=2000, freeze_encoder_fraction=0.0,
                             finetune_ctc_weight=1.0, probe_steps=200),
    "ci": RealSpeechBudget("ci", pretrain_stage1_updates=4, pretrain_stage2_updates=4, finetune_updates=6,
                           seeds=[1, 2], text_vocab_size=100, target_vocab_size=100, max_tokens=6000,
                           pretrain_max_tokens=6000, probe_steps=10, probe_max_utterances=16,
                           encoder_args=["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                                         "--encoder-attention-heads", "2", "--speech-encoder-layers", "1",
                                         "--multimodal-encoder-layers", "1", "--subsampling-conv-channels", "8"]),
}


class RealSpeech(Demo):
    """The demo's stages, with the real-speech corpus, its manifests and ASR only."""

    def __init__(self, work: Path, budget: RealSpeechBudget, workers: int, threads: int) -> None:
        super().__init__(work, budget, workers, threads)
        self.budget: RealSpeechBudget = budget
        self.overlapped_seconds = 0.0

    def build_corpus(self, builder: Path, corpus_dir: Optional[Path]) -> Path:
        """The shared builder's corpus in ``work/corpus``; ``corpus_dir`` takes a built one instead."""
        if corpus_dir is not None:
            for needed in ("LibriSpeech/train-clean-100", "LibriSpeech/dev-clean", "LibriSpeech/test-clean",
                           "LibriLight", "text/lm.txt"):
                if not (corpus_dir / needed).exists():
                    raise SystemExit(f"[realspeech] --corpus-dir {corpus_dir}: {needed} is missing (expected "
                                     f"the layout of {DEFAULT_BUILDER.name})")
            return corpus_dir
        if not builder.exists():
            raise SystemExit(f"[realspeech] --builder {builder}: no such file")
        corpus = self.work / "corpus"
        self.run("corpus", ["bash", str(builder), str(corpus)])
        return corpus

    def prepare(self, corpus: Path) -> None:
        """``manifests/`` as a user runs them: unlabeled speech, pairs, text, the ASR set."""
        data = self.work / "data"
        pretrain, pairs, asr = data / "pretrain", data / "pairs", data / "asr"
        common = ["--workers", str(self.workers), "--no-progress",
                  "--mel-high-freq", str(self.budget.mel_high_freq)]
        python = sys.executable
        self.run("prep_librilight", [python, "manifests/prep_librilight.py", "--root", str(corpus / "LibriLight"),
                                     "--splits", ".:train", "--out", str(pretrain), *common])
        self.run("prep_pairs", [python, "manifests/prep_librispeech.py", "--root", str(corpus / "LibriSpeech"),
                                "--splits", "train-clean-100:train", "dev-clean:valid", "--outputs", "pair",
                                "--out", str(pairs), *common])
        self.run("merge_pairs", [python, "manifests/merge_manifests.py", "--inputs",
                                 str(pairs / "pair_train.tsv"), "--out", str(pretrain / "pair_train.tsv")])
        self.run("merge_valid_pairs", [python, "manifests/merge_manifests.py", "--inputs",
                                       str(pairs / "pair_valid.tsv"), "--out", str(pretrain / "pair_valid.tsv")])
        self.run("prep_text", [python, "manifests/prep_text.py", "--inputs", str(corpus / "text" / "lm.txt"),
                               "--out", str(pretrain), "--vocab-size", str(self.budget.text_vocab_size),
                               "--allow-smaller-vocab", "--pair-manifests", str(pretrain / "pair_train.tsv")])
        self.run("prep_asr", [python, "manifests/prep_librispeech.py", "--root", str(corpus / "LibriSpeech"),
                              "--splits", "train-clean-100:train", "dev-clean:dev", "test-clean:test",
                              "--outputs", "asr", "--vocab-size", str(self.budget.target_vocab_size),
                              "--allow-smaller-vocab", "--specaugment", self.budget.specaugment,
                              "--out", str(asr), *common])

    def pretrain(self) -> Path:
        """Stage 1, then stage 2 resumed from it: two ``fairseq-train`` runs on one save dir (fairseq
        resumes from ``checkpoint_last.pt``), the end of stage 1 kept as ``checkpoint_stage1.pt``;
        returns the end of stage 2 (``checkpoint_last.pt``)."""
        budget = self.budget
        save_dir = self.work / "checkpoints" / "pretrain"
        total = budget.pretrain_stage1_updates + budget.pretrain_stage2_updates
        self.run("pretrain_stage1", self._pretrain_command(save_dir, budget.pretrain_stage1_updates, total))
        stage1 = self.stage1_checkpoint()
        if not stage1.exists():  # checkpoint_last.pt is stage 1's until stage 2 runs
            copy_atomically(save_dir / "checkpoint_last.pt", stage1)
        self.run("pretrain_stage2", self._pretrain_command(save_dir, total, total))
        return save_dir / "checkpoint_last.pt"

    def _pretrain_command(self, save_dir: Path, max_update: int, total: int) -> List[str]:
        budget = self.budget
        return [
            *FAIRSEQ_TRAIN, str(self.work / "data" / "pretrain"), "--user-dir", USER_DIR,
            "--task", "slam_pretraining", "--criterion", "slam_multitask", "--arch", "slam_tiny",
            *budget.encoder_args, *budget.pretrain_objective_args,
            "--stage2-start-update", str(budget.pretrain_stage1_updates), "--max-update", str(max_update),
            "--max-tokens", str(budget.pretrain_max_tokens), "--max-tokens-text", str(budget.pretrain_max_tokens // 2),
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(budget.pretrain_lr),
            "--clip-norm", "10", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(total // 5, 1)),
            "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--disable-validation",
            *self._fairseq_common(seed=1, updates=total)]

    def stage1_checkpoint(self) -> Path:
        return self.work / "checkpoints" / "pretrain" / "checkpoint_stage1.pt"

    def pretrain_records(self) -> List[Dict[str, float]]:
        """The ``train_inner`` records of both pre-training stages, in order."""
        return [record for stage in ("pretrain_stage1", "pretrain_stage2")
                for record in read_train_log(self.work / "logs" / f"{stage}.log")]

    def asr_finetune(self, init: str, seed: int, pretrained: Optional[Path]):
        """The demo's ASR fine-tuning command with this budget's CTC weight; (name, command, checkpoint)."""
        name, command, checkpoint = self.finetune_command("asr", init, seed, pretrained)
        command[command.index("--ctc-weight") + 1] = str(self.budget.finetune_ctc_weight)
        if init != "pretrained" and pretrained is not None:  # the demo loads only for "pretrained"
            command += ["--load-pretrained-slam-from", str(pretrained)]
        return name, command, checkpoint

    def decode_command(self, name: str, checkpoint: Path, decoder: str, subset: str = "test_asr"):
        """fairseq-generate (``slam_speech_to_text``) on ``subset`` with one of :data:`DECODERS`;
        returns (stage name, command)."""
        run_name = f"{name}_{decoder}" + ("" if subset == "test_asr" else f"_{subset}")
        return f"decode_{run_name}", [
            *FAIRSEQ_GENERATE, str(self.work / "data" / "asr"), "--user-dir", USER_DIR,
            "--task", "slam_speech_to_text", "--config-yaml", "config_asr.yaml", "--gen-subset", subset,
            "--path", str(checkpoint), "--max-tokens", "50000", "--cpu",
            "--required-batch-size-multiple", "1", "--num-workers", "0",
            *self.budget.decoding_options(decoder, self.work / "data" / "asr"), "--scoring", "wer", "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct"]

    def decode_scores(self, stage: str) -> Dict[str, object]:
        """WER, distinct hypotheses and memorised prompts of a finished decoding stage (its log),
        which is also kept as ``generate/<name>.txt``."""
        output = (self.work / "logs" / f"{stage}.log").read_text(encoding="utf-8")
        (self.work / "generate").mkdir(exist_ok=True)
        (self.work / "generate" / f"{stage[len('decode_'):]}.txt").write_text(output, encoding="utf-8")
        return {"wer": parse_score(output, "asr"), **distinct_hypotheses(output),
                "train_prompts": count_train_prompts(output, self.train_transcripts())}

    def run_in_groups(self, jobs: List[tuple], parallel: int) -> None:
        """(name, command) jobs, ``parallel`` at a time (each group shares the torch threads); the
        seconds that runs of one group overlapped go to :attr:`overlapped_seconds`."""
        for start in range(0, len(jobs), max(1, parallel)):
            group = jobs[start:start + max(1, parallel)]
            if len(group) == 1:
                self.run(*group[0])
                continue
            self.run_parallel(group)
            seconds = [self.timings.get(name, 0.0) for name, _ in group]
            self.overlapped_seconds += sum(seconds) - max(seconds)

    def wall_seconds(self) -> float:
        """The track's wall-clock seconds from its stages' own times (so that a resumed run still
        reports what the whole track took), runs that went at once counted once."""
        return round(sum(self.timings.values()) - self.overlapped_seconds, 1)

    def train_transcripts(self) -> Set[str]:
        """The ASR train split's transcripts (what a decoder that ignores the audio writes)."""
        with open(self.work / "data" / "asr" / "train_asr.tsv", encoding="utf-8", newline="") as handle:
            return {row["tgt_text"] for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)}

    def probe(self, extractors: Dict[str, str]) -> Dict[str, Dict[str, Dict[str, float]]]:
        """The frozen-feature linear CTC probe (``probe.py``) of each extractor (name -> ``KIND[:PATH]``),
        as a subprocess."""
        output = self.work / "probe.json"
        command = [sys.executable, str(HERE / "probe.py"), "--data", str(self.work / "data" / "asr"),
                   "--out", str(output), "--steps", str(self.budget.probe_steps),
                   "--max-utterances", str(self.budget.probe_max_utterances), "--threads", str(self.threads)]
        for name, checkpoint in extractors.items():
            command += ["--extractor", f"{name}={checkpoint}"]
        self.run("probe", command)
        return json.loads(output.read_text(encoding="utf-8"))


def count_train_prompts(generate_output: str, train_transcripts: Set[str]) -> int:
    """How many of fairseq-generate's hypotheses (``D-`` lines) are, word for word, a transcript of
    the train split: a memorised prompt written whatever the audio says."""
    hypotheses = [line.split("\t", 2)[-1] for line in generate_output.splitlines() if line.startswith("D-")]
    return sum(" ".join(hypothesis.split()) in train_transcripts for hypothesis in hypotheses)


def write_markdown(path: Path, command: str, results: Dict, probe: Dict, pretraining: Dict,
                   timings: Dict[str, float], split: str = "test",
                   significance: Optional[Dict[str, Dict[str, PairedBootstrap]]] = None) -> str:
    """``report.md``: the ``split``'s WER (distinct hypotheses) per init, seed and decoder; the
    pre-trained init against each other init (paired bootstrap, ``significance.py``); the probe;
    the pre-training objectives' first and last logged values; timings."""
    seeds = sorted({seed for by_seed in results.values() for seed in by_seed})
    lines = ["# SLAM real-speech report", "", f"Command: `{command}`", "",
             f"## ASR, {split} split of the real-speech corpus: WER (distinct hypotheses / utterances; "
             "hypotheses that are a train transcript)", "",
             "| init | decoder | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "| --- | --- |" + " --- |" * len(seeds)]
    for init, by_seed in results.items():
        for decoder in DECODERS:
            cells = []
            for seed in seeds:
                cell = by_seed.get(seed, {}).get(decoder)
                cells.append("-" if cell is None else
                             f"{cell['wer']:.2f} ({cell['distinct']}/{cell['utterances']}; "
                             f"{cell['train_prompts']})")
            lines.append(f"| {init} | {decoder} | " + " | ".join(cells) + " |")
    for other, by_decoder in (significance or {}).items():
        if by_decoder:
            first = next(iter(by_decoder.values()))
            lines += ["", f"## pretrained against {other}: paired bootstrap over the {first.utterances} "
                      f"utterances ({first.resamples} resamples; seeds pooled)", ""]
            lines += markdown_table(by_decoder, "pretrained", other)
    lines += ["", "## Frozen-feature linear CTC probe (characters; greedy CER / WER)", "",
              "| features | dev CER | dev WER | test CER | test WER |", "| --- | --- | --- | --- | --- |"]
    for name, by_split in probe.items():
        dev, test = by_split.get("dev", {}), by_split.get("test", {})
        lines.append(f"| {name} | {dev.get('cer', float('nan')):.2f} | {dev.get('wer', float('nan')):.2f} | "
                     f"{test.get('cer', float('nan')):.2f} | {test.get('wer', float('nan')):.2f} |")
    lines += ["", "## Pre-training objectives (first -> last logged)", ""]
    lines += [f"- {key}: {first:.3f} -> {last:.3f}" for key, (first, last) in pretraining.items()
              if first is not None]
    lines += ["", "## Timings (seconds)", ""] + [f"- {name}: {seconds}" for name, seconds in timings.items()]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="realspeech_work", help="output folder (corpus, data, checkpoints, report)")
    parser.add_argument("--size", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--builder", type=Path, default=DEFAULT_BUILDER,
                        help=f"the corpus builder script (default {DEFAULT_BUILDER})")
    parser.add_argument("--corpus-dir", type=Path, help="an already built corpus in the builder's layout")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: the size's)")
    parser.add_argument("--inits", nargs="+", default=["pretrained", "stage1", "scratch"],
                        choices=["pretrained", "stage1", "scratch"],
                        help="fine-tuning inits; 'stage1' is the checkpoint at the end of pre-training stage 1")
    parser.add_argument("--split", choices=["test", "dev"], default="test",
                        help="split the fine-tuned models are decoded and scored on: 'dev' for choosing a "
                             "recipe (report_dev.md / .json), 'test' only to report it (default)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data-preparation workers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, shared out between the runs that go at once")
    parser.add_argument("--parallel", type=int, default=min(2, os.cpu_count() or 1),
                        help="fine-tuning and decoding runs at once (default: 2, or 1 on one core); "
                             "small models train faster as two one-thread processes than as one of two")
    parser.add_argument("--probe-finetuned", action="store_true",
                        help="also probe the fine-tuned encoders (first seed of each init); a few minutes more")
    args = parser.parse_args()

    budget = BUDGETS[args.size]
    if args.seeds:
        budget.seeds = args.seeds
    work = Path(args.work).resolve()
    track = RealSpeech(work, budget, args.workers, args.threads)
    track.say(f"SLAM real-speech track ({args.size}): corpus -> manifests -> pre-training (2 stages) -> ASR "
              f"fine-tuning {args.inits}, seeds {budget.seeds} -> 3 decoders + probe -> report in {work}")
    corpus = track.build_corpus(args.builder, args.corpus_dir.resolve() if args.corpus_dir else None)
    track.prepare(corpus)
    pretrained = track.pretrain()
    inits = {"pretrained": pretrained, "stage1": track.stage1_checkpoint(),
             "scratch": None}
    results: Dict[str, Dict[int, Dict[str, Dict[str, object]]]] = {}
    finetuned: Dict[tuple, Path] = {}
    finetuning = []
    for init in args.inits:
        for seed in budget.seeds:
            name, command, checkpoint = track.asr_finetune(init, seed, inits[init])
            finetuning.append((name, command))
            finetuned[(init, seed)] = checkpoint
    track.run_in_groups(finetuning, args.parallel)
    subset = f"{args.split}_asr"
    decoding = {(init, seed, decoder): track.decode_command(f"asr_{init}_seed{seed}", finetuned[(init, seed)],
                                                            decoder, subset)
                for init in args.inits for seed in budget.seeds for decoder in DECODERS}
    track.run_in_groups(list(decoding.values()), args.parallel)
    for (init, seed, decoder), (stage, _) in decoding.items():
        scored = track.decode_scores(stage)
        results.setdefault(init, {}).setdefault(seed, {})[decoder] = scored
        track.say(f"asr {init} seed {seed} {decoder}: WER {scored['wer']:.2f} "
                  f"({scored['distinct']}/{scored['utterances']} distinct)")
    suffix = "" if args.split == "test" else f"_{subset}"
    significance = {other: compare_generate_dir(work / "generate", "pretrained", other, decoders=list(DECODERS),
                                                suffix=suffix)
                    for other in args.inits if other != "pretrained" and "pretrained" in args.inits}
    extractors = {"slam_pretrained": f"slam:{pretrained}", "log_mel_stack4": "logmel",
                  "random_encoder": f"random:{pretrained}"}
    if "stage1" in args.inits:
        extractors["slam_stage1"] = f"slam:{track.stage1_checkpoint()}"
    if args.probe_finetuned:  # what fine-tuning left in the encoder (first seed)
        for init in args.inits:
            extractors[f"asr_{init}_seed{budget.seeds[0]}"] = f"slam:{finetuned[(init, budget.seeds[0])]}"
    probe = track.probe(extractors)
    records = track.pretrain_records()
    pretraining = {key: first_and_last(records, key) for key in PRETRAINING_KEYS}
    # the stages' own seconds, so that a resumed run still reports what the whole track took
    track.timings["total (wall clock)"] = track.wall_seconds()
    command = "python examples/realspeech/run_realspeech.py " + " ".join(sys.argv[1:])
    report_name = "report" if args.split == "test" else f"report_{args.split}"
    report = write_markdown(work / f"{report_name}.md", command, results, probe, pretraining, track.timings,
                            args.split, significance)
    (work / f"{report_name}.json").write_text(json.dumps(
        {"asr": results, "significance": {other: {decoder: asdict(result) for decoder, result in by_decoder.items()}
                                          for other, by_decoder in significance.items()},
         "probe": probe, "pretraining": pretraining, "timings": track.timings,
         "budget": asdict(budget)}, indent=2), encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
