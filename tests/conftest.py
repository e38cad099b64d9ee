"""Suite-wide checks: the tools the fixtures synthesize speech and text with must be installed.

A missing tool stops the whole run with one clear message (``scripts/install.sh`` installs them),
instead of tests skipping or quietly testing something easier.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REQUIRED_TOOLS = ("espeak-ng", "sox")  # speech synthesis and conversion for every speech fixture
FORTUNES = Path("/usr/share/games/fortunes")
REQUIRED_FORTUNES = ("literature", "wisdom", "science")  # real English sentences (Debian's fortunes*)


def missing_requirements() -> list:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    missing += [str(FORTUNES / name) for name in REQUIRED_FORTUNES if not (FORTUNES / name).is_file()]
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = missing_requirements()
    if missing:
        raise pytest.UsageError(
            f"the tests need {', '.join(missing)}; run `bash scripts/install.sh --tests` (as root it "
            "apt-get installs espeak-ng, sox and fortunes) or install them yourself")


# The files whose end-to-end runs take the longest (each a minute or more of fairseq processes on
# two cores). scripts/test.sh runs the suite on two workers, one test file per worker at a time
# (pytest-xdist's loadfile): started first, these overlap the many short files instead of leaving
# one worker running them alone at the end.
LONGEST_FILES = ("test_realspeech.py", "test_pretraining_task.py", "test_slam_s2t_cli.py",
                 "test_feature_extraction.py", "test_demo_e2e.py", "test_ctc_decoding.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Moves the tests of :data:`LONGEST_FILES` to the front, in that order (a stable sort: every
    file keeps its own order)."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
