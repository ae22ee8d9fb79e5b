"""A directory CSV file opened for import: its encoding, its delimiter, its header.

Sole purpose: read an operator's file as the spreadsheet wrote it (issue 17: a Turkish
Excel writes ``;`` and Windows-1254) and hand ``routers.csv.format`` its kind, header and
records batch by batch. The delimiter is the one of ``,`` ``;`` and tab that makes the
header's names known, unless given; the encoding UTF-8 (a BOM dropped) unless given.
"""

import codecs
import csv
from collections.abc import Iterator
from pathlib import Path

from routers.csv.format import COLUMNS, REQUIRED, ImportFileError, columns_of


def _sniff(first_line: str, kind: str | None) -> str:
    """The delimiter that splits the header line into the most known column names (the
    kind's, when given); a comma when none does better."""
    known = set(COLUMNS[kind]) if kind in COLUMNS else {c for cs in COLUMNS.values() for c in cs}

    def score(delimiter: str) -> int:
        try:
            names = next(csv.reader([first_line], delimiter=delimiter), [])
        except csv.Error:
            return 0
        return sum(1 for name in names if name.strip().lower() in known)

    return max(DELIMITERS, key=score)  # max keeps the first of equals: the comma


def _header(reader: Iterator[list[str]], kind: str | None) -> tuple[str, list[str]]:
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ImportFileError("the file is empty: expected a header row") from None
    if len(set(header)) != len(header):
        raise ImportFileError(f"duplicate column in header: {','.join(header)}")
    if kind is None:
        found = [k for k, c in COLUMNS.items() if set(REQUIRED[k]) <= set(header) <= set(c)]
        if not found:
            raise ImportFileError(
                f"header {','.join(header)!r} matches no kind; expected one of: "
                + "; ".join(f"{k}: {columns_of(k)}" for k in COLUMNS)
            )
        kind = found[0]
    elif kind not in COLUMNS:
        raise ImportFileError(f"unknown kind {kind!r}; expected one of {', '.join(COLUMNS)}")
    missing = [c for c in REQUIRED[kind] if c not in header]
    unknown = [c for c in header if c not in COLUMNS[kind]]
    if missing or unknown:
        raise ImportFileError(
            f"{kind} header must be {columns_of(kind)}"
            + (f"; missing {','.join(missing)}" if missing else "")
            + (f"; unknown {','.join(unknown)}" if unknown else "")
        )
    return kind, header


#: what ``--delimiter`` may name, and what the header is tried with, in this order
DELIMITERS = (",", ";", "\t")


class CsvSource:
    """A CSV file read batch by batch; line numbers count physical lines, header = 1.
    ``delimiter`` None: sniffed from the header line; ``encoding``: the file's (UTF-8 with
    or without a BOM by default)."""

    def __init__(
        self,
        path: Path,
        kind: str | None,
        region: str,
        *,
        delimiter: str | None = None,
        encoding: str = "utf-8",
    ) -> None:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise ImportFileError(f"unknown encoding {encoding!r} (e.g. utf-8, cp1254)") from None
        if delimiter is not None and delimiter not in DELIMITERS:
            raise ImportFileError(f"delimiter {delimiter!r} is not one of , ; or a tab")
        # utf-8-sig drops a BOM; surrogateescape lets one bad line be rejected, not the file.
        codec = "utf-8-sig" if codec == "utf-8" else codec
        self._file = path.open(encoding=codec, errors="surrogateescape", newline="")
        try:
            self.delimiter = delimiter or _sniff(self._file.readline(), kind)
            self._file.seek(0)
            self._reader = csv.reader(self._file, delimiter=self.delimiter)
            self.kind, self.header = _header(self._reader, kind)
        except (ImportFileError, csv.Error):
            self._file.close()
            raise

    def records(self, size: int) -> list[tuple[int, list[str] | str]]:
        """The next ``size`` non-blank records with their first line, or the csv error."""
        out: list[tuple[int, list[str] | str]] = []
        while len(out) < size:
            line = self._reader.line_num + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                break
            except csv.Error as exc:
                out.append((line, f"unreadable CSV: {exc}"))
                continue
            if fields and (len(fields) > 1 or fields[0].strip()):
                out.append((line, fields))
        return out

    def close(self) -> None:
        self._file.close()
