"""Sample traffic for the README's first command: publishes a few customer messages and
ticket-system events onto the running daemon's exchanges and prints what comes out routed,
then waits (at most three minutes) for what nobody answered to move on by itself: an email
offer timing out (reason offer_timeout, attempt 2) and a first answer overdue (sla.breached,
then reason escalated). ``scripts/demo`` shortens those times for it.

It waits for the router's consumer, so it can start alongside the daemon.
"""

import argparse
import asyncio
import sys
from datetime import timedelta

from aio_pika.abc import AbstractQueue

from config.settings import config_path, load_settings
from config.tail import line
from ingest.bus import Bus
from ingest.errors import OmnirouteError
from ingest.schema import (
    AgentReplied,
    AgentStatus,
    InboundMessage,
    RoutedMessage,
    SlaBreached,
    new_id,
    utcnow,
)
from ingest.topology import EVENTS, INBOUND, ROUTED, ROUTER_QUEUE


def samples() -> list[InboundMessage | AgentReplied | AgentStatus]:
    def msg(channel: str, kind: str, sender: str, text: str, **kw: object) -> InboundMessage:
        return InboundMessage.model_validate(
            {
                "channel": channel,
                "external_id": new_id(),
                "sender": {"kind": kind, "address": sender},
                "text": text,
                **kw,
            }
        )

    return [
        msg(
            "email",
            "email",
            "Kemal.Ozturk@example.com.tr",
            "Faturam iki kez kesildi",
            subject="Fatura hatası",
        ),
        msg("sms", "phone", "0532 111 22 33", "Merhaba, faturam hakkında aradım"),
        msg("twitter", "twitter", "@EmilyJ_NYC", "@acme my line has been down since 9am"),
        msg(
            "email",
            "email",
            "stranger@unknown.example",
            "Do you sell routers?",
            recipient={"kind": "email", "address": "enterprise@support.example.com"},
        ),
        msg("voice", "phone", "+1 415 555 0112", "call"),
        AgentReplied(agent_id="mehmet", customer_id="c-1001", channel="email"),
        msg("email", "email", "kemal.ozturk@example.com.tr", "Teşekkürler, bir sorum daha var"),
        # away for two hours, with Ayşe standing in: his customer reaches her (reason deputy)
        AgentStatus(
            agent_id="mehmet", status="away", until=utcnow() + timedelta(hours=2), deputy="ayse"
        ),
        msg("sms", "phone", "+905321112233", "Mehmet Bey orada mı?"),
        # Kerem (on call, around the clock) answered Selin: her next mail is offered to him,
        # and nobody accepts it (no ticket system here): it goes on, then escalates
        AgentReplied(agent_id="kerem", customer_id="c-1007", channel="email"),
        msg("email", "email", "selin.aydin@example.com.tr", "Ödeme yaptım ama hat hâlâ kapalı"),
    ]


async def _show(routed: AbstractQueue, breaches: AbstractQueue, expected: int) -> None:
    """Print what is routed and every sla.breached until the first decisions, an offer that
    timed out, a breach and its escalation were all seen, or three minutes passed."""
    first, seen = 0, set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 180
    while loop.time() < deadline:
        if first >= expected and {"offer_timeout", "escalated", "sla.breached"} <= seen:
            return
        got = False
        if (delivery := await breaches.get(fail=False, timeout=5)) is not None:
            async with delivery.process():
                sla = SlaBreached.model_validate_json(delivery.body)
            print(
                f"sample-traffic  sla.breached: {sla.message_id[:8]}… unanswered at "
                f"{sla.due_at:%H:%M:%S} by team {sla.team}, level {sla.level} -> "
                f"{sla.escalated_to or 'nobody'}",
                flush=True,
            )
            seen.add("sla.breached")
            got = True
        if (delivery := await routed.get(fail=False, timeout=5)) is not None:
            async with delivery.process():
                item = RoutedMessage.model_validate_json(delivery.body)
            attempt = f"  (attempt {item.route.attempt})" if item.route.attempt > 1 else ""
            print("sample-traffic  " + line(item, redact_identities=False) + attempt, flush=True)
            first += item.route.attempt == 1
            seen.add(item.route.reason)
            got = True
        if not got:
            await asyncio.sleep(0.5)
    print("sample-traffic  stopped waiting after three minutes", flush=True)


async def main() -> int:
    settings = load_settings(config_path(None))
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-sample")
    await bus.open()
    try:
        async with asyncio.timeout(60):
            while (await bus.queue_depth(ROUTER_QUEUE))[1] == 0:
                await asyncio.sleep(0.5)
        channel = await bus.connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(ROUTED, "#")
        items = samples()
        expected = sum(isinstance(i, InboundMessage) for i in items)
        for item in items:
            if isinstance(item, InboundMessage):
                await bus.publish(INBOUND, item.channel, item, message_id=item.id)
            else:
                await bus.publish(EVENTS, item.type, item, message_id=new_id())
            await asyncio.sleep(0.5)  # paced so each event is learnt before the next message
        breaches = await channel.declare_queue(exclusive=True, auto_delete=True)
        await breaches.bind(EVENTS, "sla.breached")
        await _show(queue, breaches, expected)
        return 0
    finally:
        await bus.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    try:
        sys.exit(asyncio.run(main()))
    except (OmnirouteError, TimeoutError) as exc:
        print(f"sample-traffic: {exc or 'timed out waiting for the router'}", file=sys.stderr)
        sys.exit(1)
