"""slam-fairseq: SLAM (speech + text jointly pre-trained Conformer encoder) as a fairseq user dir.

``fairseq-train --user-dir slam_fairseq`` imports this package, which registers the tasks, models
and criterions below with fairseq.
"""
import os
import sys

from slam_fairseq import compat  # noqa: F401  (first: fixes fairseq 0.12 on today's torch and numpy)
from slam_fairseq import criterions, models, tasks  # noqa: F401

# torchrun ... fairseq-train: say to use slam-fairseq-train. Not while ``python -m slam_fairseq.launch``
# imports this package (argv[0] is "-m" then): runpy warns about a module imported before it runs.
if "WORLD_SIZE" in os.environ and sys.argv[:1] != ["-m"]:
    from slam_fairseq.launch import warn_if_launched_without_mapping

    warn_if_launched_without_mapping()

__version__ = "0.1.0"
