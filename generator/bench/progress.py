"""What the benchmark prints on stderr as each measurement ends: a run stopped early (a time
limit on a lent machine) still shows what it measured."""

from __future__ import annotations

import sys
from typing import Any


def progress(text: str) -> None:
    """One line on stderr as each measurement ends, so a run stopped early keeps its figures."""
    print(text, file=sys.stderr, flush=True)


def per_s(entry: dict[str, Any], unit: str) -> str:
    """`entry`'s median rate, or why it was skipped."""
    if "skipped" in entry:
        return "skipped"
    return f"{entry[f'{unit}_per_s']['median']:,.1f} {unit}/s"
