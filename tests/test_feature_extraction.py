"""Feature extraction: layer states (values against the encoder's own passes, padding invariance),
the ``.npy`` row writer, and ``slam-fairseq-extract-features`` on a checkpoint written by a real
``fairseq-train`` run (outputs against the states computed here, shards, bad rows, resumption,
normalisation from the checkpoint's data, wav2vec lists, fine-tuned checkpoints)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretraining_fixtures as fixtures  # noqa: E402
from s2t_fixtures import build_slam_model, save_fairseq_checkpoint  # noqa: E402
from test_encoder import tiny_encoder  # noqa: E402

from slam_fairseq.data.pretraining.config import utterance_cmvn  # noqa: E402
from slam_fairseq.encoders.layer_states import num_encoder_layers  # noqa: E402
from slam_fairseq.feature_extraction.checkpoint_encoder import load_checkpoint_encoder  # noqa: E402
from slam_fairseq.feature_extraction import outputs as outputs_module  # noqa: E402
from slam_fairseq.feature_extraction.inputs import InputRow, InputShard, read_input_shard  # noqa: E402
from slam_fairseq.feature_extraction.outputs import OutputConflictError, ShardOutputs  # noqa: E402
from slam_formats.features import compute_fbank, read_features  # noqa: E402
from slam_formats.manifest import read_s2t_manifest, write_s2t_manifest  # noqa: E402
from slam_formats.npy_rows import NpyRowWriter, _header  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRAM = "slam-fairseq-extract-features"


# -- layer states ---------------------------------------------------------------------------------
def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([61, 40, 9])
    return torch.randn(3, 61, 80, generator=generator), lengths


@torch.no_grad()
def test_layer_states_are_the_encoder_passes_layer_by_layer():
    encoder = tiny_encoder(speech_encoder_layers=2, multimodal_encoder_layers=3)
    features, lengths = _batch()
    last = num_encoder_layers(encoder.speech_encoder, encoder.multimodal_encoder)
    assert last == 5
    result = encoder.layer_states(features, lengths, list(range(last + 1)))
    speech, joint = encoder.encode_speech(features, lengths)
    mask = joint.padding_mask
    assert torch.equal(result.padding_mask, mask)
    # the last layer is the encoder output fine-tuning reads, bit for bit; the default layer too
    assert torch.equal(result.states[last], joint.output)
    output, padding_mask = encoder.extract_features(features, lengths)
    assert torch.equal(output, joint.output) and torch.equal(padding_mask, mask)
    # layer 0 is the subsampling's output, layer N the speech stack's (its projection is the speech output)
    subsampled, _ = encoder.speech_encoder.subsample(features, lengths)
    assert torch.equal(result.states[0], subsampled.masked_fill(mask.unsqueeze(-1), 0.0))
    projected = encoder.speech_encoder.output_projection(result.states[2]).masked_fill(mask.unsqueeze(-1), 0.0)
    assert torch.allclose(projected, speech.output, atol=1e-6)
    # inner layers: the first k layers of each stack, run by hand
    hidden = subsampled
    for k, layer in enumerate(encoder.speech_encoder.conformer.layers, start=1):
        hidden = layer(hidden, mask, *_layer_inputs(encoder.speech_encoder.conformer, hidden, mask))
        assert torch.allclose(result.states[k], hidden.masked_fill(mask.unsqueeze(-1), 0.0), atol=1e-6), k
    hidden = encoder.multimodal_encoder.mark_speech(speech.output).masked_fill(mask.unsqueeze(-1), 0.0)
    for k, layer in enumerate(encoder.multimodal_encoder.conformer.layers, start=3):
        hidden = layer(hidden, mask, *_layer_inputs(encoder.multimodal_encoder.conformer, hidden, mask))
        assert torch.allclose(result.states[k], hidden.masked_fill(mask.unsqueeze(-1), 0.0), atol=1e-6), k
    for state in result.states.values():
        assert not state[mask].any()  # zero at padding


def _layer_inputs(stack, hidden, mask):
    from slam_fairseq.modules.attention import attention_bias

    return (attention_bias(mask), stack.layers[0].attention.rotary.tables(hidden.shape[1], hidden.device),
            stack.layers[0].convolution.norm.frames(mask))


@torch.no_grad()
def test_layer_states_of_a_row_are_the_same_alone_and_in_a_padded_batch():
    encoder = tiny_encoder(speech_encoder_layers=2, multimodal_encoder_layers=2)
    features, lengths = _batch(1)
    layers = [0, 1, 2, 3, 4]
    batched = encoder.layer_states(features, lengths, layers)
    for row, length in enumerate(lengths.tolist()):
        alone = encoder.layer_states(features[row:row + 1, :length], lengths[row:row + 1], layers)
        frames = int((~alone.padding_mask).sum())
        for layer in layers:
            assert torch.allclose(batched.states[layer][row, :frames], alone.states[layer][0], atol=1e-5), (row, layer)


@torch.no_grad()
def test_only_the_layers_up_to_the_deepest_asked_for_run_and_unknown_layers_are_refused():
    encoder = tiny_encoder(speech_encoder_layers=2, multimodal_encoder_layers=2)
    features, lengths = _batch()
    calls = []
    for layer in [*encoder.speech_encoder.conformer.layers, *encoder.multimodal_encoder.conformer.layers]:
        layer.register_forward_hook(lambda module, inputs, output: calls.append(module))
    encoder.layer_states(features, lengths, [1])
    assert len(calls) == 1
    calls.clear()
    encoder.layer_states(features, lengths, [3, 0])
    assert len(calls) == 3
    with pytest.raises(ValueError, match=r"layer\(s\) \[5, 9\] do not exist: this encoder has layers 0 .* to 4"):
        encoder.layer_states(features, lengths, [9, 5, 2])


@torch.no_grad()
def test_a_fine_tuned_encoder_extracts_what_its_decoder_reads():
    from slam_fairseq.models.slam_s2t import SlamSpeechEncoder

    fine_tuned = SlamSpeechEncoder(tiny_encoder(), output_dim=16).eval()
    features, lengths = _batch()
    output, padding_mask = fine_tuned.extract_features(features, lengths)
    encoder_out = fine_tuned(features, lengths)
    assert torch.equal(padding_mask, encoder_out["encoder_padding_mask"][0])
    assert torch.equal(output, encoder_out["slam_encoder_out"][0].transpose(0, 1).masked_fill(
        padding_mask.unsqueeze(-1), 0.0))
    # an utterance under 7 frames is extended as the decoder's input is: one state
    short, short_lengths = features[:1, :5], torch.tensor([5])
    output, padding_mask = fine_tuned.extract_features(short, short_lengths)
    assert output.shape[1] == 1 and torch.equal(output[:, 0], fine_tuned(short, short_lengths)["slam_encoder_out"][0][0])


# -- the .npy writer ------------------------------------------------------------------------------
def test_npy_rows_round_trip_and_an_aborted_file_never_appears(tmp_path):
    blocks = [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((0, 3)), -np.ones((4, 3))]
    with NpyRowWriter(str(tmp_path / "a.npy"), 3) as writer:
        for block in blocks:
            writer.append(block)
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert loaded.dtype == np.float32 and np.array_equal(loaded, np.concatenate(blocks))
    with NpyRowWriter(str(tmp_path / "half.npy"), 2, np.float16) as writer:
        writer.append(np.full((3, 2), 0.5))
    assert np.load(tmp_path / "half.npy").dtype == np.float16
    with pytest.raises(ValueError, match=r"a block of shape \(2, 4\), expected \(rows, 3\)"):
        with NpyRowWriter(str(tmp_path / "bad.npy"), 3) as writer:
            writer.append(np.zeros((1, 3)))
            writer.append(np.zeros((2, 4)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "half.npy"]
    # the header keeps its size for any count, so it can be rewritten in place
    assert len(_header(np.dtype(np.float32), 0, 1024)) == len(_header(np.dtype(np.float16), 10 ** 15, 1024)) == 128


def test_rows_are_batched_longest_first_within_the_frame_budget():
    from slam_fairseq.feature_extraction.encoding import length_sorted_batches

    lengths = [50, 900, 120, 880, 60, 3000, 130]
    batches = length_sorted_batches(lengths, 2000)
    assert batches == [[5], [1, 3], [6, 2, 4, 0]]  # a row over the budget alone; similar lengths together
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    for batch in batches[1:]:
        assert max(lengths[i] for i in batch) * len(batch) <= 2000


# -- the command, on a checkpoint of a real fairseq-train run -------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, checkpoint) of 2 updates of slam_tiny (utterance CMVN: the config names no statistics)."""
    root = tmp_path_factory.mktemp("extract")
    data_dir = fixtures.build_data_dir(root / "data", real_speech=False, num_speech=8)
    run = fixtures.run_fairseq(
        [str(data_dir), "--user-dir", str(REPO_ROOT / "slam_fairseq"), "--task", "slam_pretraining",
         "--arch", "slam_tiny", "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3",
         "--batch-size", "8", "--max-sentences-speech", "2", "--max-sentences-text", "4",
         "--max-sentences-pair", "3", "--stage2-start-update", "1", "--max-update", "2",
         "--save-dir", str(root / "checkpoints"), "--no-epoch-checkpoints", "--cpu", "--seed", "7",
         "--ddp-backend", "legacy_ddp"], stand_in=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return data_dir, root / "checkpoints" / "checkpoint_last.pt"


def _extract(*args, check: bool = True) -> subprocess.CompletedProcess:
    program = shutil.which(PROGRAM)
    assert program, f"{PROGRAM} is not installed (pip install -e .)"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = subprocess.run([program, *map(str, args), "--cpu"], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _read_layer(directory: Path, stem: str):
    states = np.load(directory / f"{stem}.npy", mmap_mode="r")
    lengths = [int(line) for line in (directory / f"{stem}.len").read_text().split()]
    ids = (directory / f"{stem}.ids").read_text().split()
    assert sum(lengths) == len(states) and len(lengths) == len(ids)
    return dict(zip(ids, np.split(np.asarray(states), np.cumsum(lengths)[:-1])))


@torch.no_grad()
def _expected(checkpoint: Path, features: np.ndarray, layers):
    encoder = load_checkpoint_encoder(str(checkpoint)).encoder
    result = encoder.layer_states(torch.from_numpy(features)[None], torch.tensor([len(features)]), layers)
    return {layer: state[0].numpy() for layer, state in result.states.items()}


def test_extracts_the_checkpoints_layers_for_every_row_in_hubert_s_layout(trained, tmp_path):
    data_dir, checkpoint = trained
    manifest = data_dir / "speech_train.tsv"
    _extract(checkpoint, manifest, tmp_path / "out", "--layer", "4", "0", "2", "--max-frames", "600")
    rows = read_s2t_manifest(str(manifest))
    summary = json.loads((tmp_path / "out" / "speech_train_0_1.json").read_text())
    assert summary["counts"]["with_states"] == summary["counts"]["rows"] == len(rows) == 8
    assert summary["layers"] == [0, 2, 4]
    assert "utterance-level" in summary["normalization"]
    for layer in (0, 2, 4):
        by_id = _read_layer(tmp_path / "out" / f"layer{layer}", "speech_train_0_1")
        assert list(by_id) == [row["id"] for row in rows]
        for row in rows:
            features = utterance_cmvn(read_features(row["audio"], str(data_dir)))
            expected = _expected(checkpoint, features, [layer])[layer]
            assert by_id[row["id"]].shape == expected.shape == (len(expected), 64)
            assert np.allclose(by_id[row["id"]], expected, atol=1e-5), (layer, row["id"])


def test_shards_cut_the_rows_in_order_and_a_done_shard_is_not_redone(trained, tmp_path):
    data_dir, checkpoint = trained
    manifest = data_dir / "speech_train.tsv"
    _extract(checkpoint, manifest, tmp_path / "whole", "--layer", "3")
    whole = _read_layer(tmp_path / "whole" / "layer3", "speech_train_0_1")
    parts = {}
    for shard in range(3):
        _extract(checkpoint, manifest, tmp_path / "shards", "--layer", "3", "--shard", shard, "--num-shards", 3)
        parts.update(_read_layer(tmp_path / "shards" / "layer3", f"speech_train_{shard}_3"))
    assert list(parts) == list(whole)
    assert all(np.allclose(parts[key], whole[key], atol=1e-5) for key in whole)
    written = tmp_path / "shards" / "layer3" / "speech_train_1_3.npy"
    before = written.stat().st_mtime_ns
    again = _extract(checkpoint, manifest, tmp_path / "shards", "--layer", "3", "--shard", 1, "--num-shards", 3)
    assert "already done with the same settings" in again.stdout and written.stat().st_mtime_ns == before
    _extract(checkpoint, manifest, tmp_path / "shards", "--layer", "3", "--shard", 1, "--num-shards", 3,
             "--dtype", "float16")
    assert np.load(written).dtype == np.float16  # other settings: done again
    # the manifest written again (other rows): done again, not taken from the old files
    copy = tmp_path / "speech_train.tsv"
    write_s2t_manifest(str(copy), [dict(row, audio=str(data_dir / row["audio"]))
                                   for row in read_s2t_manifest(str(manifest))])
    _extract(checkpoint, copy, tmp_path / "moving", "--layer", "3")
    write_s2t_manifest(str(copy), [dict(row, audio=str(data_dir / row["audio"]))
                                   for row in read_s2t_manifest(str(manifest))[:2]])
    redone = _extract(checkpoint, copy, tmp_path / "moving", "--layer", "3")
    assert "already done" not in redone.stdout
    assert len(_read_layer(tmp_path / "moving" / "layer3", "speech_train_0_1")) == 2


def test_rows_without_states_keep_their_place_with_length_zero_and_are_listed(trained, tmp_path):
    data_dir, checkpoint = trained
    rows = read_s2t_manifest(str(data_dir / "speech_train.tsv"))[:3]
    np.save(data_dir / "short.npy", np.random.default_rng(0).normal(size=(5, 80)).astype(np.float32))
    rows.insert(1, dict(rows[0], id="missing", audio="fbank/nowhere.npy"))
    rows.insert(3, dict(rows[0], id="short", audio="short.npy", n_frames="5"))
    manifest = data_dir / "with_bad_rows.tsv"
    write_s2t_manifest(str(manifest), rows)
    run = _extract(checkpoint, manifest, tmp_path / "out")
    stem = "with_bad_rows_0_1"
    skipped = (tmp_path / "out" / f"{stem}.skipped.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in skipped[1:]] == [["missing", "fbank/nowhere.npy"], ["short", "short.npy"]]
    assert "nowhere.npy" in skipped[1].split("\t")[2] and "under 7" in skipped[2].split("\t")[2]
    assert "2 of 5 rows have no states (1 unreadable, 1 under 7 frames, 0 failed)" in run.stdout
    # one entry per manifest row, in order, as HuBERT's label files need
    lengths = (tmp_path / "out" / "layer4" / f"{stem}.len").read_text().split()
    assert (tmp_path / "out" / "layer4" / f"{stem}.ids").read_text().split() == [row["id"] for row in rows]
    assert [n == "0" for n in lengths] == [False, True, False, True, False]
    strict = _extract(checkpoint, manifest, tmp_path / "strict", "--strict", check=False)
    assert strict.returncode == 1
    assert f"{manifest}: row 'missing'" in strict.stdout and "nowhere.npy" in strict.stdout
    # nothing that looks like a result (only the hidden partial files a rerun resumes from)
    assert not [path for path in (tmp_path / "strict").rglob("*") if path.is_file() and not path.name.startswith(".")]
    too_many = _extract(checkpoint, manifest, tmp_path / "shards", "--num-shards", 6, "--shard", 5, check=False)
    assert too_many.returncode == 1 and "5 rows cannot make 6 shards" in too_many.stdout


def _progress_rows(out_dir: Path, stem: str) -> int:
    try:
        return json.loads((out_dir / f".{stem}.progress.json").read_text())["rows"]
    except (OSError, ValueError):
        return 0


def _stop_when(process: subprocess.Popen, ready, sig: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before it could be stopped: make the manifest longer"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=60)


def test_a_stopped_shard_resumes_after_its_last_finished_window(trained, tmp_path):
    data_dir, checkpoint = trained
    rows = read_s2t_manifest(str(data_dir / "speech_train.tsv"))
    manifest = data_dir / "long.tsv"
    long_rows = [dict(row, id=f"{row['id']}-{k}") for k in range(150) for row in rows]
    write_s2t_manifest(str(manifest), long_rows)
    out, stem = tmp_path / "out", "long_0_1"
    command = [shutil.which(PROGRAM), str(checkpoint), str(manifest), str(out), "--cpu", "--max-frames", "1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    logs = [tmp_path / f"run{k}.log" for k in range(3)]

    def start(log: Path) -> subprocess.Popen:
        return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, env=env)

    first = start(logs[0])  # killed outright once a window is recorded
    _stop_when(first, lambda: _progress_rows(out, stem) > 0, signal.SIGKILL)
    killed_at = _progress_rows(out, stem)
    assert not [path for path in out.rglob("*") if path.is_file() and not path.name.startswith(".")]
    second = start(logs[1])  # resumes, then stopped by SIGTERM further on
    _stop_when(second, lambda: _progress_rows(out, stem) > killed_at, signal.SIGTERM)
    assert second.returncode == 128 + signal.SIGTERM
    assert f"resuming at row {killed_at} of {len(long_rows)}" in logs[1].read_text()
    terminated_at = _progress_rows(out, stem)
    assert start(logs[2]).wait(timeout=600) == 0, logs[2].read_text()[-3000:]
    assert f"resuming at row {terminated_at} of {len(long_rows)}" in logs[2].read_text()
    assert 0 < killed_at < terminated_at < len(long_rows)

    # the same files as one uninterrupted run: every row once, in order, with its own states
    by_id = _read_layer(out / "layer4", stem)
    assert list(by_id) == [row["id"] for row in long_rows]
    expected = {row["id"]: _expected(checkpoint, utterance_cmvn(read_features(row["audio"], str(data_dir))), [4])[4]
                for row in rows}
    for row in long_rows:
        base = row["id"].rsplit("-", 1)[0]
        assert by_id[row["id"]].shape == expected[base].shape
        assert np.allclose(by_id[row["id"]], expected[base], atol=1e-5), row["id"]
    summary = json.loads((out / f"{stem}.json").read_text())
    frames = {row["id"]: len(read_features(row["audio"], str(data_dir))) for row in rows}
    assert summary["counts"]["with_states"] == len(long_rows) and summary["resumed_at_row"] == terminated_at
    assert summary["counts"]["input_frames"] == 150 * sum(frames.values())
    assert not list(out.rglob(".*"))  # the partial files are gone
    again = _extract(checkpoint, manifest, out, "--max-frames", "1000")
    assert "already done with the same settings" in again.stdout


def test_shard_outputs_resume_from_their_last_saved_progress(tmp_path):
    settings = {"manifest": "m.tsv", "layers": [1, 3]}
    states = [{layer: np.full((n, 2), 10 * k + layer, np.float32) for layer in (1, 3)} for k, n in enumerate([3, 0, 2, 4])]

    def write(outputs, indices):
        for k in indices:
            if k == 1:
                outputs.add_without_states("r1", "a1.wav", "unreadable\tfile")
            else:
                outputs.add(f"r{k}", states[k], f"a{k}.wav")

    straight = ShardOutputs(tmp_path / "straight", "s_0_1", [3, 1], 2, "float32", settings, resume=True)
    write(straight, range(4))
    straight.save_progress({"rows": 4})
    straight.close()
    stopped = ShardOutputs(tmp_path / "out", "s_0_1", [3, 1], 2, "float32", settings, resume=True)
    write(stopped, range(2))
    stopped.save_progress({"rows": 4, "done": 2})
    write(stopped, [2])  # written after the last record: dropped on resume
    stopped.suspend()
    assert not [path for path in (tmp_path / "out").rglob("*") if path.is_file() and not path.name.startswith(".")]
    other = ShardOutputs(tmp_path / "out", "s_0_1", [3, 1], 2, "float32", dict(settings, manifest="n.tsv"),
                         resume=True)
    assert other.rows_done == 0  # other settings start over
    other.suspend()
    resumed = ShardOutputs(tmp_path / "out", "s_0_1", [3, 1], 2, "float32", settings, resume=True)
    assert resumed.rows_done == 0  # the record of the stopped run went with the start-over above
    write(resumed, range(2))
    resumed.save_progress({"rows": 4, "done": 2})
    resumed.suspend()
    resumed = ShardOutputs(tmp_path / "out", "s_0_1", [3, 1], 2, "float32", settings, resume=True)
    assert resumed.rows_done == 2 and resumed.counts == {"rows": 4, "done": 2}
    assert ShardOutputs(tmp_path / "out2", "s_0_1", [1, 3], 2, "float32", settings, resume=True).rows_done == 0
    write(resumed, [2, 3])
    resumed.close()
    for layer in (1, 3):
        for suffix in ("npy", "len", "ids"):
            made, expected = (root / f"layer{layer}" / f"s_0_1.{suffix}" for root in (tmp_path / "out", tmp_path / "straight"))
            assert made.read_bytes() == expected.read_bytes(), (layer, suffix)
    assert (tmp_path / "out" / "s_0_1.skipped.tsv").read_text() == "id\taudio\tproblem\nr1\ta1.wav\tunreadable file\n"
    assert not [path.name for path in (tmp_path / "out").iterdir() if path.name.startswith(".")]
    # a partial file cut shorter than its record: started over, not resumed with a hole
    cut = ShardOutputs(tmp_path / "cut", "s_0_1", [1], 2, "float32", settings, resume=True)
    write(cut, [0])
    cut.save_progress({})
    cut.suspend()
    partial = tmp_path / "cut" / "layer1" / ".s_0_1.npy.partial"
    os.truncate(partial, partial.stat().st_size - 4)
    assert ShardOutputs(tmp_path / "cut", "s_0_1", [1], 2, "float32", settings, resume=True).rows_done == 0
    # a record whose counts cannot be read: started over, with nothing of it kept
    bad = ShardOutputs(tmp_path / "bad", "s_0_1", [1], 2, "float32", settings, resume=True)
    write(bad, [0])
    bad.save_progress({"rows": 1})
    bad.suspend()
    record_path = tmp_path / "bad" / ".s_0_1.progress.json"
    record_path.write_text(json.dumps(dict(json.loads(record_path.read_text()), counts=["rows"])))
    again = ShardOutputs(tmp_path / "bad", "s_0_1", [1], 2, "float32", settings, resume=True)
    assert again.rows_done == 0 and again.counts == {} and not record_path.exists()
    again.suspend()


class _Stopped(Exception):
    """Stands for a kill at a chosen point (the command unwinds as on SIGTERM)."""


def _stop(*args, **kwargs) -> None:
    raise _Stopped()


def _run(*argv) -> dict:
    """The command in this process (cheaper than a new one; the same code path)."""
    from slam_fairseq.feature_extraction.cli import build_parser, extract_features

    return extract_features(build_parser().parse_args([*map(str, argv), "--cpu"]))


def _data_config(data_dir: Path, into: Path, **keys) -> Path:
    """A data directory holding only a copy of ``data_dir``'s config.yaml with ``keys`` set."""
    into.mkdir(exist_ok=True)
    config = yaml.safe_load((data_dir / "config.yaml").read_text())
    (into / "config.yaml").write_text(yaml.safe_dump(dict(config, **keys)))
    return into


def _two_row_manifest(data_dir: Path, path: Path, first: int) -> Path:
    """Rows ``first`` and ``first + 1`` of the run's training manifest, with absolute audio paths."""
    rows = read_s2t_manifest(str(data_dir / "speech_train.tsv"))[first:first + 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_s2t_manifest(str(path), [dict(row, audio=str(data_dir / row["audio"])) for row in rows])
    return path


def test_a_same_named_manifest_is_refused_rather_than_replacing_the_other_s_outputs(trained, tmp_path, monkeypatch):
    data_dir, checkpoint = trained
    a = _two_row_manifest(data_dir, tmp_path / "a" / "train.tsv", 0)
    b = _two_row_manifest(data_dir, tmp_path / "b" / "train.tsv", 2)
    out = tmp_path / "out"
    monkeypatch.setattr(ShardOutputs, "close", _stop)  # a's run stopped: only its progress record names it
    with pytest.raises(_Stopped):
        _run(checkpoint, a, out, "--layer", "1")
    monkeypatch.undo()
    with pytest.raises(OutputConflictError) as refused:
        _run(checkpoint, b, out, "--layer", "1")
    assert str(a.resolve()) in str(refused.value) and str(b.resolve()) in str(refused.value)
    assert _run(checkpoint, a, out, "--layer", "1")["resumed_at_row"] == 2  # the same job still resumes
    written = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(OutputConflictError, match=r"train_0_1 of .*a/train.tsv.* for .*b/train.tsv"):
        _run(checkpoint, b, out, "--layer", "1")
    with pytest.raises(OutputConflictError, match=r"layers \[1\] there, \[2\] here"):
        _run(checkpoint, a, out, "--layer", "2")
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == written
    _run(checkpoint, b, out, "--layer", "1", "--overwrite")
    assert list(_read_layer(out / "layer1", "train_0_1")) == [row["id"] for row in read_s2t_manifest(str(b))]


def test_a_stopped_shard_starts_over_when_its_normalisation_statistics_changed(trained, tmp_path, monkeypatch):
    data_dir, checkpoint = trained
    data = _data_config(data_dir, tmp_path / "data", global_cmvn={"stats_npz_path": "cmvn.npz"})
    manifest = _two_row_manifest(data_dir, tmp_path / "train.tsv", 0)

    def argv(out: str):
        return checkpoint, manifest, tmp_path / out, "--data", data, "--layer", "1"

    def stopped_run(out: str) -> None:
        with monkeypatch.context() as patched:
            patched.setattr(ShardOutputs, "close", _stop)
            with pytest.raises(_Stopped):
                _run(*argv(out))

    np.savez(data / "cmvn.npz", mean=np.zeros(80, np.float32), std=np.ones(80, np.float32))
    stopped_run("same")
    stopped_run("changed")
    assert _run(*argv("same"))["resumed_at_row"] == 2  # unchanged statistics: resumed
    std = np.full(80, 2.0, np.float32)
    np.savez(data / "cmvn.npz", mean=np.zeros(80, np.float32), std=std)  # the same name, other statistics
    summary = _run(*argv("changed"))
    assert summary["resumed_at_row"] == 0
    assert [identity["path"] for identity in summary["resolved"]["data_files"]] == [
        str((data / "config.yaml").resolve()), str((data / "cmvn.npz").resolve())]
    row = read_s2t_manifest(str(manifest))[1]
    expected = _expected(checkpoint, read_features(row["audio"]) / std, [1])[1]
    assert np.allclose(_read_layer(tmp_path / "changed" / "layer1", "train_0_1")[row["id"]], expected, atol=1e-5)
    redone = _run(*argv("same"))  # done (after a resume) before the statistics changed: done again
    assert redone["resumed_at_row"] == 0 and redone["resolved"] == summary["resolved"]
    assert np.allclose(_read_layer(tmp_path / "same" / "layer1", "train_0_1")[row["id"]], expected, atol=1e-5)


def _write_rows(outputs: ShardOutputs, indices) -> None:
    """Rows of :func:`test_shard_outputs_resume_from_their_last_saved_progress`'s shape (row 1 without states)."""
    for k in indices:
        if k == 1:
            outputs.add_without_states("r1", "a1.wav", "unreadable")
        else:
            outputs.add(f"r{k}", {layer: np.full((3 + k, 2), 10 * k + layer, np.float32) for layer in (1, 3)},
                        f"a{k}.wav")


def _files(directory: Path):
    """Every file under ``directory`` but the summary (which names the directory), with its bytes."""
    return {path.relative_to(directory): path.read_bytes() for path in directory.rglob("*")
            if path.is_file() and path.name != "s_0_1.json"}


def test_a_shard_stopped_while_its_files_are_put_in_place_is_finished_not_redone(trained, tmp_path, monkeypatch):
    settings = {"manifest": "m.tsv"}
    straight = ShardOutputs(tmp_path / "straight", "s_0_1", [1, 3], 2, "float32", settings)
    _write_rows(straight, range(4))
    straight.save_progress({"rows": 4})
    straight.close({"note": "summary"})
    expected = _files(tmp_path / "straight")

    def stopped(out: Path, target, name: str, stop) -> None:
        outputs = ShardOutputs(out, "s_0_1", [1, 3], 2, "float32", settings, resume=True)
        _write_rows(outputs, range(4))
        outputs.save_progress({"rows": 4})
        with monkeypatch.context() as patched:
            patched.setattr(target, name, stop)
            with pytest.raises(_Stopped):
                outputs.close({"note": "summary"})
        outputs.suspend()

    real_close = NpyRowWriter.close
    closed = []

    def close_the_first_only(writer: NpyRowWriter) -> None:
        if closed:
            raise _Stopped()
        closed.append(writer.path)
        real_close(writer)

    # stopped inside close(), after the first layer's .npy is in place; then before the summary; then after it
    stopped(tmp_path / "in_close", NpyRowWriter, "close", close_the_first_only)
    stopped(tmp_path / "before_summary", outputs_module, "write_summary", _stop)
    stopped(tmp_path / "after_summary", outputs_module, "discard_progress", _stop)
    in_place = tmp_path / "in_close" / "layer1" / "s_0_1.npy"
    assert closed == [str(in_place)] and not (tmp_path / "in_close" / "layer3" / "s_0_1.npy").exists()
    before = in_place.stat().st_mtime_ns
    for case in ("in_close", "before_summary", "after_summary"):
        resumed = ShardOutputs(tmp_path / case, "s_0_1", [1, 3], 2, "float32", settings, resume=True)
        assert resumed.rows_done == 4 and resumed.counts == {"rows": 4}, case
        resumed.close({"note": "summary"})
        assert _files(tmp_path / case) == expected, case  # hidden files gone, as in the run never stopped
        summary = json.loads((tmp_path / case / "s_0_1.json").read_text())
        assert summary["note"] == "summary" and sorted(summary["files"]) == ["1", "3"], case
    assert in_place.stat().st_mtime_ns == before  # finished, not written again

    # the command: stopped after the summary, run again: done, and the record of progress it left is gone
    data_dir, checkpoint = trained
    manifest = _two_row_manifest(data_dir, tmp_path / "train.tsv", 0)
    out = tmp_path / "out"
    discard = outputs_module.discard_progress

    def stop_once_summarised(out_dir: Path, stem: str) -> None:
        if (out_dir / f"{stem}.json").exists():
            raise _Stopped()
        discard(out_dir, stem)

    with monkeypatch.context() as patched:
        patched.setattr(outputs_module, "discard_progress", stop_once_summarised)
        with pytest.raises(_Stopped):
            _run(checkpoint, manifest, out, "--layer", "1")
    assert (out / ".train_0_1.progress.json").exists() and (out / "train_0_1.json").exists()
    assert _run(checkpoint, manifest, out, "--layer", "1")["resumed_at_row"] == 0  # the done summary, not resumed
    assert not list(out.rglob(".*"))


def test_the_training_normalisation_is_read_from_the_run_s_data_or_given(trained, tmp_path):
    data_dir, checkpoint = trained
    # a copy of the data with global CMVN statistics, named by the checkpoint's run
    moved = tmp_path / "data"
    shutil.copytree(data_dir, moved)
    mean, std = np.linspace(-1, 1, 80).astype(np.float32), np.linspace(0.5, 2, 80).astype(np.float32)
    np.savez(moved / "cmvn.npz", mean=mean, std=std)
    fixtures.write_config(moved, moved / "spm_unigram60.model", cmvn_stats=moved / "cmvn.npz")
    state = torch.load(str(checkpoint), weights_only=False)
    state["cfg"]["task"]["data"] = str(tmp_path / "gone")
    moved_checkpoint = tmp_path / "moved.pt"
    torch.save(state, str(moved_checkpoint))
    manifest = moved / "speech_valid.tsv"
    refused = _extract(moved_checkpoint, manifest, tmp_path / "out", check=False)
    assert refused.returncode == 1
    assert str(tmp_path / "gone") in refused.stdout and "--data DIR" in refused.stdout
    _extract(moved_checkpoint, manifest, tmp_path / "out", "--data", moved, "--layer", "1")
    summary = json.loads((tmp_path / "out" / "speech_valid_0_1.json").read_text())
    assert summary["normalization"].startswith(f"global CMVN from {moved / 'cmvn.npz'}")
    row = read_s2t_manifest(str(manifest))[0]
    expected = _expected(checkpoint, (read_features(row["audio"], str(moved)) - mean) / std, [1])[1]
    by_id = _read_layer(tmp_path / "out" / "layer1", "speech_valid_0_1")
    assert np.allclose(by_id[row["id"]], expected, atol=1e-5)
    # named instead of read: no data directory needed
    _extract(moved_checkpoint, manifest, tmp_path / "named", "--normalization", "global", "--global-cmvn",
             moved / "cmvn.npz", "--layer", "1")
    assert np.allclose(_read_layer(tmp_path / "named" / "layer1", "speech_valid_0_1")[row["id"]], expected, atol=1e-5)


def _wavs(directory: Path, count: int = 3):
    rng = np.random.default_rng(4)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"spk/utt{index}.wav"
        (directory / "spk").mkdir(exist_ok=True)
        samples = (0.1 * rng.standard_normal(16000 // 2 + 1600 * index)).astype(np.float32)
        sf.write(str(directory / name), samples, 16000, subtype="PCM_16")
        names.append((name, len(samples)))
    return names


def test_a_wav2vec_list_of_audio_files_gives_the_states_of_their_log_mel_frames(trained, tmp_path):
    _, checkpoint = trained
    audio = tmp_path / "audio"
    names = _wavs(audio)
    listing = tmp_path / "train.tsv"
    listing.write_text(f"{audio}\n" + "".join(f"{name}\t{samples}\n" for name, samples in names))
    _extract(checkpoint, listing, tmp_path / "out", "--normalization", "utterance", "--layer", "2")
    by_id = _read_layer(tmp_path / "out" / "layer2", "train_0_1")
    assert list(by_id) == [name for name, _ in names]
    for name, _ in names:
        samples, _ = sf.read(str(audio / name), dtype="float32")
        expected = _expected(checkpoint, utterance_cmvn(compute_fbank(samples)), [2])[2]
        assert np.allclose(by_id[name], expected, atol=1e-5)


def test_audio_gets_the_mel_band_of_the_run_s_data_config_unless_one_is_given(trained, tmp_path, caplog):
    data_dir, checkpoint = trained
    data = tmp_path / "data"

    def record(band: float) -> None:
        _data_config(data_dir, data, feature_settings={"prep_librilight": {"mel_high_freq": band}})

    audio = tmp_path / "audio"
    names = _wavs(audio, count=2)
    listing = tmp_path / "train.tsv"
    listing.write_text(f"{audio}\n" + "".join(f"{name}\t{samples}\n" for name, samples in names))
    argv = (checkpoint, listing, tmp_path / "out", "--data", data, "--layer", "1")

    def assert_band(band: float) -> None:
        by_id = _read_layer(tmp_path / "out" / "layer1", "train_0_1")
        for name, _ in names:
            samples, _ = sf.read(str(audio / name), dtype="float32")
            expected = _expected(checkpoint, utterance_cmvn(compute_fbank(samples, high_freq=band)), [1])[1]
            assert np.allclose(by_id[name], expected, atol=1e-5), (name, band)

    record(4000.0)
    summary = _run(*argv, "--workers", "1")  # the band goes to the reading process too
    assert summary["mel_high_freq"] == 4000.0 and "feature_settings" in summary["resolved"]["mel_high_freq_from"]
    assert_band(4000.0)
    record(0.0)  # the data config changed: the done shard is redone with its band
    assert _run(*argv)["mel_high_freq"] == 0.0
    assert_band(0.0)
    caplog.set_level(logging.WARNING, logger="slam_fairseq.extract_features")
    summary = _run(*argv, "--mel-high-freq", "4000")  # given: it wins over the config's, with a warning
    assert summary["mel_high_freq"] == summary["settings"]["mel_high_freq"] == 4000.0
    assert_band(4000.0)
    assert "--mel-high-freq 4000 differs from the 0 Hz that" in caplog.text and str(data / "config.yaml") in caplog.text


def test_audio_of_two_channels_is_listed_unreadable_or_averaged_with_downmix(trained, tmp_path):
    _, checkpoint = trained
    audio = tmp_path / "audio"
    names = _wavs(audio, count=2)
    rng = np.random.default_rng(5)
    stereo = (0.1 * rng.standard_normal((12000, 2))).astype(np.float32)
    sf.write(str(audio / "spk" / "stereo.wav"), stereo, 16000, subtype="PCM_16")
    names.append(("spk/stereo.wav", len(stereo)))
    listing = tmp_path / "train.tsv"
    listing.write_text(f"{audio}\n" + "".join(f"{name}\t{samples}\n" for name, samples in names))
    refused = _extract(checkpoint, listing, tmp_path / "out", "--normalization", "utterance", "--layer", "1")
    assert "spk/stereo.wav: 2 channels, expected mono (--downmix averages them)" in refused.stdout + refused.stderr
    skipped = (tmp_path / "out" / "train_0_1.skipped.tsv").read_text()
    assert "spk/stereo.wav" in skipped and "2 channels" in skipped
    _extract(checkpoint, listing, tmp_path / "out", "--normalization", "utterance", "--layer", "1", "--downmix")
    by_id = _read_layer(tmp_path / "out" / "layer1", "train_0_1")
    samples, _ = sf.read(str(audio / "spk" / "stereo.wav"), dtype="float32")
    expected = _expected(checkpoint, utterance_cmvn(compute_fbank(samples.mean(axis=1))), [1])[1]
    assert np.allclose(by_id["spk/stereo.wav"], expected, atol=1e-5)


def test_a_fine_tuned_checkpoint_uses_its_speech_to_text_evaluation_transforms(tmp_path):
    import yaml

    model, cfg = build_slam_model(seed=2)
    state = {key: value for key, value in model.state_dict().items()
             if key.startswith(("encoder.speech_encoder.", "encoder.multimodal_encoder."))}
    state["encoder.output_projection.weight"] = torch.zeros(16, cfg.encoder_embed_dim)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    mean, std = np.full(80, 2.0, np.float32), np.full(80, 4.0, np.float32)
    np.savez(data_dir / "gcmvn.npz", mean=mean, std=std)
    (data_dir / "config_asr.yaml").write_text(yaml.safe_dump({
        "input_feat_per_channel": 80, "global_cmvn": {"stats_npz_path": str(data_dir / "gcmvn.npz")},
        "transforms": {"_train": ["global_cmvn", "specaugment"], "*": ["global_cmvn", "specaugment"]},
        "specaugment": {"freq_mask_F": 27, "freq_mask_N": 2, "time_mask_N": 2, "time_mask_T": 40,
                        "time_mask_p": 1.0, "time_wrap_W": 0}}))
    checkpoint = save_fairseq_checkpoint(tmp_path / "fine_tuned.pt", state,
                                         dict(dataclasses.asdict(cfg), _name="slam_s2t_tiny"), "speech_to_text")
    saved = torch.load(str(checkpoint), weights_only=False)
    saved["cfg"]["task"].update(data=str(data_dir), config_yaml="config_asr.yaml")
    torch.save(saved, str(checkpoint))
    names = _wavs(tmp_path / "audio", count=2)
    manifest = tmp_path / "audio" / "test.tsv"
    write_s2t_manifest(str(manifest), [{"id": f"u{i}", "audio": name, "n_frames": samples // 160, "tgt_text": "x",
                                        "speaker": "s"} for i, (name, samples) in enumerate(names)])
    _extract(checkpoint, manifest, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "test_0_1.json").read_text())
    # SpecAugment is random: never applied to extracted features, even where the config asks for it
    assert summary["normalization"] == (f"GlobalCMVN from {data_dir / 'config_asr.yaml'} "
                                        "(left out: SpecAugmentTransform)")
    by_id = _read_layer(tmp_path / "out" / "layer4", "test_0_1")
    for index, (name, _) in enumerate(names):
        samples, _ = sf.read(str(tmp_path / "audio" / name), dtype="float32")
        expected = _expected(checkpoint, (compute_fbank(samples) - mean) / std, [4])[4]
        assert np.allclose(by_id[f"u{index}"], expected, atol=1e-5)


# -- edges: memory, precision, lists ----------------------------------------------------------------
class _OutOfMemoryForBatches(torch.nn.Module):
    """An encoder whose batches of more than one row run out of memory, and rows over 60 frames too."""

    embed_dim = 4

    def layer_states(self, features, lengths, layers):
        from slam_fairseq.encoders.layer_states import LayerStates

        if len(features) > 1 or int(lengths.max()) > 60:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        frames = int(lengths[0]) // 4
        return LayerStates({layer: torch.full((1, frames, 4), float(int(lengths[0]))) for layer in layers},
                           torch.zeros(1, frames, dtype=torch.bool))


def test_a_batch_out_of_memory_runs_row_by_row_and_a_row_too_long_alone_is_reported():
    from slam_fairseq.feature_extraction.encoding import encode_window

    window = [np.zeros((40, 80), np.float32), None, np.zeros((80, 80), np.float32), np.zeros((20, 80), np.float32)]
    results = list(encode_window(_OutOfMemoryForBatches(), window, [3], 10_000, torch.device("cpu")))
    assert [r.problem is None for r in results] == [True, True, False, True]
    assert results[0].states[3].shape == (10, 4) and float(results[0].states[3][0, 0]) == 40
    assert results[1].states[3].shape == (0, 4) and results[3].states[3].shape == (5, 4)
    assert results[2].problem == "out of memory at 80 frames (alone)"


def test_float16_storage_refuses_values_beyond_its_range_and_a_killed_writer_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match=r"values beyond float16's range \(largest magnitude 1e\+05\)"):
        with NpyRowWriter(str(tmp_path / "h.npy"), 2, np.float16) as writer:
            writer.append(np.array([[1.0, 1e5]]))
    assert not list(tmp_path.iterdir())
    NpyRowWriter(str(tmp_path / "k.npy"), 2).append(np.ones((3, 2)))  # "killed": never closed
    assert [p.name for p in tmp_path.iterdir()] == [".k.npy.partial"]
    with NpyRowWriter(str(tmp_path / "k.npy"), 2) as writer:  # the next run of the same file
        writer.append(np.zeros((1, 2)))
    assert [p.name for p in tmp_path.iterdir()] == ["k.npy"] and np.load(tmp_path / "k.npy").shape == (1, 2)


def test_named_global_statistics_must_fit_the_encoder_and_lists_are_checked(tmp_path):
    from slam_fairseq.feature_extraction.checkpoint_encoder import CheckpointError, named_feature_transform
    from slam_fairseq.feature_extraction.inputs import read_input_shard, shard_range
    from slam_formats.manifest import ManifestError

    np.savez(tmp_path / "cmvn40.npz", mean=np.zeros(40), std=np.ones(40))
    with pytest.raises(CheckpointError, match=r"cmvn40.npz: CMVN mean/std of shapes \(40,\)/\(40,\), expected \(80,\)"):
        named_feature_transform("global", str(tmp_path / "cmvn40.npz"), feature_dim=80)
    listing = tmp_path / "train.tsv"
    listing.write_text("/audio\r\n a/1.flac\t16000\r\n\r\nb/2.flac\t8000\r\n")
    shard = read_input_shard(str(listing))
    assert [row.id for row in shard.rows] == ["a/1.flac", "b/2.flac"] and str(shard.root) == "/audio"
    listing.write_text("/audio\na/1.flac\t16000\nb/2.flac\t8000\na/1.flac\t16000\n")
    with pytest.raises(ManifestError, match=r"train.tsv:4: id 'a/1.flac' again \(first on line 2\)"):
        read_input_shard(str(listing))
    # HuBERT's cut: shard k of K starts at round(N / K * k)
    assert shard_range(15, 22, 10) == (round(15 / 22 * 10), round(15 / 22 * 11))
    assert [shard_range(10, 3, k) for k in range(3)] == [(0, 3), (3, 7), (7, 10)]


def test_lists_saved_with_a_byte_order_mark_read_as_without_one(tmp_path):
    bom = "\ufeff".encode("utf-8")
    manifest = tmp_path / "test.tsv"
    manifest.write_bytes(bom + b"id\taudio\tn_frames\nu1\tfbank/u1.npy\t10\n")
    shard = read_input_shard(str(manifest))
    assert shard.kind == "s2t" and [(row.id, row.audio) for row in shard.rows] == [("u1", "fbank/u1.npy")]
    listing = tmp_path / "train.tsv"
    listing.write_bytes(bom + b"/audio\na/1.flac\t16000\n")
    shard = read_input_shard(str(listing))
    assert shard.kind == "wav2vec" and str(shard.root) == "/audio" and [row.id for row in shard.rows] == ["a/1.flac"]


def test_reading_processes_stay_about_a_window_ahead_of_a_slow_consumer(monkeypatch):
    import threading
    from multiprocessing.pool import ThreadPool

    from slam_fairseq.feature_extraction import cli

    started, lock = [0], threading.Lock()

    def counting_read(job):
        with lock:
            started[0] += 1
        return cli._RowRead(np.zeros((100, 80), np.float32))  # every row 100 frames

    monkeypatch.setattr(cli, "_read", counting_read)
    monkeypatch.setattr(cli, "_reading_pool", ThreadPool)  # the same submissions, without spawning processes
    rows = [InputRow(f"r{k}", f"a{k}.wav") for k in range(60)]
    inputs = InputShard(Path("m.tsv"), rows, 0, len(rows), len(rows), Path("."), "s2t")
    reader = cli._RowReader(Path("."), 80, utterance_cmvn)
    ahead, seen = [], []
    for consumed, (row, read) in enumerate(cli._read_rows(inputs, reader, 2, window_frames=1000), start=1):
        time.sleep(0.003)  # a slow consumer: the readers would run through every row meanwhile
        with lock:
            ahead.append(started[0] - consumed)
        seen.append(row.id)
    assert seen == [row.id for row in rows] and started[0] == len(rows)
    assert 0 < max(ahead) <= 10  # a window of 1000 frames is 10 rows of 100
