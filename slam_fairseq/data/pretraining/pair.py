"""Speech-text pairs (``pair_<split>.tsv``: features + ``tgt_text``) for TLM and STM.

Each item has the TLM masks (about 75% of subsampled frames, about 50% of text tokens by default)
and the clean transcript; the collater draws the STM negatives of the batch
(``pretraining_stm_negatives``), seeded by ``(seed, epoch, the batch's ids)``.

Transcripts are encoded on load with the config's SentencePiece model (eos appended, as text-only
data). Rows with an empty transcript are skipped and counted, like rows shorter than 7 frames
(``read_speech_rows``). The batching size of a pair is its number of feature frames.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch

from slam_formats.packed import PackedSequences
from slam_fairseq.data.pretraining.collate import collate_speech, collate_tokens, real_token_counts, target_index
from slam_fairseq.data.pretraining.feature_rows import SpeechFeatureReader, num_subsampled_frames
from slam_fairseq.data.pretraining.frame_masks import FrameMaskingSettings
from slam_fairseq.data.pretraining.modality import PretrainingModalityDataset
from slam_fairseq.data.pretraining.seeding import (STM_NEGATIVES, TLM_FRAME_MASK, TLM_TEXT_MASK,
                                                   masking_rng)
from slam_fairseq.data.pretraining.span_masks import SpanMaskingSettings, TextVocabulary, mask_text
from slam_fairseq.data.pretraining.stm_negatives import draw_stm_negatives

__all__ = ["PretrainingPairDataset"]


class PretrainingPairDataset(PretrainingModalityDataset):
    """Pairs -> TLM + STM. Items: ``id``, ``epoch``, ``features``, ``frame_mask`` (TLM),
    ``source``/``target`` (TLM text), ``clean`` (the transcript).

    Args:
        reader: the pair manifest's :class:`SpeechFeatureReader` (rows read with transcripts).
        transcripts: the encoded ``tgt_text`` of each row (eos appended): (L,) int arrays, held
            packed (``PackedSequences``).
        vocabulary: text ids for masking.
        text_masking: TLM text masking (50% by default).
        frame_masking: TLM frame masking (start 0.13, spans of 10: about 75%).
        stm_negative_prob: share of rows made STM negatives (0.5).
        seed: the run's seed.
    """

    modality = "pair"

    def __init__(self, reader: SpeechFeatureReader, transcripts: Union[PackedSequences, Sequence[np.ndarray]],
                 vocabulary: TextVocabulary, text_masking: SpanMaskingSettings,
                 frame_masking: FrameMaskingSettings, stm_negative_prob: float, seed: int) -> None:
        super().__init__(seed)
        if len(transcripts) != len(reader.rows):
            raise ValueError(f"{reader.rows.manifest}: {len(transcripts)} transcripts for {len(reader.rows)} rows")
        self.reader = reader
        self.transcripts = (transcripts if isinstance(transcripts, PackedSequences)
                            else PackedSequences.from_arrays(transcripts))
        self.vocabulary = vocabulary
        self.text_masking = text_masking
        self.frame_masking = frame_masking
        self.stm_negative_prob = stm_negative_prob
        self.sizes = reader.rows.n_frames
        self.text_sizes = self.transcripts.lengths()
        self.name = str(reader.rows.manifest)

    def max_size_exceeded(self, max_positions) -> np.ndarray:
        return (self.sizes > max_positions[0]) | (self.text_sizes > max_positions[1])

    def get_item(self, index: int, epoch: int) -> Dict[str, Any]:
        features = self.reader.read(index)
        frame_rng = masking_rng(self.seed, epoch, index, TLM_FRAME_MASK)
        frame_mask = self.frame_masking.draw(num_subsampled_frames(len(features)), frame_rng)
        clean = np.asarray(self.transcripts[index], dtype=np.int64)
        text_rng = masking_rng(self.seed, epoch, index, TLM_TEXT_MASK)
        source, target = mask_text(clean, text_rng, self.vocabulary, self.text_masking)
        return {"id": index, "epoch": epoch, "features": torch.from_numpy(features),
                "frame_mask": torch.from_numpy(frame_mask), "source": torch.from_numpy(source),
                "target": torch.from_numpy(target), "clean": torch.from_numpy(clean)}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            return {}
        batch = collate_speech(samples)
        pad = self.vocabulary.pad
        sources, cleans = [item["source"] for item in samples], [item["clean"] for item in samples]
        batch["tokens"] = collate_tokens(sources, pad)
        batch["target"] = collate_tokens([item["target"] for item in samples], pad)
        batch["target_index"] = target_index(batch["target"], pad)
        batch["clean_tokens"] = collate_tokens(cleans, pad)
        rng = masking_rng(self.seed, samples[0]["epoch"], len(samples), STM_NEGATIVES,
                          extra=[item["id"] for item in samples])
        text_index, label = draw_stm_negatives([clean.tolist() for clean in cleans], rng,
                                               self.stm_negative_prob)
        batch["stm_text_index"] = torch.from_numpy(text_index)
        batch["stm_label"] = torch.from_numpy(label)
        clean_lengths = real_token_counts(cleans, pad)
        batch["lengths_on_host"].update(text=real_token_counts(sources, pad),
                                        stm_text=tuple(clean_lengths[row] for row in text_index))
        batch["ntokens"] = int(sum(len(clean) for clean in cleans))
        return batch
