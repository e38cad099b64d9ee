"""Tiny fine-tuning data and checkpoints for the ``slam_s2t`` tests.

Speech is synthesized with espeak-ng (English), turned into 80-dim filterbanks with
``slam_formats.features.compute_fbank`` and stored the way fairseq's S2T recipes store
them: one uncompressed zip of ``<id>.npy`` referenced as ``zip:offset:length`` from fairseq's TSV
manifests. Each data directory also holds a SentencePiece model, its fairseq dictionary and a
``config_<task>.yaml`` (fairseq's recipe names, see docs/data_formats.md).
"""
from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from manifests.core import stored_zip_entries

REPO_ROOT = Path(__file__).resolve().parents[1]
USER_DIR = REPO_ROOT / "slam_fairseq"

# (English speech, German target, French target); the two target languages share no word.
SENTENCES = [
    ("the cat sleeps", "die katze schläft", "le chat dort"),
    ("the dog runs fast", "der hund läuft schnell", "le chien court vite"),
    ("a bird sings", "ein vogel singt", "un oiseau chante"),
    ("the child reads a book", "das kind liest ein buch", "l enfant lit un livre"),
    ("my friend drinks water", "mein freund trinkt wasser", "mon ami boit de l eau"),
    ("the sun is hot today", "die sonne ist heute heiss", "le soleil est chaud aujourd hui"),
]
GERMAN_WORDS = {word for _, german, _ in SENTENCES for word in german.split()}
FRENCH_WORDS = {word for _, _, french in SENTENCES for word in french.split()}
assert not GERMAN_WORDS & FRENCH_WORDS

SPECAUGMENT_LB = dict(time_wrap_W=0, freq_mask_N=1, freq_mask_F=27, time_mask_N=1, time_mask_T=100,
                      time_mask_p=1.0)


def synthesize(text: str, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """espeak-ng speech as a 16 kHz mono float waveform."""
    import soundfile as sf

    from slam_formats.features import resample

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return resample(samples, rate)


def write_feature_zip(zip_path: Path, features: Dict[str, np.ndarray]) -> Dict[str, str]:
    """Store ``<id>.npy`` entries uncompressed; returns id -> ``zip:offset:length`` (relative name)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        for utterance_id, array in features.items():
            buffer = io.BytesIO()
            np.save(buffer, array.astype(np.float32))
            archive.writestr(f"{utterance_id}.npy", buffer.getvalue())
    return {Path(name).stem: f"{zip_path.name}:{offset}:{length}"
            for name, (offset, length) in stored_zip_entries(zip_path).items()}


def s2t_cfg_and_task(data_dir: Path, task_name: str, save_dir: Path, *extra: str, arch: str = "slam_s2t_tiny"):
    """(cfg, task) exactly as fairseq-train makes them from a command line."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data_dir), "--task", "speech_to_text", "--config-yaml", f"config_{task_name}.yaml",
        "--train-subset", f"train_{task_name}", "--arch", arch, "--save-dir", str(save_dir),
        "--max-tokens", "4000", "--seed", "1", *extra])
    cfg = convert_namespace_to_omegaconf(args)
    return cfg, tasks.setup_task(cfg.task)


def train_spm(sentences: Sequence[str], prefix: Path, vocab_size: int = 120,
              user_symbols: Sequence[str] = ()) -> Tuple[Path, Path]:
    """SentencePiece (fairseq's special ids) + its fairseq dictionary; returns (model, dict) paths."""
    import sentencepiece

    from manifests.vocabulary import write_fairseq_dictionary

    options = dict(model_type="unigram", vocab_size=vocab_size, character_coverage=1.0, bos_id=0,
                   pad_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False, minloglevel=2)
    if user_symbols:
        options["user_defined_symbols"] = list(user_symbols)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(list(sentences)),
                                             model_prefix=str(prefix), **options)
    model_path = Path(f"{prefix}.model")
    return model_path, Path(write_fairseq_dictionary(str(model_path)))


def _write_config(path: Path, spm_model: Path, dictionary: Path, specaugment: bool,
                  prepend_tgt_lang_tag: bool) -> None:
    import yaml

    config = {"input_channels": 1, "input_feat_per_channel": 80, "audio_root": str(path.parent.resolve()),
              "vocab_filename": dictionary.name,
              "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": spm_model.name},
              "transforms": {"*": ["utterance_cmvn"]}}
    if specaugment:
        config["specaugment"] = dict(SPECAUGMENT_LB)
        config["transforms"]["_train"] = ["utterance_cmvn", "specaugment"]
    if prepend_tgt_lang_tag:
        config["prepend_tgt_lang_tag"] = True
    path.write_text(yaml.safe_dump(config, sort_keys=True), encoding="utf-8")


