"""The channel table (issue 14): every list of channels is derived from it, a process builds
only the channels its components and settings name, and a channel nobody configured never
loads its library."""

import argparse
import asyncio
import json
import re
import signal
import typing
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from config import registry
from config.cli import build_parser
from config.components import Wiring
from config.daemon import RESTART_ONLY
from config.settings import COMPONENTS, Settings
from connectors.settings import MailboxSettings, SmtpSettings, TwilioSettings, TwitterSettings
from ingest.bus import Bus
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import Channel
from tests.daemon_fixtures import DaemonProcess
from tests.support.waiting import until

#: the libraries of the channels a default configuration leaves off
CHANNEL_LIBRARIES = ("aioimaplib", "aiosmtplib", "tweepy", "twilio")


def _every_channel(tmp_path: Path) -> Settings:
    return Settings(
        state_dir=tmp_path,
        email={
            "mailboxes": [
                MailboxSettings(name="support", host="127.0.0.1", username="support@x.test")
            ]
        },
        smtp=SmtpSettings(host="127.0.0.1", security="none", from_address="support@x.test"),
        twilio=TwilioSettings(
            account_sid="AC" + "0" * 32,
            auth_token=SecretStr("token"),
            from_number="+15005550006",
        ),
        twitter=TwitterSettings(user_id="1", bearer_token=SecretStr("bearer")),
    )


@pytest.fixture
async def wiring_of(engine: AsyncEngine) -> AsyncIterator[typing.Callable[[Settings], Wiring]]:
    """Wirings on a real directory and a broker client never opened: building a process's
    plan opens nothing."""
    made: list[Wiring] = []

    def make(settings: Settings) -> Wiring:
        bus = Bus(settings.amqp_url.get_secret_value(), settings.bus)
        made.append(Wiring(settings, Health(), bus, engine, Metrics()))
        return made[-1]

    yield make
    for wiring in made:
        await wiring.close()


def _choices(parser: argparse.ArgumentParser, *path: str) -> tuple[str, ...]:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    action = next(a for a in parser._actions if a.dest in ("component", "channel"))
    return tuple(action.choices or ())


def _field_exists(model: type[BaseModel], key: str) -> bool:
    for part in key.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        inner = (field.annotation, *typing.get_args(field.annotation))
        models = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        model = models[0] if models else BaseModel
    return True


def test_every_list_of_components_and_channels_comes_from_the_table() -> None:
    """Settings, ``--component`` and ``route explain --channel`` cannot drift apart, and
    the spellings operators use keep working (DESIGN.md: extend, never rename)."""
    assert COMPONENTS == (
        "router",
        "events",
        "dispatcher",
        "timers",
        "webhooks",
        "email",
        "twitter",
    )
    assert Settings().components == list(COMPONENTS)
    parser = build_parser()
    assert _choices(parser, "run") == COMPONENTS
    assert set(_choices(parser, "route", "explain")) == set(typing.get_args(Channel))
    assert set(registry.IDENTITY_KINDS) == set(typing.get_args(Channel))


def test_table_keys_name_real_settings_and_no_restart_rule_was_lost() -> None:
    """A typo in the table would silently disable a channel or a restart warning."""
    for entry in registry.CHANNELS:
        for key in (*entry.enabled_by, *entry.restart):
            assert _field_exists(Settings, key), f"{entry.name}: {key}"
        assert entry.component in COMPONENTS
        assert callable(registry.load(entry))
    before = {"amqp_url", "database_url", "state_dir", "components", "http", "bus", "spool"}
    before |= {"api", "twilio", "smtp", "twitter", "dispatch", "router", "directory"}
    assert before | {"routing.default_region"} <= set(RESTART_ONLY)


def test_a_key_under_a_section_not_configured_reads_as_unset() -> None:
    settings = Settings()
    assert registry.value(settings, "twitter.user_id") is None
    assert registry.value(settings, "routing.default_region") == settings.routing.default_region
    assert [e.name for e in registry.CHANNELS if registry.enabled(e, settings)] == ["pbx"]


async def test_channels_and_senders_follow_the_settings(
    wiring_of: typing.Callable[[Settings], Wiring], tmp_path: Path
) -> None:
    """The dispatcher answers on every configured channel, and on nothing else."""
    everything = wiring_of(_every_channel(tmp_path))
    assert [c.name for c in everything.channels()] == ["twilio", "pbx", "email", "twitter"]
    assert set(everything.senders()) == {"sms", "whatsapp", "email", "twitter"}
    nothing = wiring_of(Settings(state_dir=tmp_path))
    assert [c.name for c in nothing.channels()] == ["pbx"]
    assert nothing.senders() == {}


async def test_a_process_runs_only_the_channels_of_its_components(
    wiring_of: typing.Callable[[Settings], Wiring], tmp_path: Path
) -> None:
    """``--component email`` polls mail and serves no webhooks (no spool); ``webhooks``
    serves them and polls nothing; the intake names are what ``/readyz`` shows."""
    settings = _every_channel(tmp_path)
    email = wiring_of(settings.model_copy(update={"components": ["email"]}))
    assert list(email.plan().intake) == ["email"]
    webhooks = wiring_of(settings.model_copy(update={"components": ["webhooks"]}))
    assert list(webhooks.plan().intake) == ["spool"]
    everything = wiring_of(settings)
    plan = everything.plan()
    assert list(plan.intake) == ["pruner", "spool", "email", "twitter"]
    # the timers component runs two workers: offers ("timers") and escalations (issue 16)
    assert list(plan.workers) == [*registry.CORE, "escalations"]


async def _until_logged(log: Path, event: str, timeout: float = 30) -> None:
    def logged() -> bool:
        return log.exists() and f'"{event}"' in log.read_text()

    await until(lambda: asyncio.to_thread(logged), timeout, f"{event} logged")


def _imported(text: str) -> set[str]:
    """Top-level module names from ``PYTHONPROFILEIMPORTTIME`` lines."""
    found = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)\s*$", text, re.MULTILINE)
    return {name.split(".")[0] for name in found}


async def test_channels_not_configured_are_never_imported(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """``omniroute run`` and ``check`` without email, X or Twilio never load aioimaplib,
    aiosmtplib, tweepy or twilio (a broken or missing library must not matter to whoever
    does not use it); a reload changing a channel's restart key says so."""
    daemon.env["PYTHONPROFILEIMPORTTIME"] = "1"
    check = await asyncio.to_thread(daemon.cli, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "fastapi" in _imported(check.stderr), "the import probe saw nothing"
    assert not set(CHANNEL_LIBRARIES) & _imported(check.stderr)

    log = tmp_path / "run.log"
    proc = daemon.start(log=log)
    await _until_logged(log, "daemon.ready")
    config = daemon.config.read_text()
    daemon.config.write_text(config + '[api]\ntoken = "changed"\n', encoding="utf-8")
    proc.send_signal(signal.SIGHUP)
    await _until_logged(log, "daemon.reload_needs_restart")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 25) == 0
    text = log.read_text()
    [line] = [json.loads(s) for s in text.splitlines() if '"daemon.reload_needs_restart"' in s]
    assert line["keys"] == ["api"]
    assert "uvicorn" in _imported(text), "the import probe saw nothing"
    assert not set(CHANNEL_LIBRARIES) & _imported(text)

    daemon.config.write_text(
        config + '[twitter]\nuser_id = "1"\nbearer_token = "b"\n', encoding="utf-8"
    )
    configured = await asyncio.to_thread(daemon.cli, "check")
    assert "tweepy" in _imported(configured.stderr)
