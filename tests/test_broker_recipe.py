"""docs/OPERATIONS.md's broker recipe for a ticket system, run as written (its rabbitmqctl
lines are read out of the page, so the page cannot drift from what is tested) on a fresh
vhost with fresh users deleted afterwards: the user can do exactly its part, and with
events.trusted_publishers naming it, its events and requests are believed while another
user's are dead-lettered."""

import asyncio
import contextlib
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.topology import (
    DEAD_QUEUE,
    EVENTS,
    EVENTS_QUEUE,
    INBOUND,
    OUTBOUND,
    OUTBOUND_QUEUE,
    REASON_HEADER,
    ROUTED,
    ROUTED_QUEUE,
    ROUTER_QUEUE,
)
from routers.settings import EventsSettings
from tests.seed import seed
from tests.support.broker import opened_bus, rabbitmqctl, take, vhost_url
from tests.test_event_trust import (
    ACME_PHONE,
    dispatcher,
    events_worker,
    last_agent,
    presence,
    settled,
)
from tests.test_poison import RecordingSender, running

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- ticket-system-permissions"
#: the queue name prefix the recipe gives the ticket system
PREFIX = "tickets."


def recipe() -> list[str]:
    """The rabbitmqctl lines of the recipe, as the page shows them."""
    page = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    block = page[page.index(MARKER) :]
    block = block[block.index("```sh\n") + len("```sh\n") :]
    lines = block[: block.index("```")].strip().splitlines()
    assert lines[0].startswith("vhost=/ user=tickets password="), lines[0]  # set by the test
    commands = lines[1:]
    assert all(c.startswith("rabbitmqctl ") for c in commands), commands
    assert {c.split()[1] for c in commands} == {"add_user", "set_permissions"}
    return commands


@dataclass(frozen=True)
class User:
    name: str
    password: str

    def url(self, vhost: str) -> str:
        return vhost_url(vhost, self.name, self.password)


@pytest.fixture
def tickets(vhost: str) -> Iterator[User]:
    """The ticket system's user, made by the recipe's own commands on the test's vhost."""
    user = User(f"tickets-{secrets.token_hex(5)}", secrets.token_hex(16))
    env = {**os.environ, "vhost": vhost, "user": user.name, "password": user.password}
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    try:
        for command in recipe():
            subprocess.run(
                ["bash", "-euc", command],
                env={**env, "PATH": path},
                check=True,
                capture_output=True,
                timeout=60,
            )
        yield user
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            rabbitmqctl("delete_user", user.name)


@pytest.fixture
def omniroute_user(vhost: str) -> Iterator[User]:
    """omniroute's own broker user (not guest, so guest can play a stranger)."""
    user = User(f"omniroute-{secrets.token_hex(5)}", secrets.token_hex(16))
    rabbitmqctl("add_user", user.name, user.password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user.name, ".*", ".*", ".*")
        yield user
    finally:
        rabbitmqctl("delete_user", user.name)


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[AbstractConnection]:
    connection = await aio_pika.connect(url, timeout=10)
    try:
        yield connection
    finally:
        async with asyncio.timeout(10):
            await connection.close()


async def publish(
    channel: AbstractChannel, exchange: str, key: str, body: bytes, **kw: Any
) -> None:
    target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
    async with asyncio.timeout(10):
        await target.publish(aio_pika.Message(body, **kw), routing_key=key)


async def refused(
    connection: AbstractConnection, act: Callable[[AbstractChannel], Awaitable[Any]]
) -> str:
    """The broker's refusal of ``act`` on a channel of its own (a refusal closes it)."""
    channel = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelClosed) as caught:
        async with asyncio.timeout(10):
            await act(channel)
    return str(caught.value)


async def declare(channel: AbstractChannel, name: str) -> None:
    await channel.declare_queue(name)


async def consume(channel: AbstractChannel, queue_name: str) -> None:
    queue = await channel.get_queue(queue_name)
    await queue.consume(_nack, timeout=10)


async def _nack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    await message.nack()


