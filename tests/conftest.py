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
