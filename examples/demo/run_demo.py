"""The main job end to end on a synthesized corpus: prepare, pre-train (2 stages), fine-tune ST and
ASR from the pre-trained encoder and from scratch (same budget, several seeds), decode, score, report.

Every stage is the command a user would run (the corpus builder, ``manifests/*.py``,
``fairseq-train``, ``fairseq-generate``); this script only strings them together, shows progress,
and writes ``report.md`` / ``report.json`` / ``losses.png`` into ``--work``. A stage that finished
leaves ``logs/<stage>.done`` and is skipped by the next run, so an interrupted run resumes (use a
new ``--work`` after changing the size or the seeds).

    python examples/demo/run_demo.py --work demo_work            # about 24 minutes on 2 CPU cores
    python examples/demo/run_demo.py --work /tmp/ci --size ci    # a few minutes (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
USER_DIR = str(REPO / "slam_fairseq")
# fairseq-train / fairseq-generate of this Python (not whichever the PATH finds first)
FAIRSEQ_TRAIN = [sys.executable, "-m", "fairseq_cli.train"]
FAIRSEQ_GENERATE = [sys.executable, "-m", "fairseq_cli.generate"]
_PROGRESS_LINE = re.compile(r"\| (train_inner|valid) \||stage 2 starts|BLEU|WER")
_SHOWN_KEYS = ("num_updates", "stage", "loss", "span_masking_loss", "msm_mlm_loss", "tlm_text_loss",
               "tlm_speech_loss", "stm_accuracy", "pair_ctc_loss", "code_perplexity", "nll_loss", "ctc_loss",
               "valid_loss", "ups")


def progress_line(line: str) -> str:
    """A short form of a fairseq progress line: the figures that tell how training goes."""
    match = re.search(r"\| (train_inner|valid) \| (\{.*\})", line)
    if not match:
        return line.rstrip()[-160:]
    record = json.loads(match.group(2))
    figures = " ".join(f"{key}={record[key]}" for key in _SHOWN_KEYS if key in record)
    return f"{match.group(1)}: {figures}"


@dataclass
class Budget:
    """Sizes and update counts of one demo size; the fine-tuning budget is equal for both inits."""

    corpus_size: str
    pretrain_stage1_updates: int
    pretrain_stage2_updates: int
    finetune_updates: int
    seeds: List[int]
    # the encoder stays frozen for this share of every fine-tuning run (both inits): a decoder that
    # cannot yet read its input otherwise drags the encoder output to a constant, erasing what
    # pre-training learned before the decoder can use it (2/3 beat 1/2 and 1 on the ST dev set)
    freeze_encoder_fraction: float = 2 / 3
    text_vocab_size: int = 1000
    target_vocab_size: int = 400
    max_tokens: int = 12000
    encoder_args: List[str] = field(default_factory=lambda: [
        "--encoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256", "--encoder-attention-heads", "4",
        "--speech-encoder-layers", "3", "--multimodal-encoder-layers", "3",
        "--subsampling-conv-channels", "32"])


BUDGETS: Dict[str, Budget] = {
    "demo": Budget("demo", pretrain_stage1_updates=40, pretrain_stage2_updates=300, finetune_updates=300,
                   seeds=[1, 2]),
    "ci": Budget("ci", pretrain_stage1_updates=6, pretrain_stage2_updates=6, finetune_updates=8, seeds=[1],
                 text_vocab_size=200, target_vocab_size=120, max_tokens=6000,
                 encoder_args=["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                               "--encoder-attention-heads", "2", "--speech-encoder-layers", "1",
                               "--multimodal-encoder-layers", "1", "--subsampling-conv-channels", "8"]),
}


class Demo:
    """Runs the stages in order, each a subprocess whose whole output goes to ``work/logs``."""

    def __init__(self, work: Path, budget: Budget, workers: int, threads: int) -> None:
        self.work = work
        self.budget = budget
        self.workers = workers
        self.threads = threads
        self.started = time.time()
        self.timings: Dict[str, float] = {}
        (work / "logs").mkdir(parents=True, exist_ok=True)

    # -- plumbing -------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        elapsed = time.time() - self.started
        print(f"[demo {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}", flush=True)

    def _skip(self, name: str, marker: Path) -> None:
        """A finished stage: keep the seconds it took (written in its marker) for the report."""
        self.say(f"{name}: {marker.relative_to(self.work)} exists: skipping")
        try:
            self.timings[name] = float(marker.read_text(encoding="utf-8"))
        except ValueError:
            pass

    def run(self, name: str, command: List[str]) -> str:
        """Run one command, echo its progress lines, keep its full log; fail loudly on error."""
        log_path = self.work / "logs" / f"{name}.log"
        marker = self.work / "logs" / f"{name}.done"
        if marker.exists() and log_path.exists():
            self._skip(name, marker)
            return log_path.read_text(encoding="utf-8")
        self.say(f"{name}: {' '.join(command[:3])} ... (log: {log_path})")
        environment = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONUNBUFFERED="1")
        start = time.time()
        lines: List[str] = []
        with open(log_path, "w", encoding="utf-8") as log:
            log.write(" ".join(command) + "\n")
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       cwd=REPO, env=environment)
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if _PROGRESS_LINE.search(line):
                    print("    " + progress_line(line), flush=True)
            code = process.wait()
        self.timings[name] = round(time.time() - start, 1)
        if code != 0:
            tail = "".join(lines[-30:])
            raise SystemExit(f"[demo] stage {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
        marker.write_text(str(self.timings[name]), encoding="utf-8")
        return "".join(lines)

    def run_parallel(self, jobs: List[tuple]) -> None:
        """Run several (name, command) jobs at once, the torch threads shared out between them;
        small models train faster as two single-threaded processes than as one two-threaded one."""
        threads = max(1, self.threads // len(jobs))
        pending = []
        for name, command in jobs:
            log_path, marker = self.work / "logs" / f"{name}.log", self.work / "logs" / f"{name}.done"
            if marker.exists() and log_path.exists():
                self._skip(name, marker)
                continue
            self.say(f"{name}: {' '.join(command[:3])} ... (log: {log_path}, {threads} thread(s))")
            log = open(log_path, "w", encoding="utf-8")
            log.write(" ".join(command) + "\n")
            log.flush()
            environment = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environment)
            pending.append((name, process, log, log_path, marker, time.time()))
        shown: Dict[str, int] = {}
        while pending:
            time.sleep(2)
            for job in list(pending):
                name, process, log, log_path, marker, start = job
                lines = log_path.read_text(encoding="utf-8").splitlines()
                for line in lines[shown.get(name, 0):]:
                    if _PROGRESS_LINE.search(line):
                        print(f"    [{name}] " + progress_line(line), flush=True)
                shown[name] = len(lines)
                if process.poll() is not None:
                    log.close()
                    pending.remove(job)
                    self.timings[name] = round(time.time() - start, 1)
                    if process.returncode != 0:
                        for other in pending:
                            other[1].kill()
                        raise SystemExit(f"[demo] stage {name} failed (exit {process.returncode}); last lines "
                                         f"of {log_path}:\n" + "\n".join(lines[-30:]))
                    marker.write_text(str(self.timings[name]), encoding="utf-8")

    # -- stages ---------------------------------------------------------------------------------
    def build_corpus(self) -> Path:
        corpus = self.work / "corpus"
        self.run("corpus", [sys.executable, "examples/demo/build_corpus.py", "--out", str(corpus),
                            "--size", self.budget.corpus_size, "--workers", str(self.workers)])
        return corpus

    def prepare(self, corpus: Path) -> None:
        """The same manifest scripts a user runs on the real corpora."""
        data = self.work / "data"
        pretrain, pairs_en, asr, st = (data / name for name in ("pretrain", "pairs_en", "asr", "st"))
        common = ["--workers", str(self.workers), "--no-progress"]
        python = sys.executable
        self.run("prep_librilight", [python, "manifests/prep_librilight.py", "--root", str(corpus / "LibriLight"),
                                     "--splits", ".:train", "--out", str(pretrain), *common])
        self.run("prep_pairs_en", [python, "manifests/prep_librispeech.py", "--root", str(corpus / "LibriSpeech"),
                                   "--splits", "train-clean-360:train", "dev-clean:valid", "--outputs", "pair",
                                   "--out", str(pairs_en), *common])
        self.run("prep_covost2", [python, "manifests/prep_covost2.py", "--root", str(corpus / "CoVoST" / "es"),
                                  "--outputs", "st", "pair", "--out", str(st),
                                  "--vocab-size", str(self.budget.target_vocab_size), "--allow-smaller-vocab", *common])
        # pre-training pairs: English LibriSpeech transcripts + Spanish Common Voice transcripts (mSLAM)
        self.run("merge_pairs", [python, "manifests/merge_manifests.py", "--inputs", str(pairs_en / "pair_train.tsv"),
                                 str(st / "pair_train_es.tsv"), "--out", str(pretrain / "pair_train.tsv")])
        self.run("merge_valid_pairs", [python, "manifests/merge_manifests.py", "--inputs",
                                       str(pairs_en / "pair_valid.tsv"), "--out", str(pretrain / "pair_valid.tsv")])
        self.run("prep_text", [python, "manifests/prep_text.py", "--inputs",
                               str(corpus / "librispeech-lm-norm.txt"), str(corpus / "mc4-es.json.gz"),
                               "--out", str(pretrain), "--vocab-size", str(self.budget.text_vocab_size),
                               "--allow-smaller-vocab", "--pair-manifests", str(pretrain / "pair_train.tsv")])
        self.run("prep_asr", [python, "manifests/prep_librispeech.py", "--root", str(corpus / "LibriSpeech"),
                              "--splits", "train-clean-100:train", "dev-clean:dev", "test-clean:test",
                              "--outputs", "asr", "--vocab-size", str(self.budget.target_vocab_size),
                              "--allow-smaller-vocab", "--out", str(asr), *common])

    def pretrain(self) -> Path:
        budget = self.budget
        save_dir = self.work / "checkpoints" / "pretrain"
        checkpoint = save_dir / "checkpoint_last.pt"
        total = budget.pretrain_stage1_updates + budget.pretrain_stage2_updates
        self.run("pretrain", [
            *FAIRSEQ_TRAIN, str(self.work / "data" / "pretrain"), "--user-dir", USER_DIR,
            "--task", "slam_pretraining", "--criterion", "slam_multitask", "--arch", "slam_tiny",
            *budget.encoder_args, *PRETRAIN_OBJECTIVE_ARGS,
            "--stage2-start-update", str(budget.pretrain_stage1_updates), "--max-update", str(total),
            "--max-tokens", str(budget.max_tokens), "--max-tokens-text", str(budget.max_tokens // 2),
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--clip-norm", "10",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(total // 5, 1)),
            "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--save-interval-updates", str(total),
            "--keep-interval-updates", "1", "--valid-subset", "valid", "--validate-interval-updates",
            str(total), "--disable-validation", *self._fairseq_common(seed=1, updates=total)])
        return checkpoint

    def _fairseq_common(self, seed: int, updates: int) -> List[str]:
        log_interval = max(1, updates // 30)  # about 30 points per loss curve
        return ["--cpu", "--seed", str(seed), "--num-workers", "0", "--required-batch-size-multiple", "1",
                "--log-format", "json", "--log-interval", str(log_interval), "--no-progress-bar"]

    def finetune_command(self, kind: str, init: str, seed: int, pretrained: Optional[Path]):
        """One fine-tuning run's (name, command, checkpoint); ``kind`` is "st" or "asr", ``init``
        "pretrained" or "scratch"; both inits get the same recipe and number of updates."""
        budget = self.budget
        name = f"{kind}_{init}_seed{seed}"
        save_dir = self.work / "checkpoints" / name
        data, config, train, valid = FINETUNE_DATA[kind]
        command = [
            *FAIRSEQ_TRAIN, str(self.work / "data" / data), "--user-dir", USER_DIR,
            "--task", "speech_to_text", "--config-yaml", config, "--train-subset", train,
            "--valid-subset", valid, "--arch", "slam_s2t_tiny", *budget.encoder_args, *DECODER_ARGS,
            *FINETUNE_CRITERION[kind],
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "2e-3", "--clip-norm", "10",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(budget.finetune_updates // 10, 1)),
            "--freeze-encoder-updates", str(int(budget.finetune_updates * budget.freeze_encoder_fraction)),
            "--max-update", str(budget.finetune_updates), "--max-tokens", str(budget.max_tokens),
            "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--disable-validation",
            *self._fairseq_common(seed, budget.finetune_updates)]
        if init == "pretrained":
            assert pretrained is not None
            command += ["--load-pretrained-slam-from", str(pretrained)]
        return f"finetune_{name}", command, save_dir / "checkpoint_last.pt"

    def decode(self, kind: str, name: str, checkpoint: Path) -> float:
        """fairseq-generate at beam 5 on the held-out test set; returns BLEU (st) or WER (asr)."""
        data, config, _, _ = FINETUNE_DATA[kind]
        subset = "test_st_es_en" if kind == "st" else "test_asr"
        scoring = ["--scoring", "sacrebleu"] if kind == "st" else [
            "--scoring", "wer", "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct"]
        output = self.run(f"decode_{name}", [
            *FAIRSEQ_GENERATE, str(self.work / "data" / data), "--user-dir", USER_DIR,
            "--task", "speech_to_text", "--config-yaml", config, "--gen-subset", subset,
            "--path", str(checkpoint), "--beam", "5", "--max-tokens", "50000", "--cpu",
            "--required-batch-size-multiple", "1", "--num-workers", "0", *scoring])
        (self.work / "generate").mkdir(exist_ok=True)
        (self.work / "generate" / f"{name}.txt").write_text(output, encoding="utf-8")
        return parse_score(output, kind)


# MSM targets from the normalized log-Mel frames through a frozen random-projection quantizer: at
# this scale a learned Gumbel quantizer on the learned subsampling output collapses to one code
# mSLAM's CTC on the speech of pairs, spelled in characters and weighted up: the demo's few hundred
# updates are otherwise spent on the blank-only plateau and the encoder learns no phonetics
PRETRAIN_OBJECTIVE_ARGS: List[str] = ["--quantizer-codebook-size", "64", "--quantizer-input", "features",
                                      "--quantizer-type", "random_projection",
                                      "--pair-ctc", "--pair-ctc-units", "characters", "--pair-ctc-weight", "10"]
DECODER_ARGS = ["--decoder-embed-dim", "128", "--decoder-ffn-embed-dim", "256", "--decoder-layers", "2",
                "--decoder-attention-heads", "4"]
# ASR adds mSLAM's CTC loss on the encoder (fairseq's criterion); both inits get the same recipe
FINETUNE_CRITERION = {
    "st": ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
    "asr": ["--criterion", "label_smoothed_cross_entropy_with_ctc", "--label-smoothing", "0.1",
            "--ctc-weight", "0.3"],
}
FINETUNE_DATA = {
    "st": ("st", "config_st_es_en.yaml", "train_st_es_en", "dev_st_es_en"),
    "asr": ("asr", "config_asr.yaml", "train_asr", "dev_asr"),
}
_BLEU = re.compile(r"BLEU = ([0-9.]+)")
_WER = re.compile(r"WER: ([0-9.]+)")


def parse_score(output: str, kind: str) -> float:
    """The BLEU (st) or WER (asr) that fairseq-generate printed last."""
    matches = (_BLEU if kind == "st" else _WER).findall(output)
    if not matches:
        raise SystemExit(f"[demo] no {'BLEU' if kind == 'st' else 'WER'} line in fairseq-generate's output")
    return float(matches[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="demo_work", help="output folder (corpus, data, checkpoints, report)")
    parser.add_argument("--size", choices=sorted(BUDGETS), default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: the size's)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="data-preparation workers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per run")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import distinct_hypotheses, first_and_last, plot_losses, read_train_log, summarize, write_markdown

    budget = BUDGETS[args.size]
    if args.seeds:
        budget.seeds = args.seeds
    work = Path(args.work).resolve()
    demo = Demo(work, budget, args.workers, args.threads)
    demo.say(f"SLAM demo ({args.size}): corpus -> manifests -> pre-training (2 stages) -> ST + ASR "
             f"fine-tuning, pre-trained vs scratch, seeds {budget.seeds} -> decoding -> report in {work}")
    corpus = demo.build_corpus()
    demo.prepare(corpus)
    pretrained = demo.pretrain()
    scores: Dict[str, Dict[str, Dict[int, float]]] = {}
    for kind in ("st", "asr"):
        for seed in budget.seeds:
            runs = {init: demo.finetune_command(kind, init, seed, pretrained if init == "pretrained" else None)
                    for init in ("pretrained", "scratch")}
            demo.run_parallel([(name, command) for name, command, _ in runs.values()])
            for init, (_, _, checkpoint) in runs.items():
                score = demo.decode(kind, f"{kind}_{init}_seed{seed}", checkpoint)
                scores.setdefault(kind, {}).setdefault(init, {})[seed] = score
                demo.say(f"{kind} {init} seed {seed}: {'BLEU' if kind == 'st' else 'WER'} {score:.2f}")
    summary = summarize(scores)
    distinct = {kind: {init: {seed: distinct_hypotheses(
        (work / "generate" / f"{kind}_{init}_seed{seed}.txt").read_text(encoding="utf-8")) for seed in by_seed}
        for init, by_seed in by_init.items()} for kind, by_init in scores.items()}
    pretrain_log = work / "logs" / "pretrain.log"
    records = read_train_log(pretrain_log)
    keys = ["span_masking_loss", "msm_contrastive_loss", "msm_mlm_loss", "tlm_text_loss", "tlm_speech_loss",
            "stm_loss", "stm_accuracy", "pair_ctc_loss", "code_perplexity"]
    changes = {key: first_and_last(records, key) for key in keys}
    finetune_logs = {path.stem.replace("finetune_", ""): path for path in (work / "logs").glob("finetune_*.log")}
    plot_losses(pretrain_log, finetune_logs, budget.pretrain_stage1_updates, work / "losses.png")
    demo.timings["total"] = round(time.time() - demo.started, 1)
    command = "python examples/demo/run_demo.py " + " ".join(sys.argv[1:])
    report = write_markdown(work / "report.md", scores, summary, changes, demo.timings, command, distinct)
    (work / "report.json").write_text(json.dumps(
        {"scores": scores, "summary": summary, "distinct_hypotheses": distinct, "pretraining": changes,
         "timings": demo.timings, "budget": asdict(budget)}, indent=2), encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
