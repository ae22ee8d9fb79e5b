"""``omniroute customer show ID|--identity ADDR`` and ``omniroute customer unstick ID`` (issue
17: steering from the command line).

``show`` says what the router knows of one customer: their identities (redacted as in the
logs unless ``--show-identities``, which is logged with the user who asked), team, last
agent and when, recent contacts from the routed log, and the messages still waiting for a
first answer or offered to an agent. ``unstick`` publishes the ``customer.unstick`` event a
ticket system would, with the broker's confirm; the events worker forgets the last agent,
so the customer's next message goes to their team.
"""

import argparse
import getpass
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from config.settings import Settings
from ingest.errors import ConfigError, OmnirouteError
from ingest.identities import InvalidIdentity, normalise, redact
from ingest.schema import CustomerUnstick, new_id
from ingest.topology import EVENTS
from routers.models import Assignment, Customer, CustomerIdentity, LastAgent, Waiting
from routers.store.engine import create_engine, require_current
from routers.store.routed_log import recent_contacts
from routers.store.values import aware

log = structlog.get_logger("omniroute.customer")
#: how many recent contacts ``show`` lists
RECENT = 10
KINDS = ("email", "phone", "twitter")

Lines = list[tuple[str, str]]


async def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "show" and (args.id is None) == (args.identity is None):
        raise ConfigError("give one of: a customer ID, --identity ADDR")
    await require_current(settings.directory_url)
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        async with engine.connect() as conn:
            if args.action == "unstick":
                customer = await _customer(conn, args.id)
                last = await _last_agent(conn, customer.id)
            else:
                customer_id = args.id or await _by_identity(
                    conn, args.identity, settings.routing.default_region
                )
                customer = await _customer(conn, customer_id)
                lines = await _show(conn, customer, args.show_identities)
    finally:
        await engine.dispose()
    if args.action == "show":
        if args.show_identities:  # an audit line: who saw a customer's identities
            log.warning("customer.identities_shown", customer=customer.id, user=getpass.getuser())
        print("\n".join(f"{key + ':' if key else '':<18}{value}" for key, value in lines))
        return 0
    from ingest.bus import Bus  # here: `customer show` and `directory search` need no broker

    event = CustomerUnstick(customer_id=customer.id, reason=args.reason)
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-customer")
    await bus.open()
    try:
        await bus.publish(EVENTS, event.type, event, message_id=new_id())
    finally:
        await bus.close()
    was = f"last agent {last}" if last else "no last agent now"
    print(f"published customer.unstick: {customer.id} ({was}; next message to their team)")
    return 0


def identity_keys(text: str, region: str) -> list[tuple[str, str]]:
    """Every (kind, normalised address) ``text`` reads as: an email address, a phone number,
    an X handle or user id (a word may be several; the directory tells which is known)."""
    keys = []
    for kind in KINDS:
        if kind == "email" and "@" not in text.strip().lstrip("@"):
            continue  # a bare word is no email address; ``@handle`` is X's
        try:
            keys.append((kind, normalise(kind, text, region)))  # type: ignore[arg-type]
        except InvalidIdentity:
            continue
    return keys


async def _by_identity(conn: AsyncConnection, text: str, region: str) -> str:
    keys = identity_keys(text, region)
    i = CustomerIdentity.__table__.c
    for kind, address in keys:
        found = await conn.scalar(select(i.customer_id).where(i.kind == kind, i.address == address))
        if found is not None:
            return str(found)
    said = "is not an email address, phone number or X handle" if not keys else "is nobody's"
    raise OmnirouteError(f"--identity {redact(text)!r} {said} in the directory")


async def _customer(conn: AsyncConnection, customer_id: str) -> Customer:
    row = await conn.execute(select(Customer.__table__).where(Customer.id == customer_id))
    found = row.first()
    if found is None:
        raise OmnirouteError(f"no customer {customer_id!r} in the directory")
    return Customer(id=found.id, name=found.name, team_id=found.team_id, language=found.language)


async def _last_agent(conn: AsyncConnection, customer_id: str) -> str | None:
    row = (
        await conn.execute(select(LastAgent.__table__).where(LastAgent.customer_id == customer_id))
    ).first()
    if row is None:
        return None
    return f"{row.agent_id} (on {row.channel}, {aware(row.at).isoformat(timespec='seconds')})"


async def _show(conn: AsyncConnection, customer: Customer, unredacted: bool) -> Lines:
    lines: Lines = [
        ("customer", customer.id),
        ("name", customer.name),
        ("team", customer.team_id or "- (unknown senders' route: address, default team)"),
        ("language", customer.language or "- (ack.default_language)"),
    ]
    i = CustomerIdentity.__table__.c
    identities = (
        await conn.execute(
            select(i.kind, i.address).where(i.customer_id == customer.id).order_by(i.kind)
        )
    ).all()
    shown = [f"{r.kind} {r.address if unredacted else redact(r.address)}" for r in identities]
    lines += _listed("identities", shown or ["none"])
    lines.append(("last agent", await _last_agent(conn, customer.id) or "none"))
    recent = await conn.run_sync(lambda sync: recent_contacts(sync, [customer.id], RECENT))
    lines += _listed(
        "recent contacts",
        [
            f"{_at(c.at)} {c.channel:<8} {c.route:<24} {c.message_id}"
            for c in recent.get(customer.id, [])
        ]
        or ["none in the routed log"],
    )
    w = Waiting.__table__.c
    waits = (
        await conn.execute(
            select(w.message_id, w.team_id, w.channel, w.received_at, w.due_at, w.level)
            .where(w.customer_id == customer.id, w.answered_at.is_(None))
            .order_by(w.received_at)
        )
    ).all()
    lines += _listed(
        "waiting",
        [
            f"{r.message_id} {r.channel} team {r.team_id} since {_at(aware(r.received_at))}"
            + (f", due {_at(aware(r.due_at))}" if r.due_at else ", not escalating")
            + (f", escalated {r.level}x" if r.level else "")
            for r in waits
        ]
        or ["none"],
    )
    a = Assignment.__table__.c
    open_ = (
        await conn.execute(
            select(
                a.message_id, a.agent_id, a.channel, a.assigned_at, a.offer_due_at, a.accepted_at
            )
            .where(a.customer_id == customer.id, a.closed_at.is_(None))
            .order_by(a.assigned_at)
        )
    ).all()
    lines += _listed(
        "with an agent",
        [
            f"{r.message_id} {r.channel} agent {r.agent_id} since {_at(aware(r.assigned_at))}"
            + (
                f", offered until {_at(aware(r.offer_due_at))}"
                if r.offer_due_at
                else ", accepted"
                if r.accepted_at
                else ""
            )
            for r in open_
        ]
        or ["none"],
    )
    return lines


def _listed(key: str, values: list[str]) -> Lines:
    return [(key if n == 0 else "", value) for n, value in enumerate(values)]


def _at(at: datetime) -> str:
    return at.isoformat(timespec="seconds")
