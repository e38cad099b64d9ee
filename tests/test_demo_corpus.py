"""Tests for examples/demo/build_corpus.py: a tiny corpus must look exactly like the real ones.

Everything is read back from the files the builder wrote (plus its meta.json/synthesis.tsv),
never from its internals, because the manifest scripts will only ever see the files.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest


import soundfile as sf  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"
sys.path.insert(0, str(DEMO))
import grammar  # noqa: E402

TINY = ["--num-asr-train", "6", "--num-pairs", "6", "--num-unlabeled", "8",
        "--num-st-train", "6", "--num-dev", "4", "--num-test", "5", "--num-text", "50",
        "--num-fortunes", "10", "--workers", "2", "--seed", "3"]

LS_AUDIO = re.compile(r"^LibriSpeech/(train-clean-100|train-clean-360|dev-clean|test-clean)/"
                      r"(\d+)/(\d+)/\2-\3-(\d{4})\.flac$")
LS_TRANS = re.compile(r"^LibriSpeech/(train-clean-100|train-clean-360|dev-clean|test-clean)/"
                      r"(\d+)/(\d+)/\2-\3\.trans\.txt$")
LL_AUDIO = re.compile(r"^LibriLight/(\d+)/([^/]+)/[^/]+\.flac$")
CV_CLIP = re.compile(r"^CoVoST/es/clips/common_voice_es_\d+\.mp3$")
TOP_FILES = {".slam_demo_corpus", "meta.json", "synthesis.tsv", "librispeech-lm-norm.txt",
             "mc4-es.json.gz", "CoVoST/es/covost_v2.es_en.tsv"}


def _build(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEMO / "build_corpus.py"), "--out", str(out),
                           "--size", "ci", *TINY], capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    _build(out)
    return out


def _files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def _trans(out: Path, split: str) -> dict[str, str]:
    rows = {}
    for path in (out / "LibriSpeech" / split).rglob("*.trans.txt"):
        for line in path.read_text().splitlines():
            uid, text = line.split(" ", 1)
            rows[uid] = text
    return rows


def _covost(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / "CoVoST/es/covost_v2.es_en.tsv", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def _synthesis(out: Path) -> list[dict[str, str]]:
    with open(out / "synthesis.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_layout_matches_real_corpora(corpus: Path) -> None:
    files = _files(corpus)
    unknown = [f for f in files if f not in TOP_FILES and not any(
        r.match(f) for r in (LS_AUDIO, LS_TRANS, LL_AUDIO, CV_CLIP))]
    assert not unknown
    for split in ("train-clean-100", "train-clean-360", "dev-clean", "test-clean"):
        assert any(f.startswith(f"LibriSpeech/{split}/") and f.endswith(".flac") for f in files)
    assert sum(bool(LL_AUDIO.match(f)) for f in files) == 8
    assert not list((corpus / "LibriLight").rglob("*.txt"))  # unlabeled


def test_trans_txt_matches_flac_one_to_one(corpus: Path) -> None:
    for trans in (corpus / "LibriSpeech").rglob("*.trans.txt"):
        ids = [ln.split(" ", 1)[0] for ln in trans.read_text().splitlines()]
        flacs = sorted(p.stem for p in trans.parent.glob("*.flac"))
        assert sorted(ids) == flacs and len(set(ids)) == len(ids)
        for line in trans.read_text().splitlines():
            assert re.fullmatch(r"\d+-\d+-\d{4} [A-Z']+( [A-Z']+)*", line), line
    counts = {s: len(_trans(corpus, s)) for s in
              ("train-clean-100", "train-clean-360", "dev-clean", "test-clean")}
    assert counts == {"train-clean-100": 6, "train-clean-360": 6, "dev-clean": 4, "test-clean": 5}


def test_flac_audio_is_16k_mono_speech(corpus: Path) -> None:
    for path in list(corpus.rglob("*.flac")):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), path
        assert 0.5 < info.duration < 20.0, (path, info.duration)
        audio, _ = sf.read(str(path), dtype="float32")
        assert np.sqrt(np.mean(audio ** 2)) > 0.01, path


def test_covost_tsv_and_mp3_clips(corpus: Path) -> None:
    header, rows = _covost(corpus)
    assert header == ["path", "sentence", "translation", "client_id", "split"]
    assert sorted(r["split"] for r in rows).count("train") == 6
    assert {r["split"] for r in rows} == {"train", "dev", "test"}
    assert len([r for r in rows if r["split"] == "test"]) == 5
    clips = {p.name for p in (corpus / "CoVoST/es/clips").glob("*.mp3")}
    assert clips == {r["path"] for r in rows}
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{128}", r["client_id"])
        assert r["translation"].endswith(".") and r["translation"] == r["translation"].lower()
        audio, sr = sf.read(str(corpus / "CoVoST/es/clips" / r["path"]), dtype="float32")
        assert sr in (32000, 48000) and audio.ndim == 1 and len(audio) > sr // 2
        assert np.sqrt(np.mean(audio ** 2)) > 0.01


def test_text_corpora(corpus: Path) -> None:
    lm = (corpus / "librispeech-lm-norm.txt").read_text().splitlines()
    assert len(lm) == 60  # 50 grammar lines + 10 fortunes
    assert all(re.fullmatch(r"[A-Z']+( [A-Z']+)*", ln) for ln in lm)
    with gzip.open(corpus / "mc4-es.json.gz", "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == 50 and all(d["text"].strip() for d in docs)
    vocab_es = {w for n in grammar.NOUNS.values() for w in (n.es_sg, n.es_pl)}
    assert all(set(d["text"].rstrip(".").split()) & vocab_es for d in docs)  # Spanish


def test_heldout_sentences_unseen(corpus: Path) -> None:
    synth = _synthesis(corpus)
    _, cv = _covost(corpus)
    up = grammar.to_transcript
    train_en = set(_trans(corpus, "train-clean-100").values()) | set(
        _trans(corpus, "train-clean-360").values())
    train_en |= set((corpus / "librispeech-lm-norm.txt").read_text().splitlines())
    train_en |= {up(r["text"]) for r in synth if r["part"] == "LibriLight" and r["lang"] == "en"}
    train_en |= {up(r["translation"]) for r in cv if r["split"] == "train"}
    with gzip.open(corpus / "mc4-es.json.gz", "rt", encoding="utf-8") as f:
        train_es = {json.loads(line)["text"] for line in f}
    train_es |= {r["text"] for r in synth if r["part"] == "LibriLight" and r["lang"] == "es"}
    train_es |= {r["sentence"] for r in cv if r["split"] == "train"}

    heldout_en = set(_trans(corpus, "test-clean").values()) | set(
        _trans(corpus, "dev-clean").values())
    heldout_en |= {up(r["translation"]) for r in cv if r["split"] != "train"}
    heldout_es = {r["sentence"] for r in cv if r["split"] != "train"}
    assert len(heldout_en) == 4 + 5 + 4 + 5 and len(heldout_es) == 9
    assert not heldout_en & train_en
    assert not heldout_es & train_es


def test_heldout_voices_unseen(corpus: Path) -> None:
    meta = json.loads((corpus / "meta.json").read_text())
    speakers = meta["speakers"]
    by_client = {s["client_id"]: s for s in speakers.values()}

    def variant(voice: str) -> str:
        return voice.split("+", 1)[1]


    roles: dict[str, set[str]] = defaultdict(set)
    for f in _files(corpus):
        m = LS_AUDIO.match(f) or LL_AUDIO.match(f)
        if m:
            split = m.group(1) if f.startswith("LibriSpeech") else "LibriLight"
            spk = m.group(2) if f.startswith("LibriSpeech") else m.group(1)
            held = split in ("dev-clean", "test-clean")
            roles["heldout" if held else "train"].add(variant(speakers[spk]["voice"]))
    _, cv = _covost(corpus)
    for r in cv:
        held = r["split"] != "train"
        roles["heldout" if held else "train"].add(variant(by_client[r["client_id"]]["voice"]))
    assert roles["train"] and roles["heldout"]
    assert not roles["train"] & roles["heldout"]
    assert roles["heldout"] <= set(meta["variants"]["dev"]) | set(meta["variants"]["test"])
    assert roles["train"] <= set(meta["variants"]["train"])
    assert meta["seed"] == 3 and meta["sizes"]["test"] == 5


def test_grammar_spot_checks() -> None:
    s = grammar.Sentence(grammar.NP("the", "perro", "grande"), "comer",
                         grammar.NP("the", "manzana", "rojo"))
    assert grammar.realize(s) == ("el perro grande come la manzana roja.",
                                  "the big dog eats the red apple.")
    s = grammar.Sentence(grammar.NP("three", "niña", "feliz", plural=True), "ver",
                         grammar.NP("a", "oso", "viejo"), "junto", grammar.NP("the", "puente"),
                         "noche")
    assert grammar.realize(s) == (
        "tres niñas felices ven a un oso viejo junto al puente por la noche.",
        "three happy girls see an old bear next to the bridge at night.")
    assert grammar.to_transcript("the big dog's apple.") == "THE BIG DOG'S APPLE"

    pairs = grammar.generate_pairs(3000, seed=7)
    assert pairs == grammar.generate_pairs(3000, seed=7)
    assert pairs[:100] == grammar.generate_pairs(100, seed=7)  # prefix-stable
    assert len({es for es, _ in pairs}) == len({en for _, en in pairs}) == 3000
    assert pairs[0] not in grammar.generate_pairs(50, seed=7, exclude={pairs[0][0]})

    # Word-consistent translation: a lexicon word is on one side iff its translation is.
    for es, en in pairs[:1000]:
        es_w, en_w = set(es.rstrip(".").split()), set(en.rstrip(".").split())
        for n in grammar.NOUNS.values():
            assert (n.es_sg in es_w) == (n.en_sg in en_w), (n, es, en)
            assert (n.es_pl in es_w) == (n.en_pl in en_w), (n, es, en)
        for a in grammar.ADJECTIVES.values():
            assert bool(a.forms() & es_w) == (a.en in en_w), (a, es, en)
        for v in grammar.VERBS.values():
            assert (v.es_sg in es_w) == (v.en_sg.split()[0] in en_w), (v, es, en)
            assert (v.es_pl in es_w) == (v.en_pl.split()[0] in en_w), (v, es, en)


def test_rerun_writes_nothing(corpus: Path) -> None:
    def snapshot() -> dict[str, int]:
        return {p.as_posix(): p.stat().st_mtime_ns for p in [corpus, *corpus.rglob("*")]}

    before = snapshot()
    result = _build(corpus)
    assert snapshot() == before
    assert "synthesized 0, metadata files written 0, pruned 0" in result.stdout


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.flac").write_bytes(b"x")
    result = subprocess.run([sys.executable, str(DEMO / "build_corpus.py"), "--out",
                             str(tmp_path), "--size", "ci", *TINY], capture_output=True, text=True)
    assert result.returncode != 0 and (tmp_path / "precious.flac").exists()
    assert "is not empty and was not made by this builder; refusing" in result.stderr
    assert not (tmp_path / "meta.json").exists()


def test_rebuild_with_other_args_leaves_no_stale_audio(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(corpus, out)
    subprocess.run([sys.executable, str(DEMO / "build_corpus.py"), "--out", str(out), "--size",
                    "ci", *TINY, "--num-pairs", "3", "--seed", "4"], check=True,
                   capture_output=True)
    audio = {f for f in _files(out) if f.endswith((".flac", ".mp3"))}
    synth = _synthesis(out)
    assert audio == {r["path"] for r in synth}
    assert len(_trans(out, "train-clean-360")) == 3
    for trans in (out / "LibriSpeech").rglob("*.trans.txt"):
        ids = sorted(ln.split(" ", 1)[0] for ln in trans.read_text().splitlines())
        assert ids == sorted(p.stem for p in trans.parent.glob("*.flac"))
    assert json.loads((out / "meta.json").read_text())["seed"] == 4
