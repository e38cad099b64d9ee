#!/usr/bin/env python3
"""Build a small, download-free demo corpus laid out exactly like the real SLAM corpora.

Why: the manifest scripts under ``manifests/`` are written for LibriSpeech, Libri-Light, the
LibriSpeech LM corpus, mC4 and CoVoST 2. To demo (and CI-test) the whole pipeline on a CPU we
synthesize real sentences with espeak-ng (many voices, speeds and pitches) and store them in
those very layouts, so the manifest scripts run on this corpus unchanged:

    OUT/LibriSpeech/<split>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac + <spk>-<chapter>.trans.txt
    OUT/LibriLight/<spk>/<book>/*.flac                             (unlabeled, English+Spanish)
    OUT/librispeech-lm-norm.txt                                    (English text, UPPERCASE)
    OUT/mc4-es.json.gz                                             (Spanish text, JSON lines)
    OUT/CoVoST/es/clips/*.mp3 + OUT/CoVoST/es/covost_v2.es_en.tsv  (Spanish speech -> English)
    OUT/meta.json, OUT/synthesis.tsv                               (what was built, per utterance)

Held-out parts (LibriSpeech dev/test-clean, CoVoST dev/test) use sentences and espeak-ng voice
variants that appear in no training or pre-training part: all sentences are drawn once from the
grammar (held-out ones first) and partitioned; voice variants are partitioned with the seed.
Re-running with the same arguments skips finished audio and rewrites no unchanged file.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grammar  # noqa: E402

MARKER = ".slam_demo_corpus"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Fortune files with mostly plain prose (no ascii art, code, or off-colour collections).
FORTUNE_FILES = ["fortunes", "wisdom", "literature", "science", "education", "food", "pets",
                 "kids", "people", "humorists", "platitudes", "tao", "miscellaneous", "work",
                 "sports", "love", "medicine", "riddles", "magic", "goedel", "paradoxum"]

SIZES: dict[str, dict[str, int]] = {
    # The `demo` preset is sized for a ~30 minute CPU pre-train + fine-tune demo.
    "demo": dict(asr_train=250, pairs=1200, unlabeled=1500, st_train=400, dev=60, test=100,
                 text=20000, fortunes=300),
    "ci": dict(asr_train=25, pairs=120, unlabeled=150, st_train=40, dev=6, test=10,
               text=2000, fortunes=30),
}

# Human-sounding espeak-ng voice variants (robots, whispers and effects left out).
VARIANTS = [
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "adam", "Alex", "Alicia",
    "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb",
    "david", "Denis", "Diogo", "ed", "edward", "edward2", "Gene", "Gene2", "gustave",
    "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee",
    "linda", "marcelo", "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike",
    "Nguyen", "norbert", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro",
    "shelby", "steph", "steph2", "steph3", "Storm", "travis", "victor", "zac", "anika",
    "grandma", "grandpa",
]
EN_BASES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc",
            "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
ES_BASES = ["es", "es-419"]
SPEED_RANGE = (130, 190)
PITCH_RANGE = (30, 70)

LS_SPLITS = {"test": "test-clean", "dev": "dev-clean", "asr_train": "train-clean-100",
             "pairs": "train-clean-360"}
CHAPTER_BASE = {"test-clean": 10000, "dev-clean": 20000, "train-clean-100": 30000,
                "train-clean-360": 50000}
COVOST_TSV_HEADER = ["path", "sentence", "translation", "client_id", "split"]


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a fixed espeak-ng voice (accent + variant) and typical rate/pitch."""
    id: int
    lang: str
    base: str
    variant: str
    role: str  # train | dev | test
    speed: int
    pitch: int

    @property
    def voice(self) -> str:
        return f"{self.base}+{self.variant}"


@dataclass(frozen=True)
class Job:
    """One utterance to synthesize into ``path`` (relative to OUT)."""
    part: str
    path: str
    text: str
    speaker: Speaker
    speed: int
    pitch: int


# ----------------------------------------------------------------------------- voices

