"""Write a synthetic SLAM pre-training data directory (docs/data_formats.md) for speed checks.

Random log-Mel frames (float32, shape (n_frames, 80)) stored as fairseq does (an uncompressed zip of
``.npy``, referenced as ``zip:offset:length``), ``speech_<split>.tsv``, ``pair_<split>.tsv`` with
transcripts, ``text_<split>.txt``, a SentencePiece model trained on the synthetic words with its
fairseq dictionary, and ``config.yaml``. The sentences are random words over a small alphabet, so
the text side has the same shape as real text (tokens per sentence, vocabulary use) but no meaning:
the data is for timing and memory, not for learning anything.

    python benchmarks/make_synthetic_data.py OUT_DIR --speech 64 --pairs 64 --text 256 \
        --min-frames 200 --max-frames 1600 --vocab-size 1000
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from manifests.core import npy_bytes, stored_zip_entries  # noqa: E402
from manifests.data_config import speech_config, vocabulary_config, write_config  # noqa: E402
from manifests.vocabulary import train_sentencepiece  # noqa: E402
from slam_formats.manifest import write_s2t_manifest
from slam_formats.names import pair_manifest_name, speech_manifest_name

_LETTERS = "abcdefghijklmnoprstuvwy"


def random_sentences(count: int, rng: np.random.Generator, min_words: int = 4,
                     max_words: int = 20) -> List[str]:
    """``count`` sentences of random words (2 to 8 letters) drawn from a 2000-word lexicon."""
    lexicon = ["".join(rng.choice(list(_LETTERS), size=int(rng.integers(2, 9)))) for _ in range(2000)]
    return [" ".join(rng.choice(lexicon, size=int(rng.integers(min_words, max_words + 1))))
            for _ in range(count)]


def write_features(zip_path: Path, lengths: List[int], prefix: str, rng: np.random.Generator,
                   data_dir: Path) -> Dict[str, str]:
    """Random (n, 80) float32 features, one ``<id>.npy`` per utterance; id -> ``zip:offset:length``."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
        for index, length in enumerate(lengths):
            features = rng.normal(size=(length, 80)).astype(np.float32)
            archive.writestr(f"{prefix}-{index}.npy", npy_bytes(features))
    relative = zip_path.relative_to(data_dir)
    return {name[: -len(".npy")]: f"{relative}:{offset}:{length}"
            for name, (offset, length) in stored_zip_entries(zip_path).items()}


def build(out_dir: Path, num_speech: int, num_pairs: int, num_text: int, min_frames: int,
          max_frames: int, vocab_size: int, splits=("train", "valid"), seed: int = 0) -> Path:
    """Write the data directory; valid splits are a quarter the size (at least 2 of each)."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = random_sentences(max(num_text, 200) + num_pairs, rng)
    spm_model = out_dir / f"spm_unigram{vocab_size}.model"
    train_sentencepiece(corpus, spm_model, vocab_size, allow_smaller_vocab=True, num_threads=1)
    config = speech_config(out_dir)
    config.update(vocabulary_config(spm_model.name, spm_model.with_suffix(".txt").name))
    write_config(out_dir / "config.yaml", config)
    for split in splits:
        scale = 1 if split == "train" else 4
        lengths = lambda count: [int(n) for n in rng.integers(min_frames, max_frames + 1, size=max(2, count // scale))]  # noqa: E731
        speech_lengths = lengths(num_speech)
        references = write_features(out_dir / "fbank" / f"speech_{split}.zip", speech_lengths,
                                    f"{split}-speech", rng, out_dir)
        write_s2t_manifest(str(out_dir / speech_manifest_name(split)), [
            {"id": key, "audio": reference, "n_frames": n, "tgt_text": "", "speaker": "synthetic"}
            for (key, reference), n in zip(references.items(), speech_lengths)])
        pair_lengths = lengths(num_pairs)
        transcripts = random_sentences(len(pair_lengths), rng)
        references = write_features(out_dir / "fbank" / f"pair_{split}.zip", pair_lengths,
                                    f"{split}-pair", rng, out_dir)
        write_s2t_manifest(str(out_dir / pair_manifest_name(split)), [
            {"id": key, "audio": reference, "n_frames": n, "tgt_text": text, "speaker": "synthetic"}
            for (key, reference), n, text in zip(references.items(), pair_lengths, transcripts)])
        text_lines = random_sentences(max(2, num_text // scale), rng)
        (out_dir / f"text_{split}.txt").write_text("\n".join(text_lines) + "\n", encoding="utf-8")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--speech", type=int, default=64, help="speech-only utterances (train)")
    parser.add_argument("--pairs", type=int, default=64, help="speech-text pairs (train)")
    parser.add_argument("--text", type=int, default=256, help="text-only sentences (train)")
    parser.add_argument("--min-frames", type=int, default=200, help="shortest utterance, 10 ms frames")
    parser.add_argument("--max-frames", type=int, default=1600, help="longest utterance, 10 ms frames")
    parser.add_argument("--vocab-size", type=int, default=1000, help="SentencePiece vocabulary (at most)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 7 <= args.min_frames <= args.max_frames:
        parser.error(f"need 7 <= --min-frames <= --max-frames, got {args.min_frames} and {args.max_frames}")
    build(args.out_dir, args.speech, args.pairs, args.text, args.min_frames, args.max_frames,
          args.vocab_size, seed=args.seed)
    print(f"synthetic SLAM data in {args.out_dir}")


if __name__ == "__main__":
    main()
