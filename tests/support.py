"""Helpers the test modules share (no tests here)."""
from __future__ import annotations

import os

import pytest

# CI installs everything but a GPU: there, a missing compiler or library is a failure.
IN_CI = bool(os.environ.get("CI"))


def skip_or_fail(reason: str):
    """A skip with its reason, or in CI a failure."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)