def _espeak_listing(arg: str) -> list[list[str]]:
    out = subprocess.run(["espeak-ng", f"--voices={arg}"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split() for line in out.splitlines()[1:] if line.strip()]


def available_variants() -> dict[str, str]:
    """Curated variant name -> gender ("M"/"F"), limited to those this espeak-ng ships.

    espeak-ng silently falls back to the default voice for an unknown variant, so we must check.
    """
    found: dict[str, str] = {}
    for row in _espeak_listing("variant"):
        if len(row) >= 5 and row[-1].startswith("!v/"):
            found[row[-1][3:]] = row[2].split("/")[-1]
    return {v: found[v] for v in VARIANTS if v in found}


def available_bases(candidates: Sequence[str], lang: str) -> list[str]:
    """Accents (non-MBROLA espeak-ng voices) of ``lang`` that this espeak-ng ships."""
    langs = {row[1] for row in _espeak_listing(lang)
             if len(row) >= 5 and not row[4].startswith("mb/")}
    bases = [b for b in candidates if b in langs]
    if not bases:
        raise RuntimeError(f"espeak-ng has no {lang} voice")
    return bases


def partition_variants(variants: dict[str, str], seed: int, heldout_frac: float
                       ) -> dict[str, list[str]]:
    """Split variants into train / dev / test, per gender so every part has both."""
    rng = random.Random(f"voices-{seed}")
    parts: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for gender in sorted(set(variants.values())):
        group = sorted(v for v, g in variants.items() if g == gender)
        rng.shuffle(group)
        k = max(2, round(heldout_frac * len(group))) if len(group) >= 4 else 0
        held, train = group[:k], group[k:]
        parts["test"] += held[0::2]
        parts["dev"] += held[1::2]
        parts["train"] += train
    if not parts["train"] or not parts["dev"] or not parts["test"]:
        raise RuntimeError(f"too few espeak-ng variants to hold some out: {sorted(variants)}")
    return {k: sorted(v) for k, v in parts.items()}


def make_speakers(parts: dict[str, list[str]], en_bases: list[str], es_bases: list[str],
                  seed: int) -> list[Speaker]:
    """One train speaker per train variant and language; two per held-out variant and language."""
    rng = random.Random(f"speakers-{seed}")
    speakers: list[Speaker] = []
    for lang, bases in (("en", en_bases), ("es", es_bases)):
        for role in ("train", "dev", "test"):
            for variant in parts[role]:
                n = 1 if role == "train" else min(2, len(bases))
                for base in rng.sample(bases, n):
                    speakers.append(Speaker(
                        id=100 + len(speakers), lang=lang, base=base, variant=variant,
                        role=role, speed=rng.randint(SPEED_RANGE[0] + 10, SPEED_RANGE[1] - 10),
                        pitch=rng.randint(PITCH_RANGE[0] + 5, PITCH_RANGE[1] - 5)))
    return speakers


def _job(part: str, path: str, text: str, spk: Speaker, rng: random.Random) -> Job:
    """Per-utterance speed/pitch jitter around the speaker's own, within the global ranges."""
    speed = min(max(spk.speed + rng.randint(-12, 12), SPEED_RANGE[0]), SPEED_RANGE[1])
    pitch = min(max(spk.pitch + rng.randint(-6, 6), PITCH_RANGE[0]), PITCH_RANGE[1])
    return Job(part, path, text, spk, speed, pitch)


def client_id(spk: Speaker) -> str:
    """Common Voice style client id (128 hex chars), stable per speaker."""
    return hashlib.sha512(f"slam-demo-speaker-{spk.id}".encode()).hexdigest()


# ----------------------------------------------------------------------------- planning

def _by_speaker(texts: Sequence[str], speakers: Sequence[Speaker], rng: random.Random
                ) -> dict[Speaker, list[str]]:
    groups: dict[Speaker, list[str]] = {}
    for text in texts:
        groups.setdefault(rng.choice(speakers), []).append(text)
    return dict(sorted(groups.items(), key=lambda kv: kv[0].id))


def plan_librispeech(split: str, sentences: Sequence[str], speakers: Sequence[Speaker],
                     rng: random.Random, per_chapter: int = 25
                     ) -> tuple[list[Job], dict[str, str]]:
    """LibriSpeech split: chapters of <= per_chapter utterances, one trans.txt per chapter."""
    jobs: list[Job] = []
    trans: dict[str, str] = {}
    chapter = CHAPTER_BASE[split]
    for spk, texts in _by_speaker(sentences, speakers, rng).items():
        for start in range(0, len(texts), per_chapter):
            chapter += 1
            d = f"LibriSpeech/{split}/{spk.id}/{chapter}"
            lines = []
            for k, text in enumerate(texts[start:start + per_chapter]):
                uid = f"{spk.id}-{chapter}-{k:04d}"
                jobs.append(_job(f"LibriSpeech/{split}", f"{d}/{uid}.flac", text, spk, rng))
                lines.append(f"{uid} {grammar.to_transcript(text)}\n")
            trans[f"{d}/{spk.id}-{chapter}.trans.txt"] = "".join(lines)
    return jobs, trans


def plan_librilight(texts_by_lang: dict[str, Sequence[str]], speakers: Sequence[Speaker],
                    rng: random.Random, per_book: int = 20) -> list[Job]:
    """Libri-Light: <speaker>/<book>/<file>.flac, no transcripts."""
    jobs: list[Job] = []
    book = 0
    for lang, texts in texts_by_lang.items():
        spks = [s for s in speakers if s.lang == lang and s.role == "train"]
        for spk, group in _by_speaker(texts, spks, rng).items():
            for start in range(0, len(group), per_book):
                book += 1
                d = f"LibriLight/{spk.id}/book_{book:04d}"
                for k, text in enumerate(group[start:start + per_book]):
                    jobs.append(_job("LibriLight", f"{d}/{spk.id}_{book:04d}_{k:04d}.flac",
                                     text, spk, rng))
    return jobs


def plan_covost(split_pairs: dict[str, Sequence[tuple[str, str]]], speakers: Sequence[Speaker],
                rng: random.Random) -> tuple[list[Job], str]:
    """CoVoST 2 es->en: Common Voice clips/*.mp3 and covost_v2.es_en.tsv (no quoting)."""
    rows = []
    for split, pairs in split_pairs.items():
        role = "train" if split == "train" else split
        spks = [s for s in speakers if s.lang == "es" and s.role == role]
        rows += [(split, es, en, rng.choice(spks)) for es, en in pairs]
    rng.shuffle(rows)  # real CoVoST TSVs interleave the splits
    jobs, lines = [], ["\t".join(COVOST_TSV_HEADER)]
    for i, (split, es, en, spk) in enumerate(rows, start=1):
        clip = f"common_voice_es_{i:08d}.mp3"
        fields = [clip, es, en, client_id(spk), split]
        assert not any(c in f for f in fields for c in "\t\n\r\""), fields
        lines.append("\t".join(fields))
        jobs.append(_job(f"CoVoST/{split}", f"CoVoST/es/clips/{clip}", es, spk, rng))
    return jobs, "\n".join(lines) + "\n"


def load_fortune_sentences(n: int, seed: int, exclude: Iterable[str] = (),
                           directory: Path = FORTUNE_DIR) -> list[str]:
    """Real English sentences from Debian's fortunes, LibriSpeech-normalized, 4-20 words."""
    if n <= 0 or not directory.is_dir():
        if n > 0:
            print(f"warning: {directory} missing, no fortune sentences", file=sys.stderr)
        return []
    excluded = set(exclude)
    found: set[str] = set()
    for name in FORTUNE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        for fortune in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            body = " ".join(ln for ln in fortune.splitlines() if not ln.strip().startswith("--"))
            for sent in re.split(r"(?<=[.!?])\s+", body):
                if re.search(r"[^A-Za-z'.,;:!?\"() \t-]", sent):
                    continue  # digits, code, art, non-ASCII: not LibriSpeech-like
                words = re.sub(r"[^A-Za-z' ]+", " ", sent.replace("-", " ")).split()
                words = [w.strip("'") for w in words if w.strip("'")]
                if 4 <= len(words) <= 20:
                    line = " ".join(words).upper()
                    if line not in excluded:
                        found.add(line)
    pool = sorted(found)
    random.Random(f"fortunes-{seed}").shuffle(pool)
    return pool[:n]


# ----------------------------------------------------------------------------- writing

def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write (temp file + os.replace) that leaves identical files (and mtimes) alone."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def synthesize(job: Job, out: Path) -> bool:
    """espeak-ng -> sox -> atomic rename; flac 16 kHz mono 16 bit, mp3 48 kHz as Common Voice."""
    dst = out / job.path
    if dst.exists():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    fmt = dst.suffix[1:]
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}_{threading.get_ident()}")
    speak = subprocess.run(
        ["espeak-ng", "-v", job.speaker.voice, "-s", str(job.speed), "-p", str(job.pitch),
         "--stdout", job.text], capture_output=True, check=True)
    enc = ["-r", "16000", "-b", "16"] if fmt == "flac" else ["-r", "48000", "-C", "64"]
    try:
        subprocess.run(["sox", "-D", "-q", "-t", "wav", "-", "-c", "1", *enc, "-t", fmt, str(tmp)],
                       input=speak.stdout, capture_output=True, check=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _synthesis_row(job: Job) -> str:
    s = job.speaker
    fields = [job.part, job.path, s.lang, s.id, s.voice, job.speed, job.pitch, job.text]
    return "\t".join(map(str, fields))


def invalidate_changed(out: Path, jobs: Sequence[Job]) -> int:
    """Delete audio whose recorded text/voice/speed/pitch differs from this plan.

    Skipping is keyed by path; the previous run's synthesis.tsv (written before synthesizing)
    says what each existing file holds, so a new seed, size or grammar never leaves stale audio.
    """
    old: dict[str, str] = {}
    record = out / "synthesis.tsv"
    if record.is_file():
        for line in record.read_text(encoding="utf-8").splitlines()[1:]:
            old[line.split("\t")[1]] = line
    removed = 0
    for job in jobs:
        dst = out / job.path
        if dst.exists() and old.get(job.path) != _synthesis_row(job):
            dst.unlink()
            removed += 1
    return removed


def run_jobs(jobs: Sequence[Job], out: Path, workers: int) -> int:
    """Synthesize in parallel (threads driving subprocesses); progress lines on stderr."""
    todo = [j for j in jobs if not (out / j.path).exists()]
    print(f"[synth] {len(jobs)} utterances, {len(jobs) - len(todo)} already done, "
          f"{len(todo)} to synthesize with {workers} workers", file=sys.stderr)
    if not todo:
        return 0
    t0, every, done = time.time(), max(1, len(todo) // 10), 0
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(synthesize, j, out) for j in todo]
        try:
            for fut in cf.as_completed(futures):
                fut.result()
                done += 1
                if done % every == 0 or done == len(todo):
                    print(f"[synth] {done}/{len(todo)} ({time.time() - t0:.1f}s)",
                          file=sys.stderr)
        except subprocess.CalledProcessError as e:
            for f in futures:
                f.cancel()
            raise RuntimeError(f"{e.cmd[0]} failed: {e.stderr!r}") from e
    return len(todo)


def prune(out: Path, keep: set[str]) -> int:
    """Remove audio/transcripts left over from a build with other sizes, and stale temp files."""
    removed = 0
    for top in ("LibriSpeech", "LibriLight", "CoVoST/es/clips"):
        root = out / top
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*"), reverse=True):
            rel = path.relative_to(out).as_posix()
            if path.is_file() and rel not in keep and (
                    ".tmp" in path.name or path.suffix in (".flac", ".mp3")
                    or path.name.endswith(".trans.txt")):
                path.unlink()
                removed += 1
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return removed


def duration_hours(paths: Iterable[Path]) -> float:
    return sum(sf.info(str(p)).duration for p in paths) / 3600.0


# ----------------------------------------------------------------------------- main

def build(out: Path, seed: int, sizes: dict[str, int], workers: int, heldout_frac: float,
          preset: str, do_prune: bool = True) -> dict:
    """Plan everything deterministically, synthesize what is missing, write the metadata."""
    t0 = time.time()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"{out} is not empty and was not made by this builder; refusing "
                         f"(the builder prunes files it did not plan).")
    out.mkdir(parents=True, exist_ok=True)
    write_if_changed(out / MARKER, b"built by examples/demo/build_corpus.py\n")

    variants = available_variants()
    voice_parts = partition_variants(variants, seed, heldout_frac)
    speakers = make_speakers(voice_parts, available_bases(EN_BASES, "en"),
                             available_bases(ES_BASES, "es"), seed)
    en_spk = {r: [s for s in speakers if s.lang == "en" and s.role == r]
              for r in ("train", "dev", "test")}

    # All sentences drawn once, held-out first (prefix-stable), then partitioned.
    s = sizes
    n_ll_en = (s["unlabeled"] + 1) // 2
    order = [("ls_test", s["test"]), ("ls_dev", s["dev"]), ("st_test", s["test"]),
             ("st_dev", s["dev"]), ("asr_train", s["asr_train"]), ("pairs", s["pairs"]),
             ("ll_en", n_ll_en), ("ll_es", s["unlabeled"] - n_ll_en),
             ("st_train", s["st_train"]), ("text_en", s["text"]), ("text_es", s["text"])]
    allpairs = grammar.generate_pairs(sum(n for _, n in order), seed)
    pool: dict[str, list[tuple[str, str]]] = {}
    i = 0
    for name, n in order:
        pool[name], i = allpairs[i:i + n], i + n

    def rng(part: str) -> random.Random:  # one stream per part: resizing one leaves the others
        return random.Random(f"plan-{seed}-{part}")

    jobs: list[Job] = []
    meta_files: dict[str, bytes] = {}
    for key, split in [("ls_test", "test-clean"), ("ls_dev", "dev-clean"),
                       ("asr_train", "train-clean-100"), ("pairs", "train-clean-360")]:
        role = {"ls_test": "test", "ls_dev": "dev"}.get(key, "train")
        j, trans = plan_librispeech(split, [en for _, en in pool[key]], en_spk[role], rng(split))
        jobs += j
        meta_files.update({k: v.encode() for k, v in trans.items()})
    jobs += plan_librilight({"en": [en for _, en in pool["ll_en"]],
                             "es": [es for es, _ in pool["ll_es"]]}, speakers, rng("LibriLight"))
    st_jobs, tsv = plan_covost({"train": pool["st_train"], "dev": pool["st_dev"],
                                "test": pool["st_test"]}, speakers, rng("CoVoST"))
    jobs += st_jobs
    meta_files["CoVoST/es/covost_v2.es_en.tsv"] = tsv.encode()

    heldout_text = {grammar.to_transcript(en) for k in ("ls_test", "ls_dev", "st_test", "st_dev")
                    for _, en in pool[k]}
    fortunes = load_fortune_sentences(s["fortunes"], seed, exclude=heldout_text)
    lm_lines = [grammar.to_transcript(en) for _, en in pool["text_en"]] + fortunes
    random.Random(f"lm-{seed}").shuffle(lm_lines)
    meta_files["librispeech-lm-norm.txt"] = "".join(f"{ln}\n" for ln in lm_lines).encode()
    mc4 = "".join(json.dumps({"text": es, "timestamp": "2020-01-01T00:00:00Z",
                              "url": f"https://example.org/slam-demo/{k}"}, ensure_ascii=False)
                  + "\n" for k, (es, _) in enumerate(pool["text_es"]))
    meta_files["mc4-es.json.gz"] = gzip.compress(mc4.encode(), mtime=0)
    synth_rows = ["part\tpath\tlang\tspeaker\tvoice\tspeed\tpitch\ttext"]
    synth_rows += [_synthesis_row(j) for j in jobs]

    invalidated = invalidate_changed(out, jobs)
    if invalidated:
        print(f"[synth] {invalidated} existing files were made from another plan; redoing them",
              file=sys.stderr)
    rewritten = write_if_changed(out / "synthesis.tsv", ("\n".join(synth_rows) + "\n").encode())
    new_audio = run_jobs(jobs, out, workers)
    rewritten += sum(write_if_changed(out / rel, data) for rel, data in meta_files.items())
    removed = prune(out, {j.path for j in jobs} | set(meta_files)) if do_prune else 0

    counts: dict[str, int] = {}
    hours: dict[str, float] = {}
    for part in sorted({j.part for j in jobs}):
        paths = [out / j.path for j in jobs if j.part == part]
        counts[part] = len(paths)
        hours[part] = round(duration_hours(paths), 4)
    counts["LibriLight/en"] = len(pool["ll_en"])
    counts["LibriLight/es"] = len(pool["ll_es"])
    counts["text/librispeech-lm-norm.txt"] = len(lm_lines)
    counts["text/librispeech-lm-norm.txt (fortunes)"] = len(fortunes)
    counts["text/mc4-es.json.gz"] = len(pool["text_es"])

    def used(role: str) -> list[str]:
        return sorted({j.speaker.voice for j in jobs if j.speaker.role == role})

    meta = {
        "generator": "examples/demo/build_corpus.py",
        "seed": seed, "size_preset": preset, "sizes": sizes,
        "espeak_ng": subprocess.run(["espeak-ng", "--version"], capture_output=True,
                                    text=True).stdout.strip(),
        "variants": voice_parts,
        "voices": {"train": used("train"), "dev": used("dev"), "test": used("test")},
        "speakers": {str(sp.id): {"voice": sp.voice, "lang": sp.lang, "role": sp.role,
                                  "speed": sp.speed, "pitch": sp.pitch,
                                  "client_id": client_id(sp)} for sp in speakers},
        "counts": counts, "hours": hours,
        "audio": {"LibriSpeech": "flac 16 kHz mono 16 bit", "LibriLight": "flac 16 kHz mono 16 bit",
                  "CoVoST": "mp3 48 kHz mono 64 kbps"},
    }
    rewritten += write_if_changed(out / "meta.json",
                                  (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode())

    elapsed = time.time() - t0
    print(f"\nDemo corpus in {out} (seed {seed}, preset {preset}):")
    for part in counts:
        h = f"  {hours[part]:.3f} h" if part in hours else ""
        print(f"  {part:42s} {counts[part]:6d}{h}")
    print(f"  total audio {sum(hours.values()):.3f} h; train/held-out variants "
          f"{len(voice_parts['train'])}/{len(voice_parts['dev']) + len(voice_parts['test'])}")
    print(f"  synthesized {new_audio}, metadata files written {rewritten}, pruned {removed}; "
          f"built in {elapsed:.1f}s")
    return meta


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=1, help="seeds sentences, voices and planning")
    p.add_argument("--size", choices=sorted(SIZES), default="demo",
                   help="size preset (demo: ~30 min CPU demo; ci: ~10x smaller)")
    for key, flag, what in [
            ("asr_train", "--num-asr-train", "LibriSpeech train-clean-100 utterances"),
            ("pairs", "--num-pairs", "LibriSpeech train-clean-360 utterances (pre-training pairs)"),
            ("unlabeled", "--num-unlabeled", "LibriLight utterances, half English half Spanish"),
            ("st_train", "--num-st-train", "CoVoST es-en train clips"),
            ("dev", "--num-dev", "dev utterances, each of LibriSpeech dev-clean and CoVoST dev"),
            ("test", "--num-test", "test utterances, each of LibriSpeech test-clean and CoVoST"),
            ("text", "--num-text", "grammar lines, each of the English LM text and Spanish mC4"),
            ("fortunes", "--num-fortunes", "extra real English lines from fortunes")]:
        p.add_argument(flag, dest=key, type=int, default=None, metavar="N",
                       help=f"{what} (overrides --size)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel espeak-ng/sox pipelines")
    p.add_argument("--heldout-voice-frac", type=float, default=0.2,
                   help="fraction of espeak-ng voice variants reserved for dev/test")
    p.add_argument("--no-prune", action="store_true",
                   help="keep audio from earlier builds that this build did not plan")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH "
                             "(apt-get install espeak-ng sox libsox-fmt-mp3)")
    sizes = dict(SIZES[args.size])
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if min(sizes.values()) < 0:
        raise SystemExit("sizes must be >= 0")
    build(args.out, args.seed, sizes, max(1, args.workers), args.heldout_voice_frac, args.size,
          do_prune=not args.no_prune)
    return 0


if __name__ == "__main__":
    sys.exit(main())
