"""Scripts that turn LibriSpeech, Libri-Light, text corpora and CoVoST 2 into SLAM / fairseq S2T data.

``prep_*.py`` are the entry points: ``python manifests/prep_x.py --help`` from a checkout, or the
installed commands ``slam-prep-librispeech``, ``slam-prep-librilight``, ``slam-prep-text``,
``slam-prep-covost2`` and ``slam-merge-manifests``. None of them imports torch or fairseq: the
formats they write come from the torch-free package ``slam_formats``. ``core``
holds what they share (audio checks, features, shards, workers, resume, summary),
``vocabulary`` the SentencePiece / fairseq dictionary / binarization helpers and ``data_config``
the fairseq S2T ``config*.yaml`` writer. The formats are those of ``docs/data_formats.md``.
"""
