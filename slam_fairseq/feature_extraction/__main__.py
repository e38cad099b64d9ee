"""``python -m slam_fairseq.feature_extraction``: the same as ``slam-fairseq-extract-features``."""
import sys

from slam_fairseq.feature_extraction.cli import main

sys.exit(main())
