"""Packed columns (``slam_formats.packed``) and the manifest rows pre-training holds in them."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from slam_formats.packed import PackedSequences, PackedStrings
from slam_fairseq.data.pretraining.feature_rows import SpeechRows, read_speech_rows

STRINGS = ["u1", "", "fbank/ünïcode ß.zip:12:34", "x" * 300, "日本語", ""]


def test_packed_strings_give_back_every_string_by_index_iteration_and_take():
    packed = PackedStrings.from_strings(STRINGS)
    assert len(packed) == len(STRINGS)
    assert [packed[i] for i in range(len(STRINGS))] == STRINGS == list(packed)
    assert packed[-1] == "" and packed[-4] == STRINGS[2]
    assert list(packed.lengths()) == [len(s.encode("utf-8")) for s in STRINGS]
    assert list(packed.take([4, 2, 2, 0])) == [STRINGS[4], STRINGS[2], STRINGS[2], STRINGS[0]]
    assert list(packed.take([1, 5])) == ["", ""] and len(packed.take([])) == 0
    with pytest.raises(IndexError, match="row 6 of 6"):
        packed[6]
    # one byte per UTF-8 byte of the text and one offset per row: no Python object per row
    text_bytes = sum(len(s.encode("utf-8")) for s in STRINGS)
    assert packed.values.dtype == np.uint8 and packed.nbytes == text_bytes + 8 * (len(STRINGS) + 1)


def test_packed_sequences_give_read_only_views_of_each_sequence():
    arrays = [np.array([4, 5, 2]), np.array([], dtype=np.int64), np.array([9]), np.arange(1000)]
    packed = PackedSequences.from_arrays(arrays)
    assert packed.values.dtype == np.int32 and list(packed.lengths()) == [3, 0, 1, 1000]
    for got, expected in zip(packed, arrays):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError):
        packed[0][0] = 7  # a view of the shared values: writing would change every later read
    with pytest.raises(ValueError, match="do not fit in int32"):
        PackedSequences.from_arrays([np.array([1, 2 ** 31 + 5])])
    with pytest.raises(ValueError, match="integers, not float64"):
        PackedSequences.from_arrays([np.array([1.7])])
    taken = packed.take([3, 0])
    np.testing.assert_array_equal(taken[0], arrays[3])
    np.testing.assert_array_equal(taken[1], arrays[0])


def test_offsets_must_cover_the_values():
    with pytest.raises(ValueError, match="offsets"):
        PackedStrings(np.zeros(4, dtype=np.uint8), np.array([0, 2, 3]))


def _write_manifest(path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as out:
        out.write("id\taudio\tn_frames\ttgt_text\tspeaker\n")
        for index in range(rows):
            frames = 3 if index % 1000 == 7 else 100 + index % 50  # every 1000th row too short
            out.write(f"utt{index:07d}\tfbank/shard{index // 997}.zip:{index * 4096}:{frames * 320}\t{frames}"
                      f"\tsentence number {index}\tspk{index % 9}\n")


def test_speech_rows_are_read_into_packed_columns_with_the_same_values(tmp_path):
    manifest = tmp_path / "pair_train.tsv"
    _write_manifest(manifest, 3000)
    rows = read_speech_rows(manifest, need_transcript=True)
    kept = [i for i in range(3000) if i % 1000 != 7]
    assert len(rows) == len(kept) == 2997
    assert isinstance(rows.ids, PackedStrings) and isinstance(rows.audio, PackedStrings)
    assert list(rows.ids) == [f"utt{i:07d}" for i in kept]
    assert rows.audio[10] == f"fbank/shard0.zip:{11 * 4096}:{111 * 320}"  # row 7 was too short
    assert rows.transcripts[-1] == "sentence number 2999"
    np.testing.assert_array_equal(rows.n_frames, [100 + i % 50 for i in kept])
    assert list(read_speech_rows(manifest).transcripts)[:2] == ["", ""]  # speech rows keep no text
    subset = rows.take([5, 1])
    assert list(subset.ids) == [rows.ids[5], rows.ids[1]] and list(subset.n_frames) == [rows.n_frames[5],
                                                                                         rows.n_frames[1]]
    assert list(subset.transcripts) == [rows.transcripts[5], rows.transcripts[1]]


def test_speech_rows_from_lists_are_packed_and_columns_must_agree(tmp_path):
    rows = SpeechRows(tmp_path / "m.tsv", ["a", "b"], ["a.npy", "b.npy"], [10, 12], ["", ""])
    assert isinstance(rows.audio, PackedStrings) and rows.audio[1] == "b.npy" and rows.n_frames.dtype == np.int64
    with pytest.raises(ValueError, match="columns of 2, 1"):
        SpeechRows(tmp_path / "m.tsv", ["a", "b"], ["a.npy"], [10, 12], ["", ""])


def _private_dirty_kib() -> int:
    with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
        return sum(int(line.split()[1]) for line in rollup if line.startswith("Private_Dirty"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup (Linux)")
def test_a_forked_worker_reading_every_row_copies_almost_nothing_of_the_manifest(tmp_path):
    """Data-loader workers are forked from the training process; rows held as Python objects are
    copied into every worker page by page as it reads them (reference counts are writes). The
    packed rows stay shared: 100k rows held as lists copied about 35 MiB into such a worker."""
    manifest = tmp_path / "speech_train.tsv"
    _write_manifest(manifest, 100_000)
    rows = read_speech_rows(manifest)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            before = _private_dirty_kib()
            total = sum(len(rows.ids[i]) + len(rows.audio[i]) for i in range(len(rows)))
            os.write(write, f"{_private_dirty_kib() - before} {total}".encode())
        finally:
            os._exit(0)
    os.close(write)
    copied_kib, total = map(int, os.read(read, 100).split())
    os.waitpid(child, 0)
    assert total == sum(len(rows.ids[i]) + len(rows.audio[i]) for i in range(len(rows)))
    assert copied_kib < 3 * 1024, f"the worker copied {copied_kib} KiB of a 100k-row manifest"
