"""Decoding with the CTC head of ``slam_s2t``: best-path (greedy) CTC decoding and joint
CTC/attention beam search, as generators that ``fairseq-generate`` runs (see
:mod:`slam_fairseq.tasks.slam_speech_to_text` and docs/decoding.md)."""