def random_asr_dir(data_dir: Path) -> Path:
    """A speech_to_text data directory of 12 utterances of random frames, 30 to 107 long:
    ``train_asr.tsv``, ``config_asr.yaml`` with SpecAugment for training splits."""
    import yaml

    from slam_formats.manifest import write_s2t_manifest

    rng = np.random.default_rng(0)
    data_dir.mkdir(parents=True)
    features = {f"u{i}": rng.normal(size=(30 + 7 * i, 80)).astype(np.float32) for i in range(12)}
    references = write_feature_zip(data_dir / "asr_00000.zip", features)
    texts = [english for english, _, _ in SENTENCES]
    write_s2t_manifest(str(data_dir / "train_asr.tsv"),
                       [{"id": key, "audio": references[key], "n_frames": len(value),
                         "tgt_text": texts[i % len(texts)], "speaker": "s"}
                        for i, (key, value) in enumerate(features.items())])
    spm_model, dictionary = train_spm(texts, data_dir / "spm_unigram120_asr")
    config = {"input_channels": 1, "input_feat_per_channel": 80, "audio_root": str(data_dir.resolve()),
              "vocab_filename": dictionary.name,
              "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": str(spm_model.resolve())},
              "specaugment": dict(SPECAUGMENT_LB),
              "transforms": {"_train": ["utterance_cmvn", "specaugment"], "_eval": ["utterance_cmvn"]}}
    (data_dir / "config_asr.yaml").write_text(yaml.safe_dump(config))
    return data_dir


def synthesize_features(out_dir: Path, speeds: Sequence[int] = (150,)) -> Dict[str, np.ndarray]:
    """Filterbanks of every English sentence at each speed, keyed ``s<sentence>_<speed>``."""
    from slam_formats.features import compute_fbank

    features = {}
    for index, (english, _, _) in enumerate(SENTENCES):
        for speed in speeds:
            features[f"s{index}_{speed}"] = compute_fbank(synthesize(english, speed=speed))
    return features


def build_multilingual_st(out_dir: Path, features: Dict[str, np.ndarray], specaugment: bool = False) -> str:
    """English speech -> German and French (every audio twice, once per target language).

    Writes ``train_st_en_mul.tsv`` (columns + ``tgt_lang``), ``config_st_en_mul.yaml`` with
    ``prepend_tgt_lang_tag: true``, ``spm_unigram120_st_en_mul.{model,txt}`` holding ``<lang:de>``
    and ``<lang:fr>``. Returns the task name ``st_en_mul``.
    """
    from slam_formats.manifest import write_s2t_manifest
    from slam_formats.names import lang_tag

    out_dir.mkdir(parents=True, exist_ok=True)
    references = write_feature_zip(out_dir / "fbank_st.zip", features)
    rows = []
    for key, array in features.items():
        sentence = SENTENCES[int(key[1:].split("_")[0])]
        for language, text in (("de", sentence[1]), ("fr", sentence[2])):
            rows.append({"id": f"{key}_{language}", "audio": references[key], "n_frames": len(array),
                         "tgt_text": text, "speaker": "espeak", "src_text": sentence[0], "tgt_lang": language})
    task = "st_en_mul"
    write_s2t_manifest(str(out_dir / f"train_{task}.tsv"), rows)
    spm_model, dictionary = train_spm([row["tgt_text"] for row in rows], out_dir / f"spm_unigram120_{task}",
                                      user_symbols=[lang_tag("de"), lang_tag("fr")])
    _write_config(out_dir / f"config_{task}.yaml", spm_model, dictionary, specaugment, prepend_tgt_lang_tag=True)
    return task


def build_asr(out_dir: Path, features: Dict[str, np.ndarray], specaugment: bool = True) -> str:
    """English speech -> English transcripts: ``train_asr.tsv``, ``config_asr.yaml``,
    ``spm_unigram120_asr.{model,txt}``. Returns the task name ``asr``."""
    from slam_formats.manifest import write_s2t_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    references = write_feature_zip(out_dir / "fbank_asr.zip", features)
    rows = [{"id": key, "audio": references[key], "n_frames": len(array),
             "tgt_text": SENTENCES[int(key[1:].split("_")[0])][0], "speaker": "espeak"}
            for key, array in features.items()]
    write_s2t_manifest(str(out_dir / "train_asr.tsv"), rows)
    spm_model, dictionary = train_spm([row["tgt_text"] for row in rows], out_dir / "spm_unigram120_asr")
    _write_config(out_dir / "config_asr.yaml", spm_model, dictionary, specaugment, prepend_tgt_lang_tag=False)
    return "asr"


def build_slam_model(seed: int = 0, vocab_size: int = 40, **sizes):
    """A ``slam`` model (slam_tiny sizes unless overridden), as ``slam_pretraining`` builds it."""
    import torch

    from slam_fairseq.encoders.config import config_from
    from slam_fairseq.encoders.slam_encoder import build_slam_encoder
    from slam_fairseq.models.slam import SlamConfig, SlamModel, slam_tiny

    torch.manual_seed(seed)
    namespace = argparse.Namespace(**sizes)
    slam_tiny(namespace)
    cfg = config_from(namespace, SlamConfig)
    return SlamModel(cfg, build_slam_encoder(cfg, vocab_size, 1)), cfg