async def test_the_recipe_user_can_do_exactly_a_ticket_systems_part(
    vhost: str, amqp_url: str, tickets: User
) -> None:
    """A ticket system's credentials in the wrong hands still cannot inject customer input,
    forge routed messages, read omniroute's own queues or pass for another user."""
    async with (
        opened_bus(amqp_url, name="recipe-test") as bus,
        connected(tickets.url(vhost)) as conn,
    ):
        mine = tickets.name
        channel = await conn.channel()
        # consume omniroute.routed
        await bus.publish_body(ROUTED, "triage", b'{"n": 1}', message_id="m1", type_=None)
        assert [got.body for got in await take(channel, ROUTED_QUEUE, 1)] == [b'{"n": 1}']
        # its own queue, bound to the routed exchange
        own = await channel.declare_queue(f"{PREFIX}billing", durable=True)
        await own.bind(ROUTED, "team.billing")
        await bus.publish_body(ROUTED, "team.billing", b'{"n": 2}', message_id="m2", type_=None)
        assert [got.body for got in await take(channel, own.name, 1)] == [b'{"n": 2}']
        # publish events and reply requests, confirmed, with its own user_id
        await publish(channel, EVENTS, "agent.status", b"{}", user_id=mine)
        await publish(channel, OUTBOUND, "sms", b"{}", user_id=mine)
        assert (await bus.queue_depth(EVENTS_QUEUE))[0] == 1
        assert (await bus.queue_depth(OUTBOUND_QUEUE))[0] == 1

        for exchange, key in ((INBOUND, "sms"), (ROUTED, "triage"), ("", ROUTER_QUEUE)):
            why = await refused(conn, partial(publish, exchange=exchange, key=key, body=b"{}"))
            assert "ACCESS_REFUSED" in why, (exchange, why)
        for queue in (ROUTER_QUEUE, OUTBOUND_QUEUE, EVENTS_QUEUE, DEAD_QUEUE):
            why = await refused(conn, partial(consume, queue_name=queue))
            assert "ACCESS_REFUSED" in why, (queue, why)
        why = await refused(conn, partial(declare, name="not-mine"))
        assert "ACCESS_REFUSED" in why
        why = await refused(
            conn, lambda ch: publish(ch, EVENTS, "agent.status", b"{}", user_id="guest")
        )
        assert "PRECONDITION_FAILED" in why  # nobody can claim another user's name


async def test_with_the_recipe_user_trusted_its_messages_are_believed_and_guests_are_not(
    vhost: str, amqp_url: str, tickets: User, omniroute_user: User, engine: AsyncEngine
) -> None:
    """events.trusted_publishers closes omniroute.events and omniroute.outbound to every
    broker user but the ticket system's (and omniroute's own)."""
    await seed(engine)
    trust = EventsSettings(trusted_publishers=[tickets.name])
    sender = RecordingSender()

    def reply(request_id: str, agent: str) -> bytes:
        return (
            f'{{"id": "{request_id}", "channel": "sms", "agent_id": "{agent}", '
            f'"to": {{"kind": "phone", "address": "{ACME_PHONE}"}}, "text": "hi"}}'
        ).encode()

    async with (
        opened_bus(omniroute_user.url(vhost), name="recipe-test") as bus,
        connected(tickets.url(vhost)) as ticket_conn,
        connected(amqp_url) as guest_conn,
    ):
        assert bus.user == omniroute_user.name
        workers = events_worker(bus, engine, trust), dispatcher(bus, engine, sender, trust)
        own = await bus.connection.channel()
        heard = await own.declare_queue(exclusive=True)
        await heard.bind(EVENTS, "outbound.*")
        async with running(*(w.run for w in workers)):
            guest = await guest_conn.channel()
            status = b'{"type": "agent.status", "agent_id": "ana", "status": "away"}'
            await publish(guest, EVENTS, "agent.status", status, message_id="g-1", user_id="guest")
            await publish(
                guest, OUTBOUND, "sms", reply("r-guest", "ana"), message_id="g-2", user_id="guest"
            )
            ticket = await ticket_conn.channel()
            replied = b'{"type": "agent.replied", "agent_id": "bob", "customer_id": "globex", '
            replied += b'"channel": "email"}'
            await publish(
                ticket, EVENTS, "agent.replied", replied, message_id="t-1", user_id=tickets.name
            )
            await publish(
                ticket,
                OUTBOUND,
                "sms",
                reply("r-tickets", "ana"),
                message_id="t-2",
                user_id=tickets.name,
            )
            dead = await take(bus, DEAD_QUEUE, 2, timeout=20, partial=True)
            # omniroute's own outbound.sent, stamped with its user, reached the events worker
            (sent,) = await take(bus, heard.name, 1, timeout=20)
            await workers[0].idle()  # the events worker: t-1 and our outbound.sent handled
            assert await last_agent(engine, "globex") == "bob"
        await settled(bus, EVENTS_QUEUE, OUTBOUND_QUEUE)
        await own.close()

    reasons = {m.message_id: str((m.headers or {}).get(REASON_HEADER)) for m in dead}
    refusal = "untrusted_publisher: user_id 'guest': not in events.trusted_publishers"
    assert reasons == {"g-1": refusal, "g-2": refusal}
    assert sender.sent == ["r-tickets"]
    assert await last_agent(engine, "acme") == "ana"  # the ticket system's reply
    assert await presence(engine, "ana") is None  # guest's status was not believed
    assert (sent.routing_key, sent.user_id) == ("outbound.sent", omniroute_user.name)
