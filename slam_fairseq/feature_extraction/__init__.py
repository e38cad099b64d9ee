"""Feature extraction from a SLAM checkpoint: the states of chosen encoder layers for a manifest
(``slam-fairseq-extract-features``, :mod:`slam_fairseq.feature_extraction.cli`)."""
