"""``slam_s2t`` through fairseq's own command-line tools, as the recipes run them.

- a few updates: fairseq-train from a pre-trained SLAM checkpoint with a frozen encoder, the CTC
  criterion and SpecAugment; checkpoint averaging; fairseq-generate loads the result and scores it
  with sacrebleu and WER (about 15 s).
- 300 updates: a multilingual (two language tags) speech translation fine-tune on espeak-ng speech
  that overfits; fairseq-generate --prefix-size 1 then decodes every utterance into its tag's
  language (about 30 s on one CPU thread).
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import pytest
import torch

import slam_fairseq  # noqa: F401  (as --user-dir: allow-lists fairseq's checkpoint types for torch.load)
from s2t_fixtures import (
    FRENCH_WORDS,
    GERMAN_WORDS,
    REPO_ROOT,
    USER_DIR,
    build_asr,
    build_multilingual_st,
    hypotheses,
    parse_bleu,
    parse_wer,
    recomputed_bleu,
    recomputed_wer,
    run_fairseq,
    save_slam_checkpoint,
    synthesize_features,
    train_losses,
)

ENCODER_PREFIXES = ("encoder.speech_encoder.", "encoder.multimodal_encoder.")
WER_OPTIONS = ("--scoring", "wer", "--wer-tokenizer", "13a", "--wer-lowercase", "--wer-remove-punct")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("slam_s2t_cli")
    features = synthesize_features(root)
    checkpoint, checkpoint_state = save_slam_checkpoint(root / "slam_tiny.pt", seed=7)
    return dict(root=root, features=features, asr=root / "asr", asr_task=build_asr(root / "asr", features),
                st=root / "st", st_task=build_multilingual_st(root / "st", features),
                checkpoint=checkpoint, checkpoint_state=checkpoint_state)


def train_command(data_dir, task_name: str, save_dir, *extra):
    return ("fairseq-train", data_dir, "--user-dir", USER_DIR, "--task", "speech_to_text",
            "--config-yaml", f"config_{task_name}.yaml", "--train-subset", f"train_{task_name}",
            "--valid-subset", f"train_{task_name}", "--save-dir", save_dir, "--max-tokens", "4000",
            "--required-batch-size-multiple", "1", "--num-workers", "0", "--log-format", "simple",
            "--no-progress-bar", "--seed", "1", "--optimizer", "adam", *extra)


def generate_command(data_dir, task_name: str, checkpoint, *extra):
    return ("fairseq-generate", data_dir, "--user-dir", USER_DIR, "--task", "speech_to_text",
            "--config-yaml", f"config_{task_name}.yaml", "--gen-subset", f"train_{task_name}",
            "--path", checkpoint, "--max-tokens", "4000", "--required-batch-size-multiple", "1",
            "--num-workers", "0", "--beam", "5", *extra)


def load_state(path):
    from fairseq import checkpoint_utils

    return checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_finetune_frozen_ctc_specaugment_average_and_generate(data, tmp_path):
    save_dir = tmp_path / "checkpoints"
    log = run_fairseq(*train_command(
        data["asr"], data["asr_task"], save_dir, "--arch", "slam_s2t_tiny",
        "--load-pretrained-slam-from", data["checkpoint"], "--freeze-encoder-updates", "3",
        "--criterion", "label_smoothed_cross_entropy_with_ctc", "--ctc-weight", "0.3", "--label-smoothing", "0.1",
        "--lr", "2e-3", "--max-update", "3", "--disable-validation", "--log-interval", "1")).stdout
    assert "pre-trained SLAM encoder from" in log and "encoder.text_encoder.*" in log
    ctc_losses = [float(value) for value in re.findall(r"\bctc_loss ([^ |]+)", log)]  # one per update, then the epoch's
    assert len(ctc_losses) >= 3 and all(math.isfinite(value) and value > 0 for value in ctc_losses), ctc_losses
    assert "SpecAugmentTransform(" in log  # the data config's SpecAugment is on for the train split

    last = load_state(save_dir / "checkpoint_last.pt")
    assert last["cfg"]["model"]["ctc_head"] is True  # switched on by the CTC criterion
    assert last["cfg"]["model"]["pretrained_slam_loaded"] is True
    assert last["optimizer_history"][-1]["num_updates"] == 3
    assert "ctc_projection.weight" in last["model"]
    for key, value in data["checkpoint_state"].items():
        if key.startswith(ENCODER_PREFIXES):
            assert torch.equal(last["model"][key], value), f"{key} moved during the frozen updates"

    averaged = tmp_path / "average.pt"
    subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "average_checkpoints.py"), "--inputs",
                    str(save_dir), "--num-epoch-checkpoints", "2", "--output", str(averaged)],
                   check=True, capture_output=True, text=True)
    newest = [load_state(save_dir / f"checkpoint{epoch}.pt")["model"] for epoch in (2, 3)]  # 1 update an epoch
    average_state = load_state(averaged)["model"]
    key = "decoder.layers.0.fc1.weight"
    torch.testing.assert_close(average_state[key], (newest[0][key] + newest[1][key]) / 2)

    wer_log = run_fairseq(*generate_command(data["asr"], data["asr_task"], save_dir / "checkpoint_last.pt",
                                            "--max-len-b", "30", *WER_OPTIONS)).stdout
    assert "not copying the pre-trained encoder" in wer_log  # --path supplies the weights
    results = hypotheses(wer_log)
    assert len(results) == len(data["features"])
    assert parse_wer(wer_log) == pytest.approx(recomputed_wer(results), abs=0.01)
    bleu_log = run_fairseq(*generate_command(data["asr"], data["asr_task"], averaged, "--max-len-b", "30",
                                             "--scoring", "sacrebleu")).stdout
    results = hypotheses(bleu_log)
    assert len(results) == len(data["features"])
    assert parse_bleu(bleu_log) == pytest.approx(recomputed_bleu(results), abs=0.01)

    # the target dictionary travels with the weights: one of the same size with two symbols
    # swapped (a SentencePiece model made again) is refused instead of decoding into other pieces
    assert torch.equal(average_state["target_dictionary_fingerprint"], last["model"]["target_dictionary_fingerprint"])
    swapped = tmp_path / "swapped"
    shutil.copytree(data["asr"], swapped)
    dictionary = swapped / "spm_unigram120_asr.txt"
    lines = dictionary.read_text(encoding="utf-8").splitlines()
    lines[20], lines[21] = lines[21], lines[20]
    dictionary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    refused = run_fairseq(*generate_command(swapped, data["asr_task"], averaged, "--max-len-b", "30"), check=False)
    assert refused.returncode != 0 and "DictionaryMismatchError" in refused.stdout
    assert "another target dictionary" in refused.stdout


def _language_of(words):
    german, french = len(set(words) & GERMAN_WORDS), len(set(words) & FRENCH_WORDS)
    return "de" if german > french else "fr" if french > german else None


def test_multilingual_finetune_overfits_and_decodes_each_tag_language(data, tmp_path):
    save_dir = tmp_path / "checkpoints"
    log = run_fairseq(*train_command(
        data["st"], data["st_task"], save_dir, "--arch", "slam_s2t_tiny",
        "--load-pretrained-slam-from", data["checkpoint"], "--criterion", "label_smoothed_cross_entropy",
        "--label-smoothing", "0.0", "--ignore-prefix-size", "1", "--dropout", "0.0",
        # the decoder first learns to read the (random) encoder, then everything trains
        "--freeze-encoder-updates", "60", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", "10", "--clip-norm", "5", "--max-update", "300", "--save-interval", "1000",
        "--no-epoch-checkpoints", "--disable-validation", "--log-interval", "50")).stdout
    losses = train_losses(log)
    assert len(losses) == 300 and losses[-1] < 0.1, losses[::50] + losses[-1:]

    checkpoint = save_dir / "checkpoint_last.pt"
    bleu_log = run_fairseq(*generate_command(data["st"], data["st_task"], checkpoint, "--prefix-size", "1",
                                             "--scoring", "sacrebleu")).stdout
    bleu = parse_bleu(bleu_log)
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} (bits/token), BLEU {bleu:.1f}")
    assert bleu > 90.0
    results = hypotheses(bleu_log)
    assert len(results) == 2 * len(data["features"])
    for reference, hypothesis in results.values():
        expected = _language_of(reference.split())
        assert expected is not None
        assert _language_of(hypothesis.split()) == expected, (reference, hypothesis)
    wer_log = run_fairseq(*generate_command(data["st"], data["st_task"], checkpoint, "--prefix-size", "1",
                                            *WER_OPTIONS)).stdout
    wer = parse_wer(wer_log)
    print(f"WER {wer:.2f}")
    assert wer < 10.0


def test_bf16_checkpoints_are_averaged_in_float32(tmp_path):
    """bf16 weights (8-bit mantissa) summed in bf16 lose the differences the average is made of."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("average_checkpoints", REPO_ROOT / "examples" / "average_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = [1.0, 1.0078125, 1.0078125, 1.0078125]  # bf16 neighbours of 1
    paths = []
    for index, value in enumerate(values):
        paths.append(str(tmp_path / f"checkpoint{index}.pt"))
        torch.save({"model": {"w": torch.full((3,), value, dtype=torch.bfloat16)}, "cfg": None}, paths[-1])
    averaged = module.average_checkpoints(paths)["model"]["w"]
    assert averaged.dtype == torch.float32
    torch.testing.assert_close(averaged, torch.full((3,), sum(values) / len(values)), rtol=0, atol=1e-6)