def save_fairseq_checkpoint(path: Path, model_state: Dict, model_cfg: Dict, task_name: str = "slam_pretraining",
                            extra_tensors: Optional[Dict] = None) -> Path:
    """A checkpoint as fairseq's trainer writes it (``cfg`` a plain dict, ``args`` None)."""
    import torch

    state = dict(model_state)
    state.update(extra_tensors or {})
    checkpoint = {
        "args": None,
        "cfg": {"model": dict(model_cfg), "task": {"_name": task_name}, "common": {"seed": 1}},
        "model": state,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "SlamMultitaskCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 1000}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 3, "iterations_in_epoch": 0}},
        "last_optimizer_state": None,
    }
    torch.save(checkpoint, str(path))
    return path


def save_slam_checkpoint(path: Path, seed: int = 0, arch: str = "slam_tiny", **sizes):
    """Save a fresh ``slam`` model as a pre-training checkpoint; returns (path, its model state)."""
    import dataclasses

    import torch

    model, cfg = build_slam_model(seed=seed, **sizes)
    model_cfg = dict(dataclasses.asdict(cfg), _name=arch)
    # a pre-training head besides the encoder (whatever the slam model of the day holds is kept too)
    extra = {"msm_head.weight": torch.randn(8, cfg.encoder_embed_dim)}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    save_fairseq_checkpoint(path, state, model_cfg, extra_tensors=extra)
    return path, dict(state, **extra)


def single_thread():
    """Generator for a module-scoped pytest fixture: torch on one thread (restored afterwards)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Running fairseq's command-line tools the way users do.

def fairseq_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    # The tiny models gain nothing from a second thread, and on a busy machine OpenMP threads that
    # wait for each other slow a run down several times.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_fairseq(tool: str, *args, cwd: Optional[Path] = None, check: bool = True) -> subprocess.CompletedProcess:
    """``fairseq-train`` / ``fairseq-generate`` through their Python entry points (same code as the
    console scripts); returns the process with stdout+stderr in ``.stdout``."""
    modules = {"fairseq-train": "fairseq_cli.train", "fairseq-generate": "fairseq_cli.generate"}
    command = [sys.executable, "-m", modules[tool], *map(str, args)]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=fairseq_env(), cwd=str(cwd or REPO_ROOT))
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} exited {result.returncode}:\n{result.stdout[-6000:]}")
    return result


def train_losses(log: str) -> List[float]:
    """The ``loss`` values (base 2) of fairseq-train's end-of-epoch ``train`` summaries
    (``| INFO | train | epoch 012 | loss 1.23 | ...``, or ``INFO:train:epoch 012 | loss ...``)."""
    return [float(match) for match in re.findall(r"\btrain[ |:]+epoch \d+ \| loss ([0-9.]+)", log)]


def parse_bleu(log: str) -> float:
    match = re.search(r"Generate \S+ with beam=\d+: BLEU = ([0-9.]+)", log)
    assert match, f"no BLEU line in:\n{log[-3000:]}"
    return float(match.group(1))


def parse_wer(log: str) -> float:
    match = re.search(r"Generate \S+ with beam=\d+: WER: ([0-9.]+)", log)
    assert match, f"no WER line in:\n{log[-3000:]}"
    return float(match.group(1))


def recomputed_wer(results: Dict[int, Tuple[str, str]]) -> float:
    """WER (%) of fairseq-generate's T-/D- lines, lowercased, punctuation removed, by word edit distance."""
    import editdistance

    def words(text: str):
        return "".join(c for c in text.lower() if c.isalnum() or c.isspace() or c == "'").split()

    errors = sum(editdistance.eval(words(reference), words(hypothesis)) for reference, hypothesis in results.values())
    return 100.0 * errors / sum(len(words(reference)) for reference, _ in results.values())


def recomputed_bleu(results: Dict[int, Tuple[str, str]]) -> float:
    """Corpus BLEU of fairseq-generate's T-/D- lines with sacrebleu's defaults (what --scoring sacrebleu uses)."""
    import sacrebleu

    ordered = [results[index] for index in sorted(results)]
    return sacrebleu.corpus_bleu([hypothesis for _, hypothesis in ordered],
                                 [[reference for reference, _ in ordered]]).score


def hypotheses(log: str) -> Dict[int, Tuple[str, str]]:
    """fairseq-generate's ``T-<i>`` and ``D-<i>`` lines: sample index -> (reference, hypothesis)."""
    references = dict(re.findall(r"^T-(\d+)\t(.*)$", log, flags=re.M))
    outputs = {index: text for index, _, text in re.findall(r"^D-(\d+)\t([^\t]*)\t(.*)$", log, flags=re.M)}
    return {int(index): (references[index], outputs.get(index, "")) for index in references}
