"""Frozen-feature linear CTC probe: how much of the transcript a feature extractor's output carries.

Only one linear layer (feature width -> characters + blank) is trained, with CTC, for a fixed number
of steps on the train split; the features are computed once, with the extractor frozen. Greedy
(best-path) CTC decoding of dev and test gives CER and WER. Three kinds of extractor:

- ``slam:CHECKPOINT``: the SLAM encoder of a ``slam`` (pre-training) or ``slam_s2t`` (fine-tuned)
  checkpoint, speech encoder + multimodal encoder, its output states (4x subsampled frames);
- ``random:CHECKPOINT``: an encoder of the same shape, freshly initialised (``--seed``);
- ``logmel``: the log-Mel frames themselves (after the data config's CMVN), 4 consecutive frames
  stacked, so that the linear layer sees the same frame rate as the encoders' output.

Every feature dimension is standardised with the train split's mean and deviation, so the probe's
learning rate means the same for each extractor.

    python examples/realspeech/probe.py --data DATA/asr --out probe.json \\
        --extractor slam_pretrained=slam:ckpt.pt --extractor log_mel_stack4=logmel \\
        --extractor random_encoder=random:ckpt.pt
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["Utterance", "CharacterVocabulary", "load_split", "LogMelStack", "SlamFeatures",
           "load_slam_encoder", "extract", "train_linear_ctc", "greedy_transcripts", "error_rates",
           "run_probe"]

BLANK = 0
STACK = 4  # the encoders' time reduction (two stride-2 convolutions)
# features (B, T, F) and lengths (B,) -> states (B, T', D) and lengths (B,)
Extractor = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Utterance:
    """One manifest row: id, (T, F) log-Mel features after the data config's transforms, transcript."""

    id: str
    features: torch.Tensor
    text: str


