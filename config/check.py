"""``omniroute check``: is the configuration valid and is everything it names reachable?
Prints a table; exits 1 when anything failed."""

import asyncio

from config.settings import Settings
from ingest.bus import QUEUES, Bus
from ingest.errors import OmnirouteError
from routers.db import create_engine, current_revision

Row = tuple[str, bool, str]


async def run_checks(settings: Settings) -> int:
    rows: list[Row] = [("config", True, "valid")]
    rows.append(await _check_broker(settings))
    rows.append(await _check_database(settings))
    rows.extend(await _check_connectors(settings))
    width = max(len(name) for name, _, _ in rows)
    for name, ok, why in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {why}")
    return 0 if all(ok for _, ok, _ in rows) else 1


async def _check_broker(settings: Settings) -> Row:
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-check")
    try:
        async with asyncio.timeout(settings.bus.connect_timeout + 5):
            await bus.open()
            depths = [f"{q}={(await bus.queue_depth(q))[0]}" for q in QUEUES]
        return ("broker", True, "topology declared; ready messages: " + ", ".join(depths))
    except (OmnirouteError, TimeoutError) as exc:
        return ("broker", False, str(exc) or type(exc).__name__)
    finally:
        await bus.close()


async def _check_database(settings: Settings) -> Row:
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        async with asyncio.timeout(settings.directory.statement_timeout + 5):
            revision = await current_revision(settings.directory_url)
        if revision is None:
            return (
                "directory",
                True,
                "reachable; not migrated yet (run: omniroute directory migrate)",
            )
        return ("directory", True, f"reachable; schema revision {revision}")
    except Exception as exc:  # any driver error is a failed check, reported in one line
        return ("directory", False, f"{type(exc).__name__}: {exc}")
    finally:
        await engine.dispose()


async def _check_connectors(settings: Settings) -> list[Row]:
    """Log into each configured mailbox and SMTP server; report what the others need."""
    rows: list[Row] = []
    if settings.email.mailboxes or settings.smtp is not None:
        from connectors.email import check as check_email

        rows.extend(await check_email(settings.email, settings.smtp))
    twilio = settings.twilio
    if twilio.auth_token is not None:
        sms_out = bool(twilio.account_sid and twilio.from_number)
        why = "webhook signatures checked against " + (
            settings.http.public_url or "the request URL (set http.public_url behind a proxy)"
        )
        rows.append(("twilio", True, why + ("; SMS replies enabled" if sms_out else "")))
    if settings.api.token is None:
        rows.append(("api", True, "no api.token: /v1/route answers 401 to everyone"))
    if settings.twitter is not None:
        user_auth = all(
            (
                settings.twitter.consumer_key,
                settings.twitter.consumer_secret,
                settings.twitter.access_token,
                settings.twitter.access_token_secret,
            )
        )
        rows.append(
            (
                "twitter",
                True,
                "configured (credentials are verified by the first poll); "
                + ("OAuth 1.0a user context" if user_auth else "bearer token only"),
            )
        )
    return rows
