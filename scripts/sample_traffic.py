"""Sample traffic for the README's first command: publishes a few customer messages and
ticket-system events onto the running daemon's exchanges and prints what comes out routed.

It waits for the router's consumer, so it can start alongside the daemon.
"""

import argparse
import asyncio
import sys
from datetime import timedelta

from config.settings import config_path, load_settings
from config.tail import line
from ingest.bus import Bus
from ingest.errors import OmnirouteError
from ingest.schema import (
    AgentReplied,
    AgentStatus,
    InboundMessage,
    RoutedMessage,
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
    ]


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
        seen = 0
        async with queue.iterator() as deliveries:
            async for delivery in deliveries:
                async with delivery.process():
                    routed = RoutedMessage.model_validate_json(delivery.body)
                    print("sample-traffic  " + line(routed, redact_identities=False), flush=True)
                seen += 1
                if seen >= expected:
                    break
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
