"""User-facing errors: one line naming the bad value and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["EstbenchError", "SpecError", "RunInterrupted", "did_you_mean"]


class EstbenchError(Exception):
    """An error caused by user input; the CLI prints its message on one line and exits 2."""


class SpecError(EstbenchError):
    """A matrix spec that cannot be run as written."""


class RunInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM; its running cells were stopped and stay pending."""

    def __init__(self, signum: int, run_dir: object) -> None:
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}; finished cells are kept "
                         f"in {run_dir}, run the same command again to resume")
        self.signum = signum


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """' Did you mean: x, y?' with the known names that extend ``value`` or are close to it (at
    most three, best first), or '' when nothing is close."""
    known = list(known)
    extending = sorted(k for k in known if k.startswith(value) and k != value)
    close = difflib.get_close_matches(value, known, n=3, cutoff=0.6)
    matches = list(dict.fromkeys(close + extending))[:3]
    return f" Did you mean: {', '.join(matches)}?" if matches else ""
