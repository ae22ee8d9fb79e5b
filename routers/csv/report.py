"""What a directory import did, or in a dry run would do: counts and every rejected line.

Sole purpose: the import's answer to the operator (``omniroute directory import`` prints
it), kept apart from how rows are read and written.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

from ingest.errors import OmnirouteError


class ImportAborted(OmnirouteError):
    """The database failed. customers.csv is applied in one transaction, so nothing of it
    was; the other kinds in batches: the failed batch was rolled back, earlier ones stay
    applied (none in a dry run). ``report`` holds what was read and applied before it."""

    def __init__(self, message: str, report: "ImportReport") -> None:
        super().__init__(message)
        self.report = report


class Rejected(NamedTuple):
    line: int
    reason: str


@dataclass
class ImportReport:
    """What an import did (or, in a dry run, would do). ``rejects`` is sorted by line."""

    kind: str
    dry_run: bool
    inserted: int = 0
    updated: int = 0
    identities_added: int = 0
    identities_removed: int = 0
    removed: int = 0  # holidays: company days the file no longer lists
    rows: int = 0  # data rows read, blank lines excluded
    merging: bool = False  # customers.csv: every row is staged, the merge is under way
    rejects: list[Rejected] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejects)
