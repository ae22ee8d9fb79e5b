"""`omniroute directory import|export` as an operator runs it: every bad row named with its
line, exit 1 when any row was rejected, `--dry-run` changes nothing."""

from pathlib import Path

from tests.daemon_fixtures import ROOT, DaemonProcess

EXAMPLES = ROOT / "config" / "examples"


def test_import_examples_then_export_round_trips(daemon: DaemonProcess, tmp_path: Path) -> None:
    refused = daemon.cli("directory", "import", str(EXAMPLES / "teams.csv"))
    assert refused.returncode == 1, "no schema change outside `directory migrate`"
    assert "run `omniroute directory migrate`" in refused.stderr
    assert daemon.cli("directory", "migrate").returncode == 0
    for kind in ("teams", "agents", "customers"):
        result = daemon.cli("directory", "import", str(EXAMPLES / f"{kind}.csv"))
        assert result.returncode == 0, result.stderr
        assert f"imported {kind}:" in result.stdout
    out = tmp_path / "customers.csv"
    exported = daemon.cli("directory", "export", "--kind", "customers", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    again = daemon.cli("directory", "import", str(out))
    assert again.returncode == 0
    assert "0 new" in again.stdout
    assert "0 rejected" in again.stdout


def test_rejected_rows_are_named_and_exit_1(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert daemon.cli("directory", "migrate").returncode == 0
    assert daemon.cli("directory", "import", str(EXAMPLES / "teams.csv")).returncode == 0
    bad = tmp_path / "customers.csv"
    bad.write_text(
        "id,name,team,emails,phones,twitter\n"
        "c1,Good,billing,good@example.com,0532 111 22 33,\n"
        "c2,Bad phone,billing,bad@example.com,12,\n"
        "c3,No team,nosuchteam,x@example.com,,\n",
        encoding="utf-8",
    )
    dry = daemon.cli("directory", "import", "--dry-run", str(bad))
    assert dry.returncode == 1
    assert "would import" in dry.stdout
    listed = daemon.cli("directory", "export", "--kind", "customers")
    assert "c1" not in listed.stdout, "a dry run changes nothing"

    result = daemon.cli("directory", "import", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3: rejected:" in result.stderr
    assert f"{bad}:4: rejected:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "1 new" in result.stdout
    explained = daemon.cli("route", "explain", "--channel", "sms", "--from", "+905321112233")
    assert "customer:  c1 (Good)" in explained.stdout


def test_unreadable_file_is_one_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert daemon.cli("directory", "migrate").returncode == 0
    missing = daemon.cli("directory", "import", str(tmp_path / "nope.csv"))
    assert missing.returncode != 0
    assert missing.stderr.startswith("omniroute: ")
    assert "Traceback" not in missing.stderr
    odd = tmp_path / "odd.csv"
    odd.write_text("foo,bar\n1,2\n", encoding="utf-8")
    result = daemon.cli("directory", "import", str(odd))
    assert result.returncode != 0
    assert result.stderr.startswith("omniroute: ")
