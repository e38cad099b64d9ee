"""Score ``fairseq-generate`` hypotheses against the manifest's own references (sacreBLEU or WER).

fairseq's ``--scoring sacrebleu`` / ``wer`` and the ``T-`` lines of its output compare with the
reference as the target dictionary spells it: every character the dictionary lacks becomes
``<unk>`` (``افتح الناف<<unk>>ة``), which is not the reference a paper reports against. This script
reads each hypothesis (``D-<index>``, detokenized) and the ``tgt_text`` of row ``<index>`` of the
manifest that was decoded (fairseq's S2T datasets number rows in manifest order), and scores them
with sacreBLEU's corpus BLEU, or word error rate as fairseq's ``wer`` scorer counts it.

    python examples/score_against_manifest.py $SAVE/results_de/generate-test_st_en_de.txt \\
        $DATA/test_st_en_de.tsv --metric bleu
    python examples/score_against_manifest.py generate-test_clean_asr.txt $DATA/test_clean_asr.tsv \\
        --metric wer --wer-lowercase --wer-remove-punct

It says how many references the dictionary changed, and refuses output that does not decode every
row (give ``--partial`` to score the rows that are there).
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Dict, List

__all__ = ["hypotheses", "dictionary_references", "manifest_references", "score", "main"]

_TSV = dict(delimiter="\t", quotechar=None, doublequote=False, quoting=csv.QUOTE_NONE)


def _lines(path: Path, prefix: str, field: int) -> Dict[int, str]:
    found: Dict[int, str] = {}
    pattern = re.compile(rf"^{prefix}-(\d+)\t")
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            match = pattern.match(line)
            if match:
                fields = line.rstrip("\n").split("\t")
                found[int(match.group(1))] = fields[field] if len(fields) > field else ""
    return found


def hypotheses(generate_output: Path) -> Dict[int, str]:
    """Row index -> detokenized hypothesis (``D-<index>\\tscore\\ttext``)."""
    return _lines(generate_output, "D", 2)


def dictionary_references(generate_output: Path) -> Dict[int, str]:
    """Row index -> the reference as fairseq printed it (``T-<index>\\ttext``)."""
    return _lines(generate_output, "T", 1)


def manifest_references(manifest: Path) -> List[str]:
    """``tgt_text`` of every row, in order."""
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, **_TSV)
        if "tgt_text" not in (reader.fieldnames or []):
            raise ValueError(f"{manifest}: no tgt_text column (header {reader.fieldnames})")
        return [row["tgt_text"] or "" for row in reader]


def score(hypotheses: List[str], references: List[str], metric: str, lowercase: bool = False,
          remove_punct: bool = False) -> str:
    """sacreBLEU's corpus BLEU line, or ``WER: x`` counted as fairseq's ``wer`` scorer counts it
    (sacreBLEU's 13a tokenizer, then edit distance over words)."""
    if metric == "bleu":
        import sacrebleu

        return str(sacrebleu.corpus_bleu(hypotheses, [references]))
    import editdistance
    from fairseq.scoring.tokenizer import EvaluationTokenizer

    tokenizer = EvaluationTokenizer(tokenizer_type="13a", lowercase=lowercase, punctuation_removal=remove_punct)
    errors = words = 0
    for hypothesis, reference in zip(hypotheses, references):
        reference_words = tokenizer.tokenize(reference).split()
        errors += editdistance.eval(tokenizer.tokenize(hypothesis).split(), reference_words)
        words += len(reference_words)
    return f"WER: {100.0 * errors / max(words, 1):.2f} ({errors} errors, {words} reference words)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("generate_output", type=Path, help="fairseq-generate's output (generate-<subset>.txt)")
    parser.add_argument("manifest", type=Path, help="the manifest of the decoded subset (<subset>.tsv)")
    parser.add_argument("--metric", choices=("bleu", "wer"), default="bleu")
    parser.add_argument("--wer-lowercase", action="store_true")
    parser.add_argument("--wer-remove-punct", action="store_true")
    parser.add_argument("--partial", action="store_true", help="score the rows decoded, when some were not")
    args = parser.parse_args(argv)
    decoded = hypotheses(args.generate_output)
    references = manifest_references(args.manifest)
    if not decoded:
        raise SystemExit(f"{args.generate_output}: no D-<index> lines (not fairseq-generate's output?)")
    outside = sorted(index for index in decoded if index >= len(references))
    if outside:
        raise SystemExit(f"{args.generate_output}: row {outside[0]} decoded, but {args.manifest} has "
                         f"{len(references)} rows: not the manifest that was decoded")
    missing = len(references) - len(decoded)
    if missing and not args.partial:
        raise SystemExit(f"{args.generate_output}: {len(decoded)} of the {len(references)} rows of {args.manifest} "
                         f"were decoded (too long for --max-source-positions? left out by the batch multiple?); "
                         f"--partial scores those")
    order = sorted(decoded)
    printed = dictionary_references(args.generate_output)
    changed = sum(1 for index in order if index in printed and printed[index] != references[index])
    print(f"{len(order)} rows of {args.manifest}; {changed} of fairseq's printed references differ from the "
          f"manifest's (characters the dictionary lacks, tokenization)")
    print(score([decoded[index] for index in order], [references[index] for index in order], args.metric,
                args.wer_lowercase, args.wer_remove_punct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
