"""``directory import``'s progress lines: at most one every few seconds while the file is
read, one when the merge starts, none after it (the summary line follows on stdout)."""

import io

from config.import_progress import printer
from routers.csv.report import ImportReport


def test_lines_are_spaced_and_the_merge_is_said_once() -> None:
    now = [100.0]
    out = io.StringIO()
    progress = printer("customers.csv", every=5, out=out, clock=lambda: now[0])
    report = ImportReport(kind="customers", dry_run=False)
    for second, rows in ((1, 5_000), (4, 10_000), (6, 15_000), (9, 20_000), (71, 1_250_000)):
        now[0] = 100.0 + second
        report.rows = rows
        progress(report)
    report.merging = True
    now[0] = 172.0
    progress(report)
    report.merging = False
    now[0] = 400.0
    progress(report)  # merged: the summary says the rest
    assert out.getvalue().splitlines() == [
        "customers.csv: 15,000 rows read in 6 s",
        "customers.csv: 1,250,000 rows read in 1 min 11 s",
        "customers.csv: 1,250,000 rows read in 1 min 12 s; merging into the directory",
    ]


def test_a_dry_run_says_it_checks_rather_than_merges() -> None:
    out = io.StringIO()
    progress = printer("customers.csv", out=out, clock=lambda: 3.0)
    report = ImportReport(kind="customers", dry_run=True, rows=10, merging=True)
    progress(report)
    assert out.getvalue() == (
        "customers.csv: 10 rows read in 0 s; checking it against the directory (dry run)\n"
    )
