"""A tiny stand-in for the real-speech development corpus, in the layout its builder writes
(``build_dev_corpus.sh``): LibriSpeech splits with ``.trans.txt``, the train audio again as
LibriLight, the train transcripts as ``text/lm.txt``. Speech is espeak-ng (one voice, two speeds),
so that the track's stages can run end to end in CI without downloading the package."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from english_sentences import ENGLISH  # noqa: E402
from s2t_fixtures import synthesize  # noqa: E402

SPLITS = {"train-clean-100": ENGLISH[:6], "dev-clean": ENGLISH[6:8], "test-clean": ENGLISH[8:10]}
SPEEDS = (140, 180)
SPEAKER, CHAPTER = "1", "100"


def write_fake_corpus(out: Path, splits: Dict[str, Sequence[str]] = None) -> Dict[str, List[str]]:
    """Write the corpus into ``out``; returns split -> the upper-cased transcripts written."""
    import soundfile as sf

    written: Dict[str, List[str]] = {}
    for split, sentences in (splits or SPLITS).items():
        folder = out / "LibriSpeech" / split / SPEAKER / CHAPTER
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for number, (sentence, speed) in enumerate((s, v) for s in sentences for v in SPEEDS):
            utterance_id = f"{SPEAKER}-{CHAPTER}-{number:04d}"
            audio = synthesize(sentence, speed=speed)
            sf.write(folder / f"{utterance_id}.flac", audio, 16000)
            lines.append(f"{utterance_id} {sentence.upper()}")
            if split == "train-clean-100":
                book = out / "LibriLight" / SPEAKER / CHAPTER
                book.mkdir(parents=True, exist_ok=True)
                sf.write(book / f"{utterance_id}.flac", audio, 16000)
        (folder / f"{SPEAKER}-{CHAPTER}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[split] = [line.split(" ", 1)[1] for line in lines]
    (out / "text").mkdir(parents=True, exist_ok=True)
    (out / "text" / "lm.txt").write_text("\n".join(written["train-clean-100"]) + "\n", encoding="utf-8")
    return written
