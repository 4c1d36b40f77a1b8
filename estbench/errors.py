"""User-facing errors: one line naming the bad value and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["EstbenchError", "SpecError", "did_you_mean"]


class EstbenchError(Exception):
    """An error caused by user input; the CLI prints its message on one line and exits 2."""


class SpecError(EstbenchError):
    """A matrix spec that cannot be run as written."""


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """Return ' Did you mean: x?' for the closest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(value, list(known), n=1, cutoff=0.5)
    return f" Did you mean: {close[0]}?" if close else ""
