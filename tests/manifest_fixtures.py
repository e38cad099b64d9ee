"""Tiny corpora in their real layouts, for the manifest tests (real speech from espeak-ng + sox).

Each ``build_*`` function writes a tree under a directory and returns what the tests expect:
the good utterances and the bad files (name -> expected skip reason).
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `manifests` and `slam_fairseq` importable under any pytest rootdir
    sys.path.insert(0, str(REPO_ROOT))

from english_sentences import ENGLISH  # noqa: E402

SPANISH = [
    ("el perro come pan en la casa", "the dog eats bread in the house"),
    ("hoy hace mucho sol en la ciudad", "today it is very sunny in the city"),
    ("me gusta leer libros por la noche", "i like to read books at night"),
    ("la musica suena muy bien", "the music sounds very good"),
    ("vamos a la playa manana", "we are going to the beach tomorrow"),
    ("el tren llega a las cinco", "the train arrives at five"),
    ("mi hermana estudia medicina", "my sister studies medicine"),
    ("el cafe esta caliente", "the coffee is hot"),
]


def run_script(name: str, *args, env=None, check=True) -> subprocess.CompletedProcess:
    """Run ``manifests/<name>`` the way users do; returns the finished process (output captured)."""
    command = [sys.executable, str(REPO_ROOT / "manifests" / name), *map(str, args)]
    merged_env = dict(os.environ, **(env or {}))
    result = subprocess.run(command, capture_output=True, text=True, env=merged_env, cwd=str(REPO_ROOT))
    if check and result.returncode != 0:
        raise AssertionError(f"{name} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def synthesize(text: str, path: Path, rate: int = 16000, channels: int = 1, voice: str = "en") -> Path:
    """espeak-ng speech, converted by sox to ``path`` (format from its suffix) at ``rate``/``channels``."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["sox", "-t", "wav", "-", "-r", str(rate), "-c", str(channels), str(path)],
                   input=wav, check=True, capture_output=True)
    return path


