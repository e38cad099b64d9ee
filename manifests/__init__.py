"""Scripts that turn LibriSpeech, Libri-Light, text corpora and CoVoST 2 into SLAM / fairseq S2T data.

``prep_*.py`` are the entry points (run them as ``python manifests/prep_x.py --help``); ``core``
holds what they share (audio checks, features, shards, workers, resume, summary),
``vocabulary`` the SentencePiece / fairseq dictionary / binarization helpers and ``data_config``
the fairseq S2T ``config*.yaml`` writer. The formats are those of ``docs/data_formats.md``.
"""
