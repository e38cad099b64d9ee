#!/usr/bin/env python3
"""Speed and WER of ``fairseq-generate --task slam_speech_to_text --ctc-decoding none|greedy|joint|lexicon``.

A ``slam_s2t_tiny`` with a CTC head (``--criterion label_smoothed_cross_entropy_with_ctc
--ctc-weight 0.5``) is trained by ``fairseq-train`` until it overfits the six espeak-ng sentences of
``tests/s2t_fixtures.py``, spoken at several speeds (``--speeds``); the same set is then decoded with
fairseq's beam search (none), best-path CTC (greedy), joint CTC/attention beam search (joint,
``--ctc-decoding-weight``) and CTC beam search over the lexicon of the training transcripts
(lexicon, ``--lexicon-text`` the train manifest, default weights), interleaved (none greedy joint
lexicon none ...) ``--repeats`` times. We report
the sentences/second that fairseq-generate prints ("Translated N sentences ... (Y sentences/s"),
generation time only, model loading excluded: the median and the best of the repeats, and the WER.

    python benchmarks/bench_ctc_decoding.py --threads 1
    python benchmarks/bench_ctc_decoding.py --threads 1 --repeats 5 --work-dir /tmp/bench_ctc   # keeps the model
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

USER_DIR = REPO_ROOT / "slam_fairseq"
MODES = ("none", "greedy", "joint", "lexicon")
_TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s")
_WER = re.compile(r"Generate \S+ with beam=\d+: WER: ([0-9.]+)")
_THREADS: Dict[str, str] = {}


def _run(module: str, *args: str) -> str:
    env = dict(os.environ, **_THREADS)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO_ROOT))
    if result.returncode != 0:
        raise SystemExit(f"{module} {' '.join(map(str, args))} failed:\n{result.stdout[-4000:]}")
    return result.stdout


def _common(data: Path, task_name: str) -> List[str]:
    return [str(data), "--user-dir", str(USER_DIR), "--task", "slam_speech_to_text", "--config-yaml",
            f"config_{task_name}.yaml", "--num-workers", "0", "--required-batch-size-multiple", "1",
            "--max-tokens", "4000"]


def build_model(work: Path, speeds: List[int], updates: int) -> tuple:
    """(data dir, task name, checkpoint, utterances): espeak-ng ASR data and the overfit model."""
    from s2t_fixtures import build_asr, synthesize_features

    data, checkpoint = work / "asr", work / "checkpoints" / "checkpoint_last.pt"
    features = synthesize_features(work, speeds=speeds)
    task_name = build_asr(data, features, specaugment=False)
    if not checkpoint.exists():
        _run("fairseq_cli.train", *_common(data, task_name), "--train-subset", f"train_{task_name}",
             "--valid-subset", f"train_{task_name}", "--disable-validation", "--save-dir", str(checkpoint.parent),
             "--no-epoch-checkpoints", "--save-interval", "1000", "--arch", "slam_s2t_tiny",
             "--criterion", "label_smoothed_cross_entropy_with_ctc", "--ctc-weight", "0.5", "--label-smoothing",
             "0.0", "--dropout", "0.0", "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", "10", "--clip-norm", "5", "--max-update", str(updates), "--seed", "1")
    return data, task_name, checkpoint, len(features)


def decode(data: Path, task_name: str, checkpoint: Path, mode: str, args: argparse.Namespace,
           utterances: int) -> Dict[str, float]:
    lexicon = ["--lexicon-text", str(data / f"train_{task_name}.tsv")] if mode == "lexicon" else []
    log = _run("fairseq_cli.generate", *_common(data, task_name), "--gen-subset", f"train_{task_name}",
               "--path", str(checkpoint), "--beam", str(args.beam), "--batch-size", str(args.batch_size),
               "--ctc-decoding", mode, "--ctc-decoding-weight", str(args.weight), *lexicon, "--scoring", "wer",
               "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct")
    translated, wer = _TRANSLATED.search(log), _WER.search(log)
    if translated is None or wer is None:
        raise SystemExit(f"no 'Translated ...' or WER line in:\n{log[-3000:]}")
    if int(translated.group(1).replace(",", "")) != utterances:
        raise SystemExit(f"fairseq-generate decoded {translated.group(1)} of {utterances} utterances")
    return {"sentences_per_second": float(translated.group(4)), "wer": float(wer.group(1)),
            "tokens": int(translated.group(2).replace(",", ""))}


def main(argv=None) -> Dict[str, Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speeds", type=int, nargs="+", default=[120, 150, 180],
                        help="espeak-ng speeds (words per minute); each speaks the six sentences")
    parser.add_argument("--updates", type=int, default=300, help="fairseq-train updates")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weight", type=float, default=0.3, help="--ctc-decoding-weight of joint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="OMP/MKL threads of every fairseq run (default: torch's)")
    parser.add_argument("--work-dir", type=Path, help="keep data and the model here (reused when present)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        _THREADS.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory(prefix="bench_ctc_decoding_") as temporary:
        work = args.work_dir or Path(temporary)
        data, task_name, checkpoint, utterances = build_model(work, args.speeds, args.updates)
        runs: Dict[str, List[Dict[str, float]]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(decode(data, task_name, checkpoint, mode, args, utterances))
    print(f"fairseq-generate --beam {args.beam} --batch-size {args.batch_size}, {utterances} utterances "
          f"(speeds {args.speeds}), slam_s2t_tiny overfit for {args.updates} updates, joint weight {args.weight}, "
          f"threads {args.threads or 'torch default'}, load average {os.getloadavg()[0]:.1f}")
    summary = {}
    for mode in MODES:
        rates = [run["sentences_per_second"] for run in runs[mode]]
        summary[mode] = {"median": statistics.median(rates), "best": max(rates), "wer": runs[mode][0]["wer"]}
        print(f"  --ctc-decoding {mode:<7}  median {summary[mode]['median']:7.1f}  best {summary[mode]['best']:7.1f} "
              f"sentences/s  WER {summary[mode]['wer']:6.2f}  tokens {runs[mode][0]['tokens']}  "
              f"(runs: {', '.join(f'{rate:.1f}' for rate in rates)})")
    return summary


if __name__ == "__main__":
    main()