class CharacterVocabulary:
    """Characters of the train transcripts (space included); id 0 is the CTC blank."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.symbols = sorted({character for text in texts for character in text})
        self.index = {character: position + 1 for position, character in enumerate(self.symbols)}

    def __len__(self) -> int:
        return len(self.symbols) + 1

    def encode(self, text: str) -> List[int]:
        """Ids of the known characters of ``text`` (a character unseen in train cannot be emitted)."""
        return [self.index[character] for character in text if character in self.index]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.symbols[i - 1] for i in ids if i != BLANK)


def load_split(data_dir: Path, split: str, config: str = "config_asr.yaml",
               max_utterances: int = 0) -> List[Utterance]:
    """Rows of ``data_dir/<split>.tsv`` (fairseq S2T manifest) with their features, read and
    normalised the way fairseq's dataset does at evaluation (no SpecAugment)."""
    from fairseq.data.audio.audio_utils import get_features_or_waveform
    from fairseq.data.audio.data_cfg import S2TDataConfig
    from fairseq.data.audio.feature_transforms import CompositeAudioFeatureTransform

    manifest = data_dir / f"{split}.tsv"
    if not manifest.exists():
        raise FileNotFoundError(f"probe: {manifest}: no such manifest")
    data_config = S2TDataConfig(data_dir / config)
    transform = CompositeAudioFeatureTransform.from_config_dict(data_config.get_feature_transforms(split, False))
    utterances = []
    with open(manifest, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    for row in rows[: max_utterances or None]:
        missing = {"id", "audio", "tgt_text"} - set(row)
        if missing:
            raise ValueError(f"probe: {manifest}: columns {sorted(missing)} missing")
        features = get_features_or_waveform(str(data_dir / row["audio"]))
        if transform is not None:
            features = transform(features)
        utterances.append(Utterance(row["id"], torch.from_numpy(features).float(), row["tgt_text"]))
    if not utterances:
        raise ValueError(f"probe: {manifest}: no utterances")
    return utterances


class LogMelStack:
    """(B, T, F) frames -> (B, ceil(T / k), k F): k consecutive frames side by side (zero-padded)."""

    def __init__(self, factor: int = STACK) -> None:
        self.factor = factor

    def __call__(self, features: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        batch, frames, bins = features.shape
        padded = nn.functional.pad(features, (0, 0, 0, (-frames) % self.factor))
        stacked = padded.reshape(batch, -1, self.factor * bins)
        return stacked, torch.div(lengths + self.factor - 1, self.factor, rounding_mode="floor")


class SlamFeatures:
    """A SLAM encoder's output states for speech alone, in eval mode and without gradients."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder.eval()

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        joint = self.encoder.encode_speech(features, lengths)[1]
        return joint.output, (~joint.padding_mask).sum(dim=1)


def load_slam_encoder(checkpoint: Path, pretrained: bool = True, seed: int = 1) -> nn.Module:
    """The SLAM encoder of a ``slam`` or ``slam_s2t`` checkpoint, built with its sizes; with
    ``pretrained=False`` the same shape freshly initialised (seeded)."""
    from slam_fairseq.feature_extraction.checkpoint_encoder import load_checkpoint_encoder

    return load_checkpoint_encoder(str(checkpoint), pretrained=pretrained, seed=seed).encoder


@torch.no_grad()
def extract(extractor: Extractor, utterances: Sequence[Utterance], batch_size: int = 16) -> List[torch.Tensor]:
    """Each utterance's (T', D) states, batched by ``batch_size`` with zero padding (the extractor
    is frozen: no autograd graph)."""
    states = []
    for start in range(0, len(utterances), batch_size):
        chunk = utterances[start:start + batch_size]
        lengths = torch.tensor([u.features.shape[0] for u in chunk])
        padded = nn.utils.rnn.pad_sequence([u.features for u in chunk], batch_first=True)
        output, output_lengths = extractor(padded, lengths)
        states += [output[row, :int(length)].float() for row, length in enumerate(output_lengths)]
    return states


def _pad(states: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return nn.utils.rnn.pad_sequence(list(states), batch_first=True), torch.tensor([s.shape[0] for s in states])


def train_linear_ctc(states: Sequence[torch.Tensor], targets: Sequence[List[int]], num_labels: int,
                     steps: int, batch_size: int = 32, lr: float = 1e-2, seed: int = 1) -> nn.Module:
    """A linear CTC layer trained for ``steps`` Adam steps on random mini-batches.

    Args:
        states: per utterance (T', D) standardised features.
        targets: per utterance label ids (blank excluded).
        num_labels: output size, blank included.
    Returns:
        ``nn.Linear(D, num_labels)`` (eval mode).
    """
    generator = random.Random(seed)
    torch.manual_seed(seed)
    usable = [i for i, target in enumerate(targets) if 0 < len(target) <= states[i].shape[0]]
    if not usable:
        raise ValueError("probe: no train utterance has a transcript its frames can spell")
    layer = nn.Linear(states[0].shape[1], num_labels)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    ctc = nn.CTCLoss(blank=BLANK, zero_infinity=True)
    for _ in range(steps):
        chosen = generator.sample(usable, min(batch_size, len(usable)))
        inputs, input_lengths = _pad([states[i] for i in chosen])
        labels = torch.cat([torch.tensor(targets[i]) for i in chosen])
        label_lengths = torch.tensor([len(targets[i]) for i in chosen])
        log_probs = layer(inputs).log_softmax(dim=-1).transpose(0, 1)  # (T', B, V) as CTCLoss wants
        loss = ctc(log_probs, labels, input_lengths, label_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return layer.eval()


@torch.no_grad()
def greedy_transcripts(layer: nn.Module, states: Sequence[torch.Tensor], vocabulary: CharacterVocabulary) -> List[str]:
    """Best-path CTC: each frame's most likely label, repeats merged, blanks dropped."""
    transcripts = []
    for sequence in states:
        best = layer(sequence).argmax(dim=-1).tolist()
        merged = [label for position, label in enumerate(best) if position == 0 or label != best[position - 1]]
        transcripts.append(" ".join(vocabulary.decode(merged).split()))
    return transcripts


def error_rates(hypotheses: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Corpus CER and WER in percent (edit distance over the reference length)."""
    import editdistance

    characters = sum(editdistance.eval(h, r) for h, r in zip(hypotheses, references))
    words = sum(editdistance.eval(h.split(), r.split()) for h, r in zip(hypotheses, references))
    return {"cer": 100.0 * characters / max(1, sum(len(r) for r in references)),
            "wer": 100.0 * words / max(1, sum(len(r.split()) for r in references)),
            "distinct": len(set(hypotheses)), "utterances": len(hypotheses)}


def run_probe(extractor: Extractor, splits: Dict[str, Sequence[Utterance]], steps: int,
              seed: int = 1, lr: float = 1e-2) -> Dict[str, Dict[str, float]]:
    """Train on ``splits["train"]``, return the error rates of every other split."""
    vocabulary = CharacterVocabulary([u.text for u in splits["train"]])
    features = {name: extract(extractor, utterances) for name, utterances in splits.items()}
    stacked = torch.cat(features["train"])
    mean, std = stacked.mean(dim=0), stacked.std(dim=0).clamp_min(1e-5)
    features = {name: [(s - mean) / std for s in states] for name, states in features.items()}
    layer = train_linear_ctc(features["train"], [vocabulary.encode(u.text) for u in splits["train"]],
                             len(vocabulary), steps, lr=lr, seed=seed)
    results = {}
    for name, utterances in splits.items():
        if name == "train":
            continue
        hypotheses = greedy_transcripts(layer, features[name], vocabulary)
        results[name] = error_rates(hypotheses, [" ".join(u.text.split()) for u in utterances])
        results[name]["example"] = f"{hypotheses[0]!r} for {utterances[0].text!r}"
    return results


def build_extractor(spec: str, seed: int) -> Extractor:
    """``logmel``, ``slam:PATH`` or ``random:PATH`` -> an extractor."""
    kind, _, path = spec.partition(":")
    if kind == "logmel" and not path:
        return LogMelStack()
    if kind in ("slam", "random") and path:
        return SlamFeatures(load_slam_encoder(Path(path), pretrained=kind == "slam", seed=seed))
    raise ValueError(f"probe: extractor {spec!r}: expected logmel, slam:CHECKPOINT or random:CHECKPOINT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="ASR data directory (<split>_asr.tsv, config)")
    parser.add_argument("--config-yaml", default="config_asr.yaml")
    parser.add_argument("--train-split", default="train_asr")
    parser.add_argument("--eval-splits", nargs="+", default=["dev_asr", "test_asr"])
    parser.add_argument("--extractor", action="append", required=True, metavar="NAME=KIND[:PATH]",
                        help="logmel, slam:CHECKPOINT or random:CHECKPOINT (repeat for several)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the linear layer")
    parser.add_argument("--max-utterances", type=int, default=0, help="first N rows of each split (0: all)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the linear layer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="JSON: extractor -> split -> cer, wer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = {"train": load_split(args.data, args.train_split, args.config_yaml, args.max_utterances)}
    for split in args.eval_splits:
        splits[split.replace("_asr", "")] = load_split(args.data, split, args.config_yaml, args.max_utterances)
    results = {}
    for spec in args.extractor:
        name, separator, kind = spec.partition("=")
        if not separator:
            raise SystemExit(f"probe: --extractor {spec!r}: expected NAME=KIND[:PATH]")
        results[name] = run_probe(build_extractor(kind, args.seed), splits, args.steps, args.seed, args.lr)
        print(name, json.dumps({split: {k: v for k, v in r.items() if k != "example"}
                                for split, r in results[name].items()}), flush=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
