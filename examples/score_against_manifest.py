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
row (give ``--partial`` to score the rows that are there). With ``--nbest N`` the first (best)
hypothesis of each row is scored; for ``--gen-subset a,b`` give both manifests, in that order.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from slam_formats.manifest import TSV_DIALECT

__all__ = ["hypotheses", "dictionary_references", "manifest_references", "score", "main"]


def _lines(path: Path, prefix: str, field: int) -> Dict[int, str]:
    """Row index -> ``field`` of the first ``<prefix>-<index>`` line (with ``--nbest`` N, fairseq
    prints the best hypothesis first)."""
    found: Dict[int, str] = {}
    pattern = re.compile(rf"^{prefix}-(\d+)\t")
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            match = pattern.match(line)
            if match:
                fields = line.rstrip("\n").split("\t")
                found.setdefault(int(match.group(1)), fields[field] if len(fields) > field else "")
    return found


def hypotheses(generate_output: Path) -> Dict[int, str]:
    """Row index -> detokenized hypothesis (``D-<index>\\tscore\\ttext``)."""
    return _lines(generate_output, "D", 2)


def dictionary_references(generate_output: Path) -> Dict[int, str]:
    """Row index -> the reference as fairseq printed it (``T-<index>\\ttext``)."""
    return _lines(generate_output, "T", 1)


def manifest_references(manifests: Sequence[Path]) -> List[str]:
    """``tgt_text`` of every row of the manifests, in order (``--gen-subset a,b`` numbers the rows
    of ``a`` then ``b``)."""
    references: List[str] = []
    for manifest in manifests:
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, **TSV_DIALECT)
            if "tgt_text" not in (reader.fieldnames or []):
                raise ValueError(f"{manifest}: no tgt_text column (header {reader.fieldnames})")
            references += [row["tgt_text"] or "" for row in reader]
    return references


def score(hypotheses: List[str], references: List[str], metric: str, *, sacrebleu_tokenizer: str = "13a",
          wer_tokenizer: str = "13a", lowercase: bool = False, remove_punct: bool = False,
          char_level: bool = False) -> str:
    """sacreBLEU's corpus BLEU line, or ``WER: x`` counted as fairseq's ``wer`` scorer counts it
    with the same options (its tokenizer, then edit distance over words or characters)."""
    if metric == "bleu":
        import sacrebleu

        return str(sacrebleu.corpus_bleu(hypotheses, [references], tokenize=sacrebleu_tokenizer))
    import editdistance
    from fairseq.scoring.tokenizer import EvaluationTokenizer

    tokenizer = EvaluationTokenizer(tokenizer_type=wer_tokenizer, lowercase=lowercase,
                                    punctuation_removal=remove_punct, character_tokenization=char_level)
    errors = units = 0
    for hypothesis, reference in zip(hypotheses, references):
        reference_units = tokenizer.tokenize(reference).split()
        errors += editdistance.eval(tokenizer.tokenize(hypothesis).split(), reference_units)
        units += len(reference_units)
    unit = "characters" if char_level else "words"
    return f"WER: {100.0 * errors / max(units, 1):.2f} ({errors} errors, {units} reference {unit})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("generate_output", type=Path, help="fairseq-generate's output (generate-<subset>.txt)")
    parser.add_argument("manifests", type=Path, nargs="+",
                        help="the manifest(s) of the decoded subset(s) (<subset>.tsv), in --gen-subset order")
    parser.add_argument("--metric", choices=("bleu", "wer"), default="bleu")
    parser.add_argument("--sacrebleu-tokenizer", default="13a", help="sacreBLEU's tokenize (zh, ja-mecab, ...)")
    parser.add_argument("--wer-tokenizer", default="13a",
                        help="as fairseq's --wer-tokenizer (its default is none; this repository's recipes give 13a)")
    parser.add_argument("--wer-lowercase", action="store_true")
    parser.add_argument("--wer-remove-punct", action="store_true")
    parser.add_argument("--wer-char-level", action="store_true")
    parser.add_argument("--partial", action="store_true", help="score the rows decoded, when some were not")
    args = parser.parse_args(argv)
    decoded = hypotheses(args.generate_output)
    references = manifest_references(args.manifests)
    named = " + ".join(str(manifest) for manifest in args.manifests)
    if not decoded:
        raise SystemExit(f"{args.generate_output}: no D-<index> lines (not fairseq-generate's output?)")
    outside = sorted(index for index in decoded if index >= len(references))
    if outside:
        raise SystemExit(f"{args.generate_output}: row {outside[0]} decoded, but {named} hold {len(references)} "
                         f"rows: not the manifest(s) decoded (for --gen-subset a,b give both, in that order)")
    missing = len(references) - len(decoded)
    if missing and not args.partial:
        raise SystemExit(f"{args.generate_output}: {len(decoded)} of the {len(references)} rows of {named} "
                         f"were decoded (too long for --max-source-positions? left out by the batch multiple?); "
                         f"--partial scores those")
    order = sorted(decoded)
    printed = dictionary_references(args.generate_output)
    changed = sum(1 for index in order if index in printed and printed[index] != references[index])
    print(f"{len(order)} rows of {named}; {changed} of fairseq's printed references differ from the "
          f"manifest's (characters the dictionary lacks, tokenization)")
    if order and changed > len(order) // 2:
        print(f"WARNING: most printed references differ from the manifest's: is {named} the decoded subset?")
    print(score([decoded[index] for index in order], [references[index] for index in order], args.metric,
                sacrebleu_tokenizer=args.sacrebleu_tokenizer, wer_tokenizer=args.wer_tokenizer,
                lowercase=args.wer_lowercase, remove_punct=args.wer_remove_punct, char_level=args.wer_char_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
