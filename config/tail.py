"""``omniroute tail``: routed messages live, from a temporary queue that vanishes on exit.
Senders are redacted as in the logs (``log.redact``) unless ``--show-identities``, which
is logged as ``tail.identities_shown`` with the user who asked (issue 17)."""

import getpass
import sys

import aio_pika
import structlog

from config.settings import Settings
from ingest.amqp import connect
from ingest.schema import RoutedMessage
from ingest.topology import ROUTED

log = structlog.get_logger("omniroute.tail")


def line(routed: RoutedMessage, redact_identities: bool) -> str:
    from ingest.identities import redact

    message = routed.message
    sender = message.sender.address
    if redact_identities:
        sender = redact(sender)
    customer = routed.customer.id if routed.customer else "-"
    when = routed.route.decided_at.strftime("%Y-%m-%d %H:%M:%S")
    route = routed.route
    why: str = route.reason
    if route.for_agent:
        why += f" (for {route.for_agent})"
    if route.opens_at:
        why += f" (opens {route.opens_at.isoformat(timespec='minutes')})"
    return (
        f"{when}  {message.channel:<7}  {sender:<28}  {customer:<16}  "
        f"{route.routing_key:<24}  {why}"
    )


async def tail(
    settings: Settings,
    key: str,
    count: int | None,
    *,
    as_json: bool = False,
    show_identities: bool = False,
) -> int:
    redacted = settings.log.redact and not show_identities
    if show_identities:  # an audit line: who saw customers' identities, and which
        log.warning("tail.identities_shown", key=key, user=getpass.getuser())
    connection = await connect(settings.amqp_url.get_secret_value(), settings.bus, "omniroute-tail")
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(ROUTED, key)
        seen = 0
        async with queue.iterator() as messages:
            async for delivery in messages:
                async with delivery.process():
                    try:
                        routed = RoutedMessage.model_validate_json(delivery.body)
                    except ValueError:
                        # stderr with --json: its stdout is `rules test` input, JSON lines only
                        out = sys.stderr if as_json else sys.stdout
                        print(f"(unreadable message {delivery.message_id})", file=out, flush=True)
                        continue
                    shown = routed.model_dump_json() if as_json else line(routed, redacted)
                    print(shown, flush=True)
                seen += 1
                if count is not None and seen >= count:
                    break
    except aio_pika.exceptions.AMQPException as exc:
        from ingest.errors import TransientError

        raise TransientError(f"broker: {exc}") from exc
    finally:
        await connection.close()
    return 0
