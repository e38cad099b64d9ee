"""Tiny SLAM data directories for the ``slam_pretraining`` tests, and a stand-in criterion.

``build_data_dir`` writes the layout of ``docs/data_formats.md``: config.yaml, a SentencePiece model
trained on a few sentences with its fairseq dictionary, ``speech_<split>.tsv`` and
``pair_<split>.tsv`` whose features (real espeak-ng speech, or random frames of chosen lengths) sit
in an uncompressed zip of ``.npy`` (``fbank/<name>.zip:offset:length``), and text as
``text_<split>.txt`` or as fairseq's mmap ``text_<split>.bin/.idx``.

``register_stand_in_criterion`` registers ``pretraining_stand_in``, a small masked-prediction
criterion over ``model.encoder`` with the ``slam_multitask`` interface (a dict of any subset of
speech/text/pair batches in, ``(loss, 1, logging_output)`` out). It exists only for the tests,
until the real ``slam_multitask`` criterion is registered.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from english_sentences import ENGLISH
from manifests.core import stored_zip_entries

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
STAND_IN_CRITERION = "pretraining_stand_in"

SENTENCES = ENGLISH + [
    "a picture is worth a thousand words",
    "the pen is mightier than the sword",
    "do not count your chickens before they hatch",
    "an apple a day keeps the doctor away",
]


# -- SentencePiece and dictionary ----------------------------------------------------------------
def train_sentencepiece(directory: Path, sentences: Sequence[str], vocab_size: int = 60,
                        prefix: str = "spm_unigram60") -> Path:
    """A SentencePiece model with fairseq's special ids, and its fairseq dictionary next to it."""
    import sentencepiece

    from manifests.vocabulary import write_fairseq_dictionary

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / f"{prefix}.corpus.txt"
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        minloglevel=2)
    corpus.unlink()
    write_fairseq_dictionary(str(directory / f"{prefix}.model"))
    return directory / f"{prefix}.model"


def encode_with_dictionary(spm_model: Path, lines: Sequence[str]) -> List[np.ndarray]:
    """Ids as the task encodes them (pieces -> dictionary, eos appended), for writing .bin/.idx."""
    import sentencepiece
    from fairseq.data import Dictionary

    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    dictionary = Dictionary.load(str(spm_model.with_suffix(".txt")))
    return [np.asarray([dictionary.index(p) for p in processor.encode(line, out_type=str)] + [dictionary.eos()])
            for line in lines]


def write_indexed_text(prefix: Path, sequences: Sequence[np.ndarray], vocab_size: int = 100) -> None:
    """fairseq's mmap indexed dataset ``prefix.bin``/``prefix.idx``."""
    import torch
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.MMapIndexedDatasetBuilder(
        f"{prefix}.bin", dtype=indexed_dataset.best_fitting_int_dtype(vocab_size))
    for sequence in sequences:
        builder.add_item(torch.as_tensor(np.asarray(sequence, dtype=np.int64)))
    builder.finalize(f"{prefix}.idx")


# -- features ---------------------------------------------------------------------------------
def espeak_features(text: str, voice: str = "en", speed: int = 175) -> np.ndarray:
    """80-dim log-Mel of espeak-ng speech (16 kHz, via the project's own feature code)."""
    import soundfile as sf

    from slam_formats.features import compute_fbank, resample

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return compute_fbank(resample(samples, rate, 16000))


def random_features(num_frames: int, rng: np.random.Generator, dim: int = 80) -> np.ndarray:
    return rng.normal(size=(num_frames, dim)).astype(np.float32)