def write_samples(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path


def write_bad_audio(directory: Path, name: str, kind: str, suffix: str = ".flac") -> Path:
    """A bad audio file: corrupt, empty, silent, short, stereo, 8k, truncated (give a ``.wav`` suffix)."""
    path = directory / f"{name}{suffix}"
    if kind == "corrupt":
        directory.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"fLaC" + bytes(range(256)) * 8)
    elif kind == "empty":
        directory.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    elif kind == "silent":
        write_samples(path, np.zeros(16000, dtype=np.float32))
    elif kind == "short":
        synthesize("hi", directory / "tmp_short.wav")
        import soundfile as sf

        samples, rate = sf.read(str(directory / "tmp_short.wav"))
        (directory / "tmp_short.wav").unlink()
        write_samples(path, samples[: int(0.05 * rate)], rate)
    elif kind == "stereo":
        synthesize("two channels of speech", path, channels=2)
    elif kind == "8k":
        synthesize("telephone speech at eight kilohertz", path, rate=8000)
    elif kind == "truncated":  # a WAV cut short after its header was written: the header claims more
        synthesize("a copy that stopped half way", path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        raise ValueError(kind)
    return path


def build_librispeech(root: Path) -> Dict:
    """``root/LibriSpeech/{train-clean-100,dev-clean,test-clean}/<spk>/<chapter>/*.flac`` + trans.txt.

    train-clean-100 holds 6 good utterances (one at 22.05 kHz: resampled and kept) and the bad ones.
    """
    librispeech = root / "LibriSpeech"
    good: Dict[str, Dict[str, str]] = {}
    bad: Dict[str, str] = {}
    texts = iter(ENGLISH)

    def chapter(split: str, speaker: str, chapter_id: str, count: int, start: int = 0, rates=()):
        directory = librispeech / split / speaker / chapter_id
        lines = []
        for index in range(start, start + count):
            utterance = f"{speaker}-{chapter_id}-{index:04d}"
            text = next(texts, None) or ENGLISH[index % len(ENGLISH)]
            rate = rates[index - start] if index - start < len(rates) else 16000
            synthesize(text, directory / f"{utterance}.flac", rate=rate)
            lines.append(f"{utterance} {text.upper()}")
            good[utterance] = {"split": split, "text": text.upper(), "rate": rate}
        return directory, lines

    directory, lines = chapter("train-clean-100", "19", "198", 3, rates=(16000, 22050))
    (directory / "19-198.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    directory, lines = chapter("train-clean-100", "26", "495", 3)
    # bad files, each with a transcript line so only the audio is at fault
    for index, kind in enumerate(("corrupt", "empty", "silent", "short", "stereo", "8k", "truncated"), start=10):
        utterance = f"26-495-{index:04d}"
        path = write_bad_audio(directory, utterance, kind, suffix=".wav" if kind == "truncated" else ".flac")
        lines.append(f"{utterance} SOME WORDS")
        bad[path.name] = {"corrupt": "unreadable_audio", "empty": "empty_file", "silent": "silent",
                          "short": "too_short", "stereo": "multi_channel", "8k": "low_sample_rate",
                          "truncated": "truncated_audio"}[kind]
    # audio without a transcript line
    synthesize("nobody wrote this down", directory / "26-495-0020.flac")
    bad["26-495-0020.flac"] = "missing_transcript"
    # a transcript line without audio
    lines.append("26-495-0021 A LINE WITHOUT AUDIO")
    bad["26-495-0021"] = "missing_audio"
    content = ("\n".join(lines) + "\n").encode("utf-8") + b"26-495-0022 CAF\xe9 NOT UTF8\n"
    bad["26-495.trans.txt:"] = "non_utf8_text"
    (directory / "26-495.trans.txt").write_bytes(content)

    for split, speaker, chapter_id in (("dev-clean", "84", "121"), ("test-clean", "61", "70")):
        directory, lines = chapter(split, speaker, chapter_id, 2)
        (directory / f"{speaker}-{chapter_id}.trans.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": librispeech, "good": good, "bad": bad}


def build_librilight(root: Path) -> Dict:
    """``root/small/<speaker>/<book>/*.flac`` (+ the .json metadata Libri-Light ships)."""
    small = root / "small"
    good = {}
    for speaker, book, files in (("100", "sea_fairies_0812_librivox", ("01_baum", "02_baum")),
                                 ("1001", "ten_tales_librivox", ("03_tales",))):
        for index, stem in enumerate(files):
            path = synthesize(" and ".join(ENGLISH[index:index + 3]), small / speaker / book / f"{stem}.flac")
            (path.parent / f"{stem}.json").write_text(json.dumps({"speaker": speaker}), encoding="utf-8")
            good[f"{speaker}-{book}-{stem}"] = path
    bad = {write_bad_audio(small / "1001" / "ten_tales_librivox", "04_silence", "silent").name: "silent"}
    return {"root": root, "good": good, "bad": bad}


def fortune_lines(limit: int = 400) -> List[str]:
    """Varied English text from Debian's fortunes package (tests/conftest.py checks it is installed)."""
    lines: List[str] = []
    for name in ("literature", "wisdom", "science"):
        path = Path("/usr/share/games/fortunes") / name
        if not path.is_file():
            continue
        for fortune in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(line for line in fortune.splitlines() if not line.strip().startswith("--"))
            text = " ".join("".join(c if c.isalpha() or c == "'" else " " for c in text).split())
            if text:
                lines.append(text)
    assert lines, "no fortunes found in /usr/share/games/fortunes: run scripts/install.sh"
    return lines[:limit]


def build_text(root: Path) -> Dict:
    """An LM-corpus style plain text file, an mC4-style json.gz, and a held-out file."""
    lines = fortune_lines()
    lm_lines = [line.upper() for line in lines[: len(lines) // 2]]
    lm = root / "librispeech-lm-norm.txt"
    root.mkdir(parents=True, exist_ok=True)
    lm.write_bytes(("\n".join(lm_lines) + "\n\n").encode("utf-8") + b"CAF\xe9 LATIN ONE\n")
    documents = [" ".join(lines[i:i + 2]) + "\n" + lines[i + 2] for i in range(len(lines) // 2, len(lines) - 3, 3)]
    mc4 = root / "c4-en.tfrecord-00000-of-01024.json.gz"
    with gzip.open(mc4, "wt", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps({"text": document, "url": "http://example.com"}) + "\n")
        handle.write("{not json\n")
        handle.write(json.dumps({"url": "no text field"}) + "\n")
    valid = root / "valid.txt"
    valid.write_text("\n".join(line.upper() for line in ENGLISH[:4]) + "\n", encoding="utf-8")
    num_mc4_lines = sum(len(document.split("\n")) for document in documents)
    return {"lm": lm, "mc4": mc4, "valid": valid, "lm_lines": lm_lines, "num_mc4_lines": num_mc4_lines,
            "documents": documents}


def build_covost(root: Path) -> Dict:
    """Common Voice ``root/es/clips/*.mp3`` (48 kHz) + ``covost_v2.es_en.tsv``; ``root/en`` with
    ``covost_v2.en_de.tsv`` and ``covost_v2.en_ca.tsv`` for the multilingual case."""
    header = "path\tsentence\ttranslation\tclient_id\tsplit"
    spanish = root / "es"
    rows = [header]
    splits = ["train"] * 5 + ["dev"] * 2 + ["test"]
    good = {}
    for index, ((sentence, translation), split) in enumerate(zip(SPANISH, splits)):
        clip = f"common_voice_es_{19000000 + index}.mp3"
        synthesize(sentence, spanish / "clips" / clip, rate=48000, voice="es")
        rows.append(f"{clip}\t{sentence}\t{translation}\tclient{index % 3}\t{split}")
        good[clip[:-4]] = {"split": split, "sentence": sentence, "translation": translation}
    rows.append("common_voice_es_missing.mp3\tno hay audio\tthere is no audio\tclient9\ttrain")
    synthesize("sin traduccion", spanish / "clips" / "common_voice_es_19000100.mp3", rate=48000, voice="es")
    rows.append("common_voice_es_19000100.mp3\tsin traduccion\t\tclient9\ttrain")
    (spanish / "covost_v2.es_en.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    bad = {"common_voice_es_missing.mp3": "missing_clip", "covost_v2.es_en.tsv:": "empty_translation"}

    # English: CoVoST TSVs without sentence/client_id, which Common Voice's validated.tsv holds
    english = root / "en"
    en_rows = {"de": ["path\ttranslation\tsplit"], "ca": ["path\ttranslation\tsplit"]}
    validated = ["client_id\tpath\tsentence\tup_votes"]
    for index, sentence in enumerate(ENGLISH[:6]):
        clip = f"common_voice_en_{500 + index}.mp3"
        synthesize(sentence, english / "clips" / clip, rate=48000)
        split = "train" if index < 4 else "dev"
        en_rows["de"].append(f"{clip}\tde {sentence}\t{split}")
        en_rows["ca"].append(f"{clip}\tca {sentence}\t{split}")
        validated.append(f"client{index}\t{clip}\t{sentence}\t2")
    for language, lines in en_rows.items():
        (english / f"covost_v2.en_{language}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (english / "validated.tsv").write_text("\n".join(validated) + "\n", encoding="utf-8")
    return {"root": root, "es": spanish, "en": english, "good": good, "bad": bad}


# ---------------------------------------------------------------------------------------------
# pytest fixtures (import them into a test module: `from manifest_fixtures import librispeech_tree`)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def librispeech_tree(tmp_path_factory):
    return build_librispeech(tmp_path_factory.mktemp("librispeech_corpus"))


@pytest.fixture(scope="session")
def librilight_tree(tmp_path_factory):
    return build_librilight(tmp_path_factory.mktemp("librilight_corpus"))


@pytest.fixture(scope="session")
def text_tree(tmp_path_factory):
    return build_text(tmp_path_factory.mktemp("text_corpus"))


@pytest.fixture(scope="session")
def covost_tree(tmp_path_factory):
    return build_covost(tmp_path_factory.mktemp("covost_corpus"))


def load_summary(out_dir: Path, tag: str) -> Dict:
    return json.loads((Path(out_dir) / f"summary_{tag}.json").read_text(encoding="utf-8"))


def skipped_entries(out_dir: Path, tag: str) -> List[Dict[str, str]]:
    import csv

    with open(Path(out_dir) / f"skipped_{tag}.tsv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
