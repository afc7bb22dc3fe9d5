"""Tests that need something from outside the project's environment (Debian's chromium and
PostgreSQL, sae-lens in its own environment, the packaged real models): without it they skip,
saying what installs it; under ``CI=true`` they fail instead, since CI installs all of them and a
skip there would hide that the test never ran."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(present: bool, what: str, install: str) -> None:
    """Skip (outside CI) or fail (under CI=true) unless ``present``; ``install``: the command that
    brings ``what``."""
    if present:
        return
    message = f"{what} is not installed ({install})"
    if IN_CI:
        pytest.fail(f"{message}: under CI=true every test must run", pytrace=False)
    pytest.skip(message)
