"""``fairseq-train --tensorboard-logdir`` with the plugin writes TensorBoard event files.

A real ``fairseq-train --user-dir slam_fairseq --task slam_pretraining`` run (slam_tiny with pair CTC,
the ``slam_multitask`` criterion, 5 updates across the stage switch) logs every update as json and to
TensorBoard; the event files are read back as TFRecords (length and data CRCs checked) of
tensorboardX's ``Event`` protos, and their scalars must be the per-objective losses of the json log,
update by update, with the stage-2 objectives appearing at the stage switch.
"""
from __future__ import annotations

import math
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretraining_fixtures as fixtures  # noqa: E402

USER_DIR = str(fixtures.REPO_ROOT / "slam_fairseq")
# the criterion's objectives (slam_multitask.OBJECTIVE_WEIGHTS), logged as <name>_loss
STAGE1_LOSSES = {"loss", "span_masking_loss", "msm_contrastive_loss", "diversity_loss", "msm_mlm_loss"}
STAGE2_LOSSES = {"tlm_text_loss", "tlm_speech_loss", "stm_loss", "pair_ctc_loss"}  # pair CTC: --pair-ctc


def read_tfrecords(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file: uint64 length, masked CRC32C of it, data, masked CRC32C of it."""
    from tensorboardX.record_writer import masked_crc32c

    data = path.read_bytes()
    position = 0
    while position < len(data):
        if position + 12 > len(data):
            raise ValueError(f"{path}: truncated record header at byte {position}")
        header = data[position:position + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[position + 8:position + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length CRC at byte {position}")
        payload = data[position + 12:position + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[position + 12 + length:position + 16 + length])
        if len(payload) != length or payload_crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad or truncated record at byte {position}")
        yield payload
        position += 16 + length


def scalars_by_step(log_dir: Path) -> Dict[int, Dict[str, float]]:
    """step -> {tag: value} of every scalar summary in the event files under ``log_dir``."""
    from tensorboardX.proto.event_pb2 import Event

    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {log_dir}: {sorted(p.name for p in log_dir.iterdir())}"
    scalars: Dict[int, Dict[str, float]] = {}
    for path in files:
        for record in read_tfrecords(path):
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    scalars.setdefault(event.step, {})[value.tag] = value.simple_value
    return scalars


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # real speech: random frames are too short for pair CTC to spell a transcript (it logs no loss then)
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is needed to synthesize the pre-training speech (apt-get install espeak-ng)")
    return fixtures.build_data_dir(tmp_path_factory.mktemp("tensorboard") / "data", real_speech=True)


def test_fairseq_train_writes_the_per_objective_losses_to_tensorboard(data_dir, tmp_path):
    """json rounds the losses to 3 decimals, TensorBoard keeps float32: they agree within 6e-4."""
    assert fixtures.criterion_registered("slam_multitask")
    log_dir = tmp_path / "tensorboard"
    run = fixtures.run_fairseq(
        [str(data_dir), "--user-dir", USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny", "--pair-ctc",
         "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3",
         "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2", "--batch-size", "8",
         "--max-sentences-speech", "2", "--max-sentences-text", "4", "--max-sentences-pair", "3",
         "--stage2-start-update", "3", "--max-update", "5", "--save-dir", str(tmp_path / "checkpoints"),
         "--no-save", "--cpu", "--seed", "7", "--log-format", "json", "--log-interval", "1",
         "--ddp-backend", "legacy_ddp", "--tensorboard-logdir", str(log_dir)],
        stand_in=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"exit {run.returncode}\n{output[-5000:]}"
    assert "Please install tensorboardX" not in output and "tensorboard not found" not in output

    logged = {int(record["num_updates"]): record for record in fixtures.json_log_records(output)}
    assert sorted(logged) == [1, 2, 3, 4, 5]
    written = scalars_by_step(log_dir / "train_inner")
    assert sorted(written) == [1, 2, 3, 4, 5]
    for update, record in logged.items():
        expected = {key for key in record if key.endswith("_loss") or key == "loss"}
        assert STAGE1_LOSSES <= expected
        assert (STAGE2_LOSSES <= expected) == (update > 3), f"update {update}: {sorted(expected)}"
        assert expected <= set(written[update]), f"update {update}: {sorted(written[update])}"
        for key in expected:
            assert math.isfinite(written[update][key])
            assert written[update][key] == pytest.approx(float(record[key]), abs=6e-4), (update, key)
    assert written[5]["tlm_text_loss"] != written[4]["tlm_text_loss"], "the scalars are per update"
    assert scalars_by_step(log_dir / "valid"), "the validation scalars are written too"
