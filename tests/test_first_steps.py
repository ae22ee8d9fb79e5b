"""What a new user tripped over (issue 17): each item as the command that showed it, run
in-process where the code allows and through the real ``omniroute`` otherwise."""

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from config.check import _check_rules
from config.cli import build_parser
from config.components import Wiring
from config.daemon import Daemon
from config.directory_cli import run as run_directory
from config.logging import configure as configure_logging
from config.settings import load_settings
from config.tail import tail
from ingest.bus import Bus
from ingest.errors import ConfigError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import Identity, InboundMessage, Route, RoutedMessage
from ingest.topology import ROUTED
from routers.csv.importer import import_csv
from routers.store.engine import DirectoryUnavailable, require_current
from tests.daemon_fixtures import ROOT, DaemonProcess
from tests.seed import seed
from tests.support.net import free_port
from tests.support.waiting import until

TABLE_ROWS = re.compile(r"^[a-z][\w.-]*\s+(ok  |FAIL)  ")


def _config(tmp_path: Path, database_url: str, *extra: str, port: int = 8080) -> Path:
    path = tmp_path / "omniroute.toml"
    lines = [
        f'database_url = "{database_url}"',
        f'state_dir = "{tmp_path / "state"}"',
        "[routing]",
        'default_region = "TR"',
        *extra,
        "[http]",
        f"port = {port}",
        "[log]",
        'format = "json"',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """``capsys``, with the logging configuration put back after the test (a reload, and
    ``_json_logs``, configure it onto this test's stdout, closed after it)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield capsys
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def _json_logs() -> None:
    """The daemon's JSON logging, onto the test's stdout as it is now (in the test body:
    a fixture's stdout is not the one ``capsys`` reads during the call)."""
    configure_logging(fmt="json")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- 2: SIGHUP's "needs a restart" compares with what runs ---------------------------------


async def test_reload_warns_of_a_restart_until_the_running_value_is_back(
    tmp_path: Path, sqlite_url: str, logs: pytest.CaptureFixture[str]
) -> None:
    """http.port changed: every HUP says it needs a restart (the second was silent), and
    putting it back is silent (it was a false warning)."""
    _json_logs()
    config = _config(tmp_path, sqlite_url, port=8080)
    daemon = Daemon(load_settings(config), config)
    warned = []
    for port in (9090, 9090, 8080):
        config.write_text(config.read_text().replace("port = 8080", f"port = {port}"))
        config.write_text(config.read_text().replace("port = 9090", f"port = {port}"))
        logs.readouterr()
        await daemon._reload()
        out = logs.readouterr().out
        assert "daemon.reloaded" in out
        warned.append("daemon.reload_needs_restart" in out)
    assert warned == [True, True, False]


# -- 3: teams named in the configuration exist -----------------------------------------------


TEAMS = (
    'default_team = "nosuchteam"',
    "[routing.address_teams]",
    '"vip@acme.test" = "billing"',
    '"help@acme.test" = "ghost"',
)


async def test_check_fails_teams_the_configuration_names_and_the_directory_lacks(
    tmp_path: Path, sqlite_url: str, engine: AsyncEngine
) -> None:
    """`check` said ok to default_team = "nosuchteam", and explain routed to it."""
    await seed(engine)
    row = await _check_rules(load_settings(_config(tmp_path, sqlite_url, *TEAMS)))
    assert row == (
        "teams",
        False,
        "routing.address_teams.'help@acme.test': team 'ghost' is not in the directory; "
        "routing.default_team: team 'nosuchteam' is not in the directory",
    )
    good = _config(tmp_path, sqlite_url, 'default_team = "network"')
    assert await _check_rules(load_settings(good)) == (
        "teams",
        True,
        "1 team keys; every team is in the directory",
    )


async def test_a_reload_naming_an_unknown_team_is_refused_and_the_old_one_kept(
    tmp_path: Path, sqlite_url: str, engine: AsyncEngine, logs: pytest.CaptureFixture[str]
) -> None:
    """The reload took default_team = "nosuchteam" and routed strangers there."""
    _json_logs()
    await seed(engine)
    config = _config(tmp_path, sqlite_url, 'default_team = "network"')
    settings = load_settings(config)
    daemon = Daemon(settings, config)
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="test")
    daemon._wiring = Wiring(settings, Health(), bus, engine, Metrics())
    try:
        config.write_text(config.read_text().replace('"network"', '"nosuchteam"'))
        await daemon._reload()
    finally:
        await daemon._wiring.close()
    out = logs.readouterr().out
    assert "daemon.reload_refused" in out
    assert "routing.default_team: team 'nosuchteam' is not in the directory" in out
    assert daemon.settings.routing.default_team == "network"


def test_start_with_an_unknown_default_team_is_one_line_exit_2(daemon: DaemonProcess) -> None:
    """The daemon started and routed to team.nosuchteam."""
    text = daemon.config.read_text().replace(
        'default_region = "TR"', 'default_region = "TR"\ndefault_team = "nosuchteam"'
    )
    daemon.config.write_text(text)
    result = daemon.cli("run", timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "omniroute: routing.default_team: team 'nosuchteam' is not in the directory\n"
    )


# -- 4: /readyz: a component that is up says so ----------------------------------------------


@pytest.mark.slow
async def test_readyz_shows_the_pruner_and_the_spool_up(daemon: DaemonProcess) -> None:
    """They stayed "starting" for ever, which reads as a start-up that never ended."""
    port = free_port()
    daemon.config.write_text(daemon.config.read_text().replace("port = 0", f"port = {port}"))
    proc = daemon.start()
    body: dict[str, dict[str, dict[str, str]]] = {}
    async with httpx.AsyncClient(timeout=2) as client:

        async def ready() -> bool:
            nonlocal body
            assert proc.poll() is None, "the daemon exited"
            try:
                answer = await client.get(f"http://127.0.0.1:{port}/readyz")
            except httpx.TransportError:
                return False
            body = answer.json()
            return answer.status_code == 200

        await until(ready, 30, "ready")
    states = {name: c["state"] for name, c in body["components"].items()}
    assert states["pruner"] == "up"
    assert states["spool"] == "up"
    assert "starting" not in states.values(), states


# -- 5: the environment is named as the source -----------------------------------------------


def test_a_bad_environment_value_names_the_variable_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`OMNIROUTE_ROUTING__STICKY_FOR=fortnight omniroute check` blamed the TOML file."""
    config = _config(tmp_path, "sqlite:////tmp/x.db")
    monkeypatch.setenv("OMNIROUTE_ROUTING__STICKY_FOR", "fortnight")
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    said = str(error.value)
    assert said.startswith(
        "environment variable OMNIROUTE_ROUTING__STICKY_FOR: routing.sticky_for: "
    )
    assert str(config) not in said
    monkeypatch.delenv("OMNIROUTE_ROUTING__STICKY_FOR")
    monkeypatch.setenv("OMNIROUTE_ROUTING__STICKY_CHANNELS", "email")  # not a JSON list
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert str(error.value).startswith(
        "environment variable OMNIROUTE_ROUTING__STICKY_CHANNELS: not valid JSON"
    )
    monkeypatch.delenv("OMNIROUTE_ROUTING__STICKY_CHANNELS")
    config = _config(tmp_path, "sqlite:////tmp/x.db", 'sticky_for = "fortnight"')
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert str(error.value).startswith(f"{config}: routing.sticky_for: ")


# -- 6, 7, 8: check's output is its own, --config after the command, no file created -------


def test_check_without_a_config_creates_nothing_and_prints_only_its_table(
    tmp_path: Path,
) -> None:
    """With the broker down and log.level debug, a raw aiormq line came above the table,
    and ./var/directory.db was created."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "OMNIROUTE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{_closed_port()}/",
        "OMNIROUTE_BUS__CONNECT_TIMEOUT": "2",
        "OMNIROUTE_LOG__LEVEL": "debug",
        "OMNIROUTE_LOG__FORMAT": "json",
    }
    result = subprocess.run(
        [sys.executable, "-m", "config.cli", "check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if not TABLE_ROWS.match(line)] == [], result.stdout
    assert any(line.startswith("broker") and "FAIL" in line for line in lines)
    directory = next(line for line in lines if line.startswith("directory"))
    assert f"no directory yet at {tmp_path / 'var' / 'directory.db'}" in directory
    assert list(tmp_path.iterdir()) == [], "check created files"


async def test_check_takes_config_after_the_command_and_keeps_libraries_quiet(
    daemon: DaemonProcess, engine: AsyncEngine
) -> None:
    """`omniroute check --config f` was a usage error; with log.level = "debug" about 50
    aiosqlite lines came before the table."""
    await seed(engine)
    daemon.config.write_text(daemon.config.read_text().replace('"json"', '"json"\nlevel = "debug"'))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "config.cli", "check", "--config", str(daemon.config)],
        cwd=ROOT,
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "aiosqlite" not in result.stdout
    assert [line for line in result.stdout.splitlines() if not TABLE_ROWS.match(line)] == []
    parsed = build_parser().parse_args(
        ["--config", "a", "directory", "import", "--config", "b", "f"]
    )
    assert parsed.config == "b"
    assert build_parser().parse_args(["--config", "a", "check"]).config == "a"


# -- 9: an empty directory says so ----------------------------------------------------------


async def test_a_new_directory_says_it_is_empty_and_which_command_creates_it(
    tmp_path: Path,
) -> None:
    """`directory import` on a new database said "the directory schema is at nothing"."""
    missing = tmp_path / "new" / "directory.db"
    with pytest.raises(DirectoryUnavailable) as error:
        await require_current(f"sqlite:///{missing}")
    assert str(error.value).startswith(
        f"there is no directory at {missing} yet: run `omniroute directory migrate` to create it"
    )
    assert not missing.parent.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(DirectoryUnavailable) as error:
        await require_current(f"sqlite:///{empty}")
    said = "is empty (no omniroute tables yet): run `omniroute directory migrate` to create them"
    assert said in str(error.value)


# -- 10: a Turkish Excel's CSV ----------------------------------------------------------------

TURKISH_TEAMS = "id;name;dial;email\r\nfatura;Fatura ve Ödeme;;\r\nağ;Ağ İşletim;;\r\n"


async def test_semicolons_and_tabs_are_sniffed_from_the_header(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """A Turkish Excel writes `;`: the file was refused as matching no kind."""
    semi = tmp_path / "teams.csv"
    semi.write_text(TURKISH_TEAMS, encoding="utf-8")
    report = await import_csv(engine, semi, kind=None, region="TR", dry_run=False)
    assert (report.kind, report.inserted, report.rejects) == ("teams", 2, [])
    tabs = tmp_path / "agents.csv"
    tabs.write_text(
        "id\tname\tteam\temail\tphone\tdial\tactive\nayse\tAyşe\tfatura\t\t\t\t\n",
        encoding="utf-8",
    )
    report = await import_csv(engine, tabs, kind=None, region="TR", dry_run=False)
    assert (report.kind, report.inserted, report.rejects) == ("agents", 1, [])


async def test_a_windows_1254_file_is_named_and_imports_with_its_encoding(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """A cp1254 file was refused row by row as "not valid UTF-8", with no way out."""
    path = tmp_path / "teams.csv"
    path.write_bytes(TURKISH_TEAMS.encode("cp1254"))
    report = await import_csv(engine, path, kind=None, region="TR", dry_run=True)
    hint = "not valid UTF-8: looks like Windows-1254 (Turkish Excel): use --encoding cp1254"
    assert report.rejects == [(2, hint), (3, hint)]

    args = build_parser().parse_args(
        ["directory", "import", str(path), "--encoding", "cp1254", "--delimiter", ";"]
    )
    settings = load_settings(_config(tmp_path, f"sqlite:///{engine.url.database}"))
    assert await run_directory(args, settings) == 0
    again = tmp_path / "tabs.csv"
    again.write_bytes(TURKISH_TEAMS.replace(";", "\t").encode("cp1254"))
    args = build_parser().parse_args(
        ["directory", "import", str(again), "--encoding", "cp1254", "--delimiter", "tab"]
    )
    assert await run_directory(args, settings) == 0
    from routers.csv.exporter import export_csv

    out = tmp_path / "out.csv"
    with out.open("w", encoding="utf-8", newline="") as fh:
        await export_csv(engine, "teams", fh)
    assert "Ağ İşletim" in out.read_text(encoding="utf-8")


# -- 12: tail --show-identities ---------------------------------------------------------------


async def test_tail_shows_identities_only_when_asked_and_logs_that_it_did(
    tmp_path: Path, amqp_url: str, bus: Bus, logs: pytest.CaptureFixture[str]
) -> None:
    """`tail` always redacted senders; showing them is an audit event."""
    _json_logs()
    settings = load_settings(_config(tmp_path, "sqlite:////tmp/unused.db"))
    settings = settings.model_copy(update={"amqp_url": SecretStr(amqp_url)})
    routed = RoutedMessage(
        message=InboundMessage(
            channel="email",
            external_id="tail-1",
            sender=Identity(kind="email", address="ayse@acme.test"),
            text="merhaba",
        ),
        route=Route(kind="team", target="billing", reason="unknown_sender"),
    )
    for show in (False, True):
        task = asyncio.create_task(tail(settings, "#", 1, show_identities=show))

        async def shown(task: asyncio.Task[int] = task) -> bool:
            await bus.publish(ROUTED, "team.billing", routed, message_id=routed.message.id)
            return task.done()

        await until(shown, 15, "tail to print one message")
        assert task.result() == 0
        out = logs.readouterr().out
        assert ("ayse@acme.test" in out) is show, out
        assert ("tail.identities_shown" in out) is show, out
    audit = next(json.loads(ln) for ln in out.splitlines() if "identities_shown" in ln)
    assert audit["user"]


# -- 13: the units name only what is shipped and installed ------------------------------------


def test_the_units_name_only_shipped_units_and_installed_documentation() -> None:
    """PartOf= named a target nobody ships; Documentation= a directory no install creates."""
    units = ROOT / "systemd"
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    for unit in sorted(units.glob("omniroute*.*")):
        if unit.suffix not in (".service", ".target"):
            continue
        for line in unit.read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition("=")
            if key in ("PartOf", "BindsTo", "Requires", "Wants") and "omniroute" in value:
                for name in value.split():
                    assert (units / name).is_file(), f"{unit.name}: {name} is not shipped"
                    assert f"systemd/{name}" in operations, f"{name} is not installed"
            if key == "Documentation":
                for url in value.split():
                    path = url.removeprefix("file://")
                    assert path != url, url
                    folder = str(Path(path).parent)
                    assert f"install -d {folder}" in operations, f"{folder}: no install makes it"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/OPERATIONS.md" in readme
    assert "### Capping `omniroute.routed`" in operations
