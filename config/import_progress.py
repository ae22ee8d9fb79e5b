"""What ``omniroute directory import`` says while a big file is under way.

Sole purpose: an operator importing ten million customers sees minutes pass; without a word
they cannot tell a slow import from a hung one. Lines go to stderr (stdout keeps the one
summary line scripts read), at most one every ``every`` seconds, and once when the merge
starts, which on a big customers.csv is the longest silent part.
"""

import sys
import time
from collections.abc import Callable
from typing import TextIO

from routers.csv.report import ImportReport


def _took(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def printer(
    name: str,
    *,
    every: float = 5.0,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[ImportReport], None]:
    """A ``progress`` callback for ``import_csv`` that writes ``name: N rows read in T``."""
    started = clock()
    last = started
    merged = False  # the merge started: only the summary is left to say

    def progress(report: ImportReport) -> None:
        nonlocal last, merged
        now = clock()
        if merged:
            return
        if report.merging:
            merged = True
            what = (
                "; checking it against the directory (dry run)"
                if report.dry_run
                else "; merging into the directory"
            )
        elif now - last < every:
            return
        else:
            what = ""
        last = now
        print(
            f"{name}: {report.rows:,} rows read in {_took(now - started)}{what}",
            file=out or sys.stderr,
            flush=True,
        )

    return progress