def write_feature_zip(zip_path: Path, features: Dict[str, np.ndarray], data_dir: Path) -> Dict[str, str]:
    """Store ``<id>.npy`` uncompressed in ``zip_path``; returns id -> ``relative/zip:offset:length``."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as archive:
        for utterance_id, array in features.items():
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(array, dtype=np.float32))
            archive.writestr(f"{utterance_id}.npy", buffer.getvalue())
    relative = os.path.relpath(zip_path, data_dir)
    return {name[: -len(".npy")]: f"{relative}:{offset}:{length}"
            for name, (offset, length) in stored_zip_entries(zip_path).items()}


def write_manifest(path: Path, rows: List[Dict[str, object]]) -> None:
    from slam_formats.manifest import write_s2t_manifest

    write_s2t_manifest(str(path), rows)


def write_config(data_dir: Path, spm_model: Path, cmvn_stats: Optional[Path] = None) -> None:
    import yaml

    config = {"input_channels": 1, "input_feat_per_channel": 80,
              "vocab_filename": spm_model.with_suffix(".txt").name,
              "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": spm_model.name}}
    if cmvn_stats is not None:
        config["global_cmvn"] = {"stats_npz_path": cmvn_stats.name}
    (data_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def speech_rows(data_dir: Path, name: str, features: Dict[str, np.ndarray],
                transcripts: Optional[Dict[str, str]] = None) -> List[Dict[str, object]]:
    references = write_feature_zip(data_dir / "fbank" / f"{name}.zip", features, data_dir)
    return [{"id": key, "audio": references[key], "n_frames": len(value),
             "tgt_text": (transcripts or {}).get(key, ""), "speaker": "spk"}
            for key, value in features.items()]


def build_data_dir(data_dir: Path, *, splits: Sequence[str] = ("train", "valid"), speech: bool = True,
                   text: Optional[str] = "txt", pair: bool = True, real_speech: bool = True,
                   num_speech: int = 8, num_pairs: int = 6, num_text: int = 12, seed: int = 0) -> Path:
    """A SLAM data directory; ``text`` is ``txt``, ``bin`` or None. Valid splits are half as big."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    spm_model = train_sentencepiece(data_dir, SENTENCES)
    write_config(data_dir, spm_model)

    def features_for(sentence: str, index: int) -> np.ndarray:
        if real_speech:
            return espeak_features(sentence, speed=150 + 15 * (index % 4))
        return random_features(int(rng.integers(60, 200)), rng)

    for split in splits:
        scale = 1 if split == "train" else 2
        if speech:
            chosen = [SENTENCES[i % len(SENTENCES)] for i in range(num_speech // scale)]
            features = {f"{split}-speech-{i}": features_for(s, i) for i, s in enumerate(chosen)}
            write_manifest(data_dir / f"speech_{split}.tsv", speech_rows(data_dir, f"speech_{split}", features))
        if pair:
            chosen = [SENTENCES[(i + 3) % len(SENTENCES)] for i in range(num_pairs // scale)]
            features = {f"{split}-pair-{i}": features_for(s, i) for i, s in enumerate(chosen)}
            transcripts = {f"{split}-pair-{i}": s for i, s in enumerate(chosen)}
            write_manifest(data_dir / f"pair_{split}.tsv",
                           speech_rows(data_dir, f"pair_{split}", features, transcripts))
        lines = [SENTENCES[(i + 5) % len(SENTENCES)] for i in range(num_text // scale)]
        if text == "txt":
            (data_dir / f"text_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        elif text == "bin":
            write_indexed_text(data_dir / f"text_{split}", encode_with_dictionary(spm_model, lines))
    return data_dir


# -- running fairseq ------------------------------------------------------------------------------
_WRAPPER = ("import sys; sys.path.insert(0, {tests!r}); import pretraining_fixtures as f; "
            "f.register_stand_in_criterion(); from fairseq_cli.{module} import cli_main; "
            "sys.argv[0] = {program!r}; cli_main()")


def run_fairseq(args: Sequence[str], stand_in: bool, module: str = "train",
                cwd: Optional[Path] = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``fairseq-<module>`` (train or hydra_train) in a subprocess; with ``stand_in`` the
    stand-in criterion is registered first. Returns the finished process (output captured)."""
    if stand_in:
        wrapper = _WRAPPER.format(tests=str(TESTS_DIR), module=module, program=f"fairseq-{module}")
        command = [sys.executable, "-c", wrapper, *map(str, args)]
    else:
        command = [sys.executable, "-m", f"fairseq_cli.{module}", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, cwd=str(cwd or REPO_ROOT),
                          env=env, timeout=timeout)


# "| train_inner | {...}" (fairseq-train), "INFO:train_inner:{...}", "[...][train_inner][INFO] - {...}" (hydra)
_JSON_LINE = re.compile(r"(?<![\w.])(train_inner|train|valid)\W+(?:INFO\W+)?(\{\".*\})\s*$")


def json_log_records(output: str, kind: str = "train_inner") -> List[Dict[str, object]]:
    """The ``--log-format json`` records of one kind from fairseq's output."""
    records = []
    for line in output.splitlines():
        match = _JSON_LINE.search(line)
        if match and match.group(1) == kind:
            records.append(json.loads(match.group(2)))
    return records


def criterion_registered(name: str) -> bool:
    """Whether the user dir registers criterion ``name`` (imports slam_fairseq)."""
    import slam_fairseq  # noqa: F401
    from fairseq.criterions import CRITERION_REGISTRY

    return name in CRITERION_REGISTRY


# -- the stand-in criterion ------------------------------------------------------------------------
def register_stand_in_criterion() -> None:
    """Register ``pretraining_stand_in`` with fairseq (once per process)."""
    import torch
    import torch.nn.functional as F
    from fairseq import metrics
    from fairseq.criterions import CRITERION_REGISTRY, FairseqCriterion, register_criterion
    from fairseq.dataclass import FairseqDataclass

    if STAND_IN_CRITERION in CRITERION_REGISTRY:
        return

    @register_criterion(STAND_IN_CRITERION, dataclass=FairseqDataclass)
    class StandInCriterion(FairseqCriterion):
        """Masked prediction over ``model.encoder``: text/TLM tokens by the tied embedding, masked
        speech frames by regression onto the unmasked subsampled frames, STM by the pooled output."""

        def __init__(self, task) -> None:
            super().__init__(task)
            self.padding_idx = task.source_dictionary.pad()

        def _token_loss(self, encoder, hidden, target):
            weight = encoder.text_encoder.embed_tokens.weight
            picked = target.ne(self.padding_idx)
            if not picked.any():
                return hidden.sum() * 0
            return F.cross_entropy(hidden[picked] @ weight.t(), target[picked])

        def forward(self, model, sample):
            losses = {}
            if "speech" in sample:
                batch = sample["speech"]
                speech, joint = model.encoder.encode_speech(batch["features"], batch["feature_lengths"],
                                                            batch["frame_mask"])
                masked = batch["frame_mask"]
                losses["speech_loss"] = F.mse_loss(joint.output[masked], speech.subsampled.detach()[masked])
            if "text" in sample:
                batch = sample["text"]
                joint = model.encoder.encode_text(batch["tokens"])
                losses["text_loss"] = self._token_loss(model.encoder, joint.output, batch["target"])
            if "pair" in sample:
                batch = sample["pair"]
                _, joint = model.encoder.encode_pair(batch["features"], batch["feature_lengths"],
                                                     batch["tokens"], batch["frame_mask"])
                losses["tlm_loss"] = self._token_loss(model.encoder, joint.text_part(), batch["target"])
                texts = batch["clean_tokens"][batch["stm_text_index"]]
                _, matched = model.encoder.encode_pair(batch["features"], batch["feature_lengths"], texts)
                keep = (~matched.padding_mask).unsqueeze(-1).to(matched.output.dtype)
                pooled = (matched.output * keep).sum(1) / keep.sum(1)
                losses["stm_loss"] = F.binary_cross_entropy_with_logits(
                    pooled.mean(-1), batch["stm_label"].to(pooled.dtype))
            loss = sum(losses.values())
            logging_output = {"loss": float(loss.detach()), "sample_size": 1}
            logging_output.update({key: float(value.detach()) for key, value in losses.items()})
            return loss, 1, logging_output

        @staticmethod
        def reduce_metrics(logging_outputs) -> None:
            outputs = [log for log in logging_outputs if log]
            count = max(1, len(outputs))
            metrics.log_scalar("loss", sum(log.get("loss", 0.0) for log in outputs) / count, count, round=6)
            for key in ("speech_loss", "text_loss", "tlm_loss", "stm_loss"):
                values = [log[key] for log in outputs if key in log]
                if values:
                    metrics.log_scalar(key, sum(values) / len(values), len(values), round=6)

        @staticmethod
        def logging_outputs_can_be_summed() -> bool:
            return False
