"""Is the pre-trained model's WER lower than the scratch model's beyond what the test set's size allows?

The real-speech test split is small (62 utterances), and two fine-tuning seeds of one model differ
by several WER points. A paired bootstrap over utterances says how much of a difference between two
systems decoding the same utterances could be chance: resample the utterances with replacement,
recompute both corpus WERs on each resample (the errors and reference words of the drawn
utterances summed, as fairseq's ``wer`` scorer sums them), and read the spread of the difference.

Per-utterance errors are recomputed from fairseq-generate's output (``T-`` references, ``D-``
detokenized hypotheses) with fairseq's own ``EvaluationTokenizer`` and ``editdistance``, the way
``fairseq.scoring.wer`` scores them, so their sum gives the WER that fairseq-generate printed.
Several seeds of each system are pooled utterance by utterance (errors and reference words summed
over seeds): the difference of the seeds' pooled WERs.

    python examples/realspeech/significance.py realspeech_work/generate
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["UtteranceErrors", "utterance_errors", "pool_seeds", "PairedBootstrap", "paired_bootstrap",
           "compare_generate_dir"]

# the options run_realspeech.py gives fairseq-generate's wer scorer
WER_TOKENIZER, WER_LOWERCASE, WER_REMOVE_PUNCT = "13a", True, True


@dataclass
class UtteranceErrors:
    """Word errors and reference words of each utterance, keyed by fairseq-generate's sample id."""

    errors: Dict[int, int]
    ref_words: Dict[int, int]

    def wer(self) -> float:
        return 100.0 * sum(self.errors.values()) / max(1, sum(self.ref_words.values()))


def utterance_errors(generate_output: str, tokenizer_type: str = WER_TOKENIZER, lowercase: bool = WER_LOWERCASE,
                     remove_punct: bool = WER_REMOVE_PUNCT) -> UtteranceErrors:
    """Per-utterance word errors of one fairseq-generate output (the best hypothesis of each id).

    Raises ValueError when an id has a reference and no hypothesis, or the reverse."""
    import editdistance
    from fairseq.scoring.tokenizer import EvaluationTokenizer

    tokenizer = EvaluationTokenizer(tokenizer_type=tokenizer_type, lowercase=lowercase,
                                    punctuation_removal=remove_punct, character_tokenization=False)
    references: Dict[int, str] = {}
    hypotheses: Dict[int, str] = {}
    for line in generate_output.splitlines():
        match = re.match(r"([TD])-(\d+)\t(.*)$", line)
        if match is None:
            continue
        kind, sample_id, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "T":
            references[sample_id] = rest
        elif sample_id not in hypotheses:  # the first D- line of an id is its best hypothesis
            hypotheses[sample_id] = rest.split("\t", 1)[1] if "\t" in rest else ""
    if references.keys() != hypotheses.keys():
        unmatched = sorted(references.keys() ^ hypotheses.keys())
        raise ValueError(f"{len(unmatched)} id(s) with a reference and no hypothesis or the reverse: {unmatched[:5]}")
    errors, ref_words = {}, {}
    for sample_id, reference in references.items():
        ref_items = tokenizer.tokenize(reference).split()
        errors[sample_id] = editdistance.eval(ref_items, tokenizer.tokenize(hypotheses[sample_id]).split())
        ref_words[sample_id] = len(ref_items)
    return UtteranceErrors(errors, ref_words)


def pool_seeds(runs: Sequence[UtteranceErrors]) -> UtteranceErrors:
    """Errors and reference words summed over the runs (seeds) of one system, utterance by utterance."""
    ids = set(runs[0].errors)
    if any(set(run.errors) != ids for run in runs):
        raise ValueError("the runs decoded different utterances")
    return UtteranceErrors({i: sum(run.errors[i] for run in runs) for i in ids},
                           {i: sum(run.ref_words[i] for run in runs) for i in ids})


@dataclass
class PairedBootstrap:
    """WER of systems A and B, the difference A - B (negative: A better) with its bootstrap 95 %
    interval, and ``p_not_better``: the share of resamples where A's WER is not below B's."""

    wer_a: float
    wer_b: float
    difference: float
    low: float
    high: float
    p_not_better: float
    utterances: int
    resamples: int


