"""Pre-training data: per-modality datasets (speech, text, pairs), their masks and the round robin."""