def paired_bootstrap(a: UtteranceErrors, b: UtteranceErrors, resamples: int = 10000,
                     seed: int = 1) -> PairedBootstrap:
    """Paired bootstrap of corpus WER over utterances (the same draws for A and B)."""
    ids = sorted(a.errors)
    if sorted(b.errors) != ids or any(a.ref_words[i] != b.ref_words[i] for i in ids):
        raise ValueError("the two systems must be scored on the same utterances and references")
    errors_a = np.array([a.errors[i] for i in ids], dtype=np.float64)
    errors_b = np.array([b.errors[i] for i in ids], dtype=np.float64)
    words = np.array([a.ref_words[i] for i in ids], dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))
    drawn_words = np.maximum(words[draws].sum(axis=1), 1.0)
    differences = 100.0 * (errors_a[draws].sum(axis=1) - errors_b[draws].sum(axis=1)) / drawn_words
    low, high = np.percentile(differences, [2.5, 97.5])
    return PairedBootstrap(wer_a=a.wer(), wer_b=b.wer(), difference=a.wer() - b.wer(), low=float(low),
                           high=float(high), p_not_better=float((differences >= 0).mean()), utterances=len(ids),
                           resamples=resamples)


def compare_generate_dir(directory: Path, system_a: str = "pretrained", system_b: str = "scratch",
                         decoders: Sequence[str] = ("lexicon", "greedy", "joint", "beam"),
                         resamples: int = 10000, suffix: str = "") -> Dict[str, PairedBootstrap]:
    """``asr_<system>_seed<N>_<decoder><suffix>.txt`` files (run_realspeech.py's ``generate/``; the
    suffix is ``_dev_asr`` for the dev split) -> decoder -> paired bootstrap of A against B, each
    pooled over the seeds both have."""
    results = {}
    for decoder in decoders:
        seeds = {}
        for system in (system_a, system_b):
            pattern = rf"asr_{re.escape(system)}_seed(\d+)_{re.escape(decoder + suffix)}\.txt"
            seeds[system] = {int(m.group(1)): path for path in directory.glob(f"asr_{system}_seed*_{decoder}{suffix}.txt")
                             if (m := re.fullmatch(pattern, path.name))}
        common = sorted(seeds[system_a].keys() & seeds[system_b].keys())
        if not common:
            continue
        pooled = [pool_seeds([utterance_errors(seeds[system][seed].read_text(encoding="utf-8")) for seed in common])
                  for system in (system_a, system_b)]
        results[decoder] = paired_bootstrap(*pooled, resamples=resamples)
    return results


def markdown_table(results: Dict[str, PairedBootstrap], system_a: str, system_b: str) -> List[str]:
    lines = [f"| decoder | {system_a} WER | {system_b} WER | difference (95 % interval) | "
             f"share of resamples where {system_a} is not better |", "| --- | --- | --- | --- | --- |"]
    for decoder, result in results.items():
        lines.append(f"| {decoder} | {result.wer_a:.2f} | {result.wer_b:.2f} | {result.difference:+.2f} "
                     f"({result.low:+.2f} .. {result.high:+.2f}) | {result.p_not_better:.3f} |")
    return lines


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generate_dir", type=Path, help="run_realspeech.py's generate/ folder")
    parser.add_argument("--system-a", default="pretrained")
    parser.add_argument("--system-b", default="scratch")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--split", choices=["test", "dev"], default="test",
                        help="the split run_realspeech.py decoded (--split)")
    args = parser.parse_args(argv)
    results = compare_generate_dir(args.generate_dir, args.system_a, args.system_b, resamples=args.resamples,
                                   suffix="" if args.split == "test" else f"_{args.split}_asr")
    if not results:
        print(f"{args.generate_dir}: no asr_{args.system_a}_seed*_<decoder> output with a matching "
              f"asr_{args.system_b}_seed* file", file=sys.stderr)
        return 2
    utterances = next(iter(results.values())).utterances
    print(f"paired bootstrap over {utterances} utterances, {args.resamples} resamples, seeds pooled")
    print("\n".join(markdown_table(results, args.system_a, args.system_b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
